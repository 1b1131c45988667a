"""Where the GPU idled in htrd's timelines (bench/trace_htrd), by what the inference thread was doing.

    python bench/trace_summary.py /tmp/tr/trace-*.json

For each trace, over the window from its first to its last decode step (``htr:_step``): the GPU's busy share
(any kernel, copy or memset running), its idle time by gap length and by the innermost ``htr:`` range of the
inference thread at each gap's middle (gaps under 10 us are counted apart: the launch gaps between kernels
of a graph), idle per half second, the prefills by number of lines (host time, GPU busy share within), the
host time per range, the kernels that took the most GPU time, and the **GPU time per line by phase**: each
kernel charged to what launched it (the runtime call of the same correlation id: inside ``htr:_vision_replayed``
the vision tower, else inside ``htr:_prefill`` the language model's prefill, else inside ``htr:_step`` the
decode steps), divided by the lines prefilled in the window -- where a line's ~11 ms of GPU go -- and
within each phase by kind of kernel (GEMM, attention, elementwise, copy: :func:`kind`).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
TINY_US = 10


def merged(intervals) -> list[list[float]]:
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def summarise(events: list[dict]) -> dict:
    """The figures of one trace's events (Chrome trace ``traceEvents``); times in microseconds."""
    kernels = [(e["ts"], e["ts"] + e.get("dur", 0), e["name"]) for e in events
               if e.get("cat") in GPU_CATS and "ts" in e]
    ranges = sorted((e["ts"], e["ts"] + e.get("dur", 0), e["name"]) for e in events
                    if e.get("cat") == "user_annotation" and str(e.get("name", "")).startswith("htr:"))
    steps = [r for r in ranges if r[2].startswith("htr:_step")]
    if not kernels or not steps:
        return {"error": "no kernels or no htr:_step ranges (was the trace taken under load on a GPU?)"}
    w0, w1 = min(r[0] for r in steps), max(r[1] for r in steps)
    busy = merged((max(a, w0), min(b, w1)) for a, b, _ in kernels if b > w0 and a < w1)
    gaps, prev = [], w0
    for a, b in busy:
        if a > prev:
            gaps.append((prev, a))
        prev = b
    if prev < w1:
        gaps.append((prev, w1))
    # innermost range at each gap's middle: a sweep over ranges sorted by start (they nest)
    inside: dict[tuple[float, float], str] = {}
    stack: list[tuple[float, float, str]] = []
    k = 0
    for mid, a, b in sorted(((a + b) / 2, a, b) for a, b in gaps if b - a >= TINY_US):
        while k < len(ranges) and ranges[k][0] <= mid:
            stack.append(ranges[k])
            k += 1
        stack = [r for r in stack if r[1] >= mid]
        inside[(a, b)] = ":".join(stack[-1][2].split(":")[:2]) if stack else "none"
    by_range: collections.Counter = collections.Counter()
    by_size: collections.Counter = collections.Counter()
    by_half_s: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for a, b in gaps:
        d = b - a
        key = inside.get((a, b), f"tiny (<{TINY_US} us)")
        by_range[key] += d
        by_size["<20us" if d < 20 else "<100us" if d < 100 else "<1ms" if d < 1000 else "<5ms" if d < 5000
                else ">=5ms"] += d
        by_half_s[int((a - w0) // 500_000)][key] += d
    prefills: dict[int, list[tuple[float, float]]] = collections.defaultdict(list)
    for a, b, name in ranges:
        if name.startswith("htr:_prefill:"):
            within = sum(min(b, y) - max(a, x) for x, y in busy if y > a and x < b)
            prefills[int(name.split(":")[2])].append((b - a, within / max(b - a, 1)))
    host: collections.Counter = collections.Counter()
    for a, b, name in ranges:
        host[":".join(name.split(":")[:2])] += b - a
    top: collections.Counter = collections.Counter()
    for a, b, name in kernels:
        if b > w0 and a < w1:
            top[name[:70]] += b - a
    span = w1 - w0
    busy_us = sum(b - a for a, b in busy)
    per_line = _per_line(events, ranges, w0, w1)
    return {"window_ms": span / 1e3, "gpu_busy_pct": 100 * busy_us / span, "idle_ms": (span - busy_us) / 1e3,
            "gaps": len(gaps),
            "idle_by_size_ms": {k: v / 1e3 for k, v in sorted(by_size.items())},
            "idle_by_range_ms": {k: v / 1e3 for k, v in by_range.most_common()},
            "idle_per_half_s_ms": {i * 0.5: {k: v / 1e3 for k, v in c.most_common()} for i, c in sorted(by_half_s.items())},
            "prefills": {n: {"count": len(v), "host_ms": sum(x for x, _ in v) / len(v) / 1e3,
                             "gpu_busy_pct": 100 * sum(y for _, y in v) / len(v)} for n, v in sorted(prefills.items())},
            "steps": len(steps),
            "mean_occupancy": sum(int(r[2].split(":")[2]) for r in steps) / len(steps),
            "host_ms_by_range": {k: v / 1e3 for k, v in host.most_common()},
            "top_kernels_ms": {k: v / 1e3 for k, v in top.most_common(12)},
            "gpu_ms_per_line": per_line}


PHASES = (("htr:_vision_replayed", "vision tower"), ("htr:_prefill", "prefill (language model)"),
          ("htr:_step", "decode steps"))
# What a kernel is, by its name (first match; flash attention's names contain "cutlass" too).
KINDS = (("attention", ("flash", "stage1", "stage2", "attention", "fmha")),
         ("GEMM", ("nvjet", "gemm", "cutlass", "xmma", "sm90_")), ("copy", ("Memcpy", "Memset")))


def kind(name: str) -> str:
    """A kernel's kind by its name: attention, GEMM, copy, else elementwise (norms, activations, indexing)."""
    low = name.lower()
    return next((k for k, keys in KINDS if any(w.lower() in low for w in keys)), "elementwise")


def _per_line(events: list[dict], ranges, w0: float, w1: float) -> dict:
    """GPU time per line prefilled in the window, by the phase whose range holds the kernel's launch (the
    runtime/driver call with the kernel's correlation id); kernels whose launch is not in the trace or in no
    phase: "other". Empty where no line was prefilled in the window."""
    launched = {e["args"]["correlation"]: e["ts"] for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    lines = sum(int(name.split(":")[2]) for a, b, name in ranges
                if name.startswith("htr:_prefill:") and w0 <= a <= w1)
    if not lines:
        return {}
    spans = {prefix: [(a, b) for a, b, name in ranges if name.startswith(prefix)] for prefix, _ in PHASES}
    by_phase: collections.Counter = collections.Counter()
    by_kind: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") not in GPU_CATS or "ts" not in e or not (w0 <= e["ts"] <= w1):
            continue
        t = launched.get(e.get("args", {}).get("correlation"))
        phase = "other"
        if t is not None:
            phase = next((label for prefix, label in PHASES if any(a <= t <= b for a, b in spans[prefix])), "other")
        by_phase[phase] += e.get("dur", 0)
        by_kind[f"{phase}: {kind(e['name'])}"] += e.get("dur", 0)
    return {"lines": lines, **{k: v / 1e3 / lines for k, v in by_phase.most_common()},
            "by_kind": {k: v / 1e3 / lines for k, v in sorted(by_kind.items())}}


def report(path: str, s: dict) -> str:
    if "error" in s:
        return f"== {path}: {s['error']}"
    lines = [(f"== {path}: window {s['window_ms']:.1f} ms, GPU busy {s['gpu_busy_pct']:.1f} %, idle "
              f"{s['idle_ms']:.1f} ms in {s['gaps']} gaps; {s['steps']} decode calls, {s['mean_occupancy']:.1f} "
              "slots occupied on average"),
             "  idle by gap length (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in s["idle_by_size_ms"].items()),
             "  idle by what the inference thread did (innermost htr: range at the gap's middle):"]
    lines += [f"    {k:28s} {v:8.1f} ms {100 * v / s['window_ms']:5.1f} %" for k, v in s["idle_by_range_ms"].items()]
    lines.append("  idle per half second (ms, top three):")
    lines += [f"    {t:5.1f} s " + ", ".join(f"{k} {v:.0f}" for k, v in list(c.items())[:3])
              for t, c in s["idle_per_half_s_ms"].items()]
    lines.append("  prefills by lines: count, host ms each, GPU busy within:")
    lines += [f"    {n:3d}: {p['count']:3d} {p['host_ms']:7.1f} ms {p['gpu_busy_pct']:5.1f} %"
              for n, p in s["prefills"].items()]
    lines.append("  host time by range (inclusive, ms): " + ", ".join(
        f"{k} {v:.1f}" for k, v in s["host_ms_by_range"].items()))
    lines.append("  kernels with the most GPU time (ms):")
    lines += [f"    {v:8.1f}  {k}" for k, v in s["top_kernels_ms"].items()]
    per_line = dict(s.get("gpu_ms_per_line") or {})
    if per_line:
        n = per_line.pop("lines")
        kinds = per_line.pop("by_kind", {})
        lines.append(f"  GPU time per line ({n} lines prefilled in the window), by what launched it: "
                     + ", ".join(f"{k} {v:.2f} ms" for k, v in per_line.items())
                     + f"; {sum(per_line.values()):.2f} ms in all")
        lines.append("    by kind of kernel (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in kinds.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("traces", nargs="+", type=Path)
    ap.add_argument("--json", type=Path, help="write the figures here as well")
    args = ap.parse_args(argv)
    out = {}
    for path in args.traces:
        try:
            events = json.loads(path.read_text())["traceEvents"]
        except (OSError, ValueError, KeyError) as exc:
            print(f"== {path}: not a Chrome trace ({exc})", file=sys.stderr)
            return 2
        out[str(path)] = s = summarise(events)
        print(report(str(path), s))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
