"""The GPU time of a call, for the bench scripts' microbenchmarks: CUDA events around *reps* calls after a
warm-up (the host's launching overlaps the GPU's work, as in serving)."""

from __future__ import annotations

from collections.abc import Callable


def gpu_us(fn: Callable[[], object], reps: int = 50, warmup: int = 3) -> float:
    """Microseconds of GPU time per call of *fn* (on the current CUDA device and stream)."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps * 1000.0
