"""Where the time of one batched prefill goes (GPU): collate, vision tower, language model; top kernels.

    python bench/profile_prefill.py MODEL_DIR [--batch 64] [--prompt ...]

Diagnostic for bench_generate.py's "prefill" row: prints sync'd wall times of
each stage and torch.profiler's top CUDA kernels for one prefill.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", default=None)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    import torch

    from bench_generate import PROMPT, line_image
    from htrd.fastgen import FastGenerator

    fast = FastGenerator.load(args.model_dir, device=args.device, prompt=args.prompt or PROMPT,
                              batch_sizes=[1, args.batch], max_cache_len=512, max_new_tokens=8)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    prep = fast.prepare(line_image())
    items = [prep] * args.batch
    model = fast.model
    for _ in range(2):
        fast.generate(items, max_new_tokens=2)

    def timed(name, fn, n=3):
        sync()
        t = time.perf_counter()
        for _ in range(n):
            r = fn()
        sync()
        print(f"{name:40s} {(time.perf_counter() - t) / n * 1000:8.1f} ms", flush=True)
        return r

    with torch.inference_mode():
        batch = timed("collate + H2D", lambda: fast._collate(items))
        timed("vision tower (get_image_features)",
              lambda: model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]))
        timed("full prefill forward", lambda: model(**batch, use_cache=True, logits_to_keep=1))
        timed("generate max_new=1 (prefill + KV copy)", lambda: fast.generate(items, max_new_tokens=1), n=2)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])) as prof:
            model(**batch, use_cache=True, logits_to_keep=1)
            sync()
    print(prof.key_averages().table(sort_by="cuda_time_total" if args.device.startswith("cuda") else "cpu_time_total", row_limit=22, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
