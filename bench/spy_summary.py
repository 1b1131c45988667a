"""Where one thread of htrd spends its time, from py-spy's raw output (``--format raw --threads --idle``).

    python3 bench/spy_summary.py spy-continuous-realistic64.txt htrd-inference [--top 40]

bench_generate.py --profile-load and bench_serving.py --profile write such files (every thread, idle ones
too, 100 samples a second). Prints, for the thread whose name contains THREAD, the share of its samples
each function is on the stack for (inclusive) and the lines it was executing (leaf): a leaf on a blocking
call (``Event.synchronize``, a copy to the GPU) is the thread waiting for the GPU.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path


def summarize(lines, thread: str) -> tuple[int, collections.Counter, collections.Counter]:
    """(samples, inclusive counts by function, leaf counts by frame) for the thread named *thread*."""
    incl: collections.Counter = collections.Counter()
    leaf: collections.Counter = collections.Counter()
    total = 0
    for line in lines:
        line = line.rstrip()
        if not line or " " not in line:
            continue
        stack, count = line.rsplit(" ", 1)
        if not count.isdigit():
            continue
        frames = stack.split(";")
        if thread not in frames[0]:
            continue
        n = int(count)
        total += n
        for name in {re.sub(r" \(.*\)$", "", f) for f in frames[1:]}:
            incl[name] += n
        leaf[frames[-1]] += n
    return total, incl, leaf


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("file", type=Path, help="py-spy raw output")
    ap.add_argument("thread", help="part of the thread's name (htrd-inference, htrd-http, htrd-pre_)")
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args(argv)
    try:
        with args.file.open(encoding="utf-8", errors="replace") as fh:
            total, incl, leaf = summarize(fh, args.thread)
    except OSError as exc:
        print(f"spy_summary: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return 2
    if not total:
        print(f"spy_summary: no samples of a thread named like '{args.thread}' in {args.file}", file=sys.stderr)
        return 1
    print(f"{total} samples of {args.thread}")
    print("--- inclusive (on the stack)")
    for name, n in incl.most_common(args.top):
        print(f"{100 * n / total:5.1f}% {name}")
    print("--- leaf (executing)")
    for name, n in leaf.most_common(args.top):
        print(f"{100 * n / total:5.1f}% {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
