"""Where one decode step and one small prefill go (GPU): captured step time per batch, a floor, top kernels.

    python bench/profile_decode.py MODEL_DIR [--batches 1,16,64] [--span 512] [--used 250-330] [--attention all]

Diagnostic for the serving path's per-token cost (FastGenerator). Prints, for
each batch size: the captured decode step (CUDA graph replay, averaged over
50 steps, every slot decoding at a cache position drawn from --used), the same
step's matmuls alone (the weight-streaming floor of that batch), and
torch.profiler's top kernels of one eager step; with --attention all, the
step with each decode attention that runs here (Triton and flash attention over each line's own keys, SDPA over the
masked span, captured in the same process; then one line's
prefill: wall time against the GPU time of its kernels (how launch-bound it is).
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
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--span", type=int, default=512)
    ap.add_argument("--used", default="250-330",
                    help="cache positions of the decoding lines, drawn from LO-HI (the fixed-shape line: 284 + 50)")
    ap.add_argument("--attention", choices=["auto", "all"], default="auto",
                    help="all: the step with each decode attention that runs here (htrd.attention), the "
                         "generator's own last")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--kernels", type=int, default=14, help="rows of the kernel table")
    ap.add_argument("--prefill-only", action="store_true", help="only the prefill comparison (HF forward vs ours)")
    ap.add_argument("--decode-only", action="store_true", help="only the decode steps")
    ap.add_argument("--mixed", default="",
                    help="only mixed steps: comma-separated prompt-token budgets (e.g. 256,512,1024), each with "
                         "every --batches decode rows: captured step time, its matmuls alone, top kernels")
    ap.add_argument("--new-shapes", action="store_true",
                    help="only: first vs second prefill of line images of widths not seen before, with cuDNN's "
                         "attention allowed and not (a new shape's first prefill builds kernels/plans)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    import torch
    from bench_generate import PROMPT, line_image
    from htrd.fastgen import FastGenerator
    from torch.profiler import ProfilerActivity, profile

    batches = [int(b) for b in args.batches.split(",")]
    budgets = [int(t) for t in args.mixed.split(",") if t]
    fast = FastGenerator.load(args.model_dir, device="cuda", prompt=PROMPT, batch_sizes=batches,
                              max_cache_len=1024, max_new_tokens=256, compile=args.compile,
                              **({"mixed": True, "prefill_tokens": max(budgets)} if budgets else {}))
    dev = fast.device
    F = torch.nn.functional
    if args.new_shapes:
        return new_shapes(fast, torch, line_image)
    L = args.span

    def graph_of(fn):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
            fn()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return g

    lo, hi = (int(x) for x in args.used.split("-"))
    hi = min(hi, L - 60)  # room for the replays' positions

    def occupy(B):
        """Slots [:B] decoding: cache positions from --used, prompts starting at 0-59 (left padding)."""
        gen = torch.Generator().manual_seed(B)
        first = torch.randint(0, 60, (B,), generator=gen)
        pos = torch.maximum(torch.randint(lo, hi, (B,), generator=gen), first + 1)
        ar = torch.arange(fast.max_cache_len)
        fast.kv_first[:B], fast.pos[:B] = first.to(dev), pos.to(dev)
        fast.attend[:B] = ((ar[None] >= first[:, None]) & (ar[None] < pos[:, None])).to(dev)
        fast.finished[:B], fast.nstep[:B], fast.lim_max[:B] = False, 0, 10**6

    def per_replay_ms(g, n=50, before=lambda: None):
        before()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        g.replay()
        torch.cuda.synchronize()
        start.record()
        for _ in range(n):
            g.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / n

    def matmuls_only(B):
        x = torch.randn(B, fast.text.config.hidden_size, device=dev, dtype=fast.dtype)

        def fn():
            for li, layer in enumerate(fast.layers):
                F.linear(x, fast._qkv_w[li])
                F.linear(x[:, : layer.self_attn.o_proj.weight.shape[1]], layer.self_attn.o_proj.weight)
                a = F.linear(x, fast._gu_w[li])
                F.linear(a[:, : layer.mlp.down_proj.weight.shape[1]], layer.mlp.down_proj.weight)
            F.linear(x, fast.lm_head.weight)
        return fn

    weights = sum(w.numel() for w in fast._qkv_w + fast._gu_w) + sum(
        layer.self_attn.o_proj.weight.numel() + layer.mlp.down_proj.weight.numel() for layer in fast.layers
    ) + fast.lm_head.weight.numel()
    gbytes = weights * 2 / 1e9
    print(f"GPU: {torch.cuda.get_device_name(dev)}; matmul weights per step {gbytes:.2f} GB; span {L}", flush=True)
    replaced = []  # graphs captured again in another mode: a graph freed while its pool is shared breaks capture
    if budgets:
        return mixed_steps(fast, torch, batches, budgets, occupy, per_replay_ms, graph_of, matmuls_only, gbytes,
                           args.kernels)
    with torch.inference_mode():
        for B in ([] if args.prefill_only else batches):
            modes = [fast.decode_attention] + ([k for k in ("triton", "flash", "sdpa") if k != fast.decode_attention
                                                 and fast.decode_attention_runs(k)] if args.attention == "all" else [])
            for kind in modes[1:]:  # the others first; the generator's own last (profiled below)
                fast.decode_attention = kind
                replaced.append(fast._graphs.pop((B, L), None))  # kept alive: its memory pool is shared
                occupy(B)
                t_other = per_replay_ms(fast._capture(B, L).graph, before=lambda: occupy(B))  # noqa: B023
                print(f"batch {B:3d}: captured step with {kind} attention {t_other:6.2f} ms",
                      flush=True)
            fast.decode_attention = modes[0]
            replaced.append(fast._graphs.pop((B, L), None))
            occupy(B)
            step = fast._capture(B, L)
            t_step = per_replay_ms(step.graph, before=lambda: occupy(B))  # noqa: B023
            t_mm = per_replay_ms(graph_of(matmuls_only(B)))
            kind = fast.decode_attention
            print(f"batch {B:3d}: captured step ({kind}) {t_step:6.2f} ms ({B / t_step * 1000:7.0f} tok/s); matmuls "
                  f"alone {t_mm:6.2f} ms ({gbytes / t_mm:5.2f} TB/s); rest {t_step - t_mm:5.2f} ms", flush=True)
            occupy(B)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fast._step_fn(B, L)
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.kernels,
                                            max_name_column_width=70), flush=True)
        fast._reset_slots(list(range(fast.slots)))
    if args.decode_only:
        return 0

    # Prefills: HF's whole forward (what the prefill was) against FastGenerator's (HF's vision tower, the fused
    # language model writing into the slots), timed as generate(max_new_tokens=1): the prefill plus one host check.
    # Then the prefill alone (add()): how long the host takes to launch it against how long the GPU runs it, the
    # vision tower's share, and the top kernels of a one-line prefill.
    from htrd.generation import Seq
    from htrd.model import prompt_layout

    prep = fast.prepare(line_image())
    for n in (1, 4, 16):
        items = [prep] * n
        for _ in range(2):
            fast.generate(items, max_new_tokens=1, decode_text=False)
        with torch.inference_mode():
            batch = fast._collate(items)
            fast.model(**batch, use_cache=True, logits_to_keep=1)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(3):
                fast.model(**batch, use_cache=True, logits_to_keep=1)
            torch.cuda.synchronize()
            hf = (time.perf_counter() - t) / 3 * 1000
        t = time.perf_counter()
        for _ in range(3):
            fast.generate(items, max_new_tokens=1, decode_text=False)
        torch.cuda.synchronize()
        ours = (time.perf_counter() - t) / 3 * 1000
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fast.generate(items, max_new_tokens=1, decode_text=False)
            torch.cuda.synchronize()
        ev = prof.key_averages()
        gpu_ms = sum(e.self_device_time_total for e in ev) / 1000
        kernels = sum(e.count for e in ev if e.self_device_time_total > 0)
        print(f"prefill {n:2d} line(s) x {prep.prompt_len} tokens: HF forward {hf:6.1f} ms; fastgen prefill + 1 check "
              f"{ours:6.1f} ms, GPU kernels {gpu_ms:6.1f} ms ({kernels} kernels)", flush=True)
        launch, wall = [], []
        for _ in range(3):
            torch.cuda.synchronize()
            t = time.perf_counter()
            fast.add([Seq(p, 2) for p in items])
            launch.append((time.perf_counter() - t) * 1000)
            torch.cuda.synchronize()
            wall.append((time.perf_counter() - t) * 1000)
            fast.step(lambda s: True)
        with torch.inference_mode():
            layout = prompt_layout(items, device=fast.device)
            vis = []
            for _ in range(3):
                torch.cuda.synchronize()
                t = time.perf_counter()
                fast.vision(batch["pixel_values"], batch["image_grid_thw"], layout.grids, layout.vision_lengths)
                torch.cuda.synchronize()
                vis.append((time.perf_counter() - t) * 1000)
        print(f"  add() alone: host returns after {min(launch):6.1f} ms, GPU done after {min(wall):6.1f} ms; "
              f"vision tower alone {min(vis):6.1f} ms wall", flush=True)
        if n in (1, 16):
            print(ev.table(sort_by="self_device_time_total", row_limit=args.kernels, max_name_column_width=70),
                  flush=True)
    return 0


def mixed_steps(fast, torch, batches, budgets, occupy, per_replay_ms, graph_of, matmuls_only, gbytes,
                kernels) -> int:
    """Mixed steps (FastGenerator._mixed_step): B decode rows (slots decoding, as occupy() leaves them) and T
    prompt rows (padding: one sequence per KV head of T queries over the cache's first T keys -- the same work
    as a chunk of T tokens), for every B and T: the captured step, the matmuls of B + T rows alone (TFLOP/s)
    and the eager step's top kernels for the largest pair."""
    from htrd.chunks import StepPlan
    from torch.profiler import ProfilerActivity, profile

    print(f"mixed steps: flash chunks {fast.mixed}; budgets {budgets}; decode rows {batches}", flush=True)
    flops_row = 2 * gbytes / 2 * 1e9  # 2 FLOPs per weight and row (lm_head included: an upper bound)
    with torch.inference_mode():
        for T in budgets:
            host = fast._mixed_host(StepPlan(), T).to(fast.device)
            for B in batches:
                occupy(B)
                fast._mixed_buffer(T).copy_(host)
                g = fast._capture_mixed(B, T).graph

                def reset(B=B, T=T, host=host):
                    occupy(B)
                    fast._mixed_buffer(T).copy_(host)

                t = per_replay_ms(g, n=20, before=reset)
                t_mm = per_replay_ms(graph_of(matmuls_only(B + T)), n=20)
                print(f"B {B:3d} + T {T:4d}: captured mixed step {t:6.2f} ms ({(B + T) / t:6.1f} rows/ms); matmuls "
                      f"alone {t_mm:6.2f} ms ({flops_row * (B + T) / t_mm / 1e9:5.0f} TFLOP/s); rest {t - t_mm:5.2f} ms",
                      flush=True)
        B, T = batches[-1], budgets[-1]
        reset(B, T)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fast._mixed_step(B, T)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=kernels, max_name_column_width=70),
              flush=True)
        fast._reset_slots(list(range(fast.slots)))
    return 0


def new_shapes(fast, torch, line_image) -> int:
    """First and second prefill (one line, generate(max_new_tokens=1)) of widths not seen before."""
    fast.generate([fast.prepare(line_image(width=1200))], max_new_tokens=1, decode_text=False)
    for cudnn in (True, False):
        torch.backends.cuda.enable_cudnn_sdp(cudnn)
        for w in (640, 880, 1520) if cudnn else (720, 960, 1600):
            prep = fast.prepare(line_image(width=w))
            times = []
            for _ in range(3):
                torch.cuda.synchronize()
                t = time.perf_counter()
                fast.generate([prep], max_new_tokens=1, decode_text=False)
                torch.cuda.synchronize()
                times.append((time.perf_counter() - t) * 1000)
            print(f"cudnn sdpa {'on ' if cudnn else 'off'} width {w:4d} ({prep.prompt_len} tokens): first "
                  f"{times[0]:6.1f} ms, then {times[1]:6.1f}, {times[2]:6.1f} ms", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
