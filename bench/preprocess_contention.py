"""The GIL between htrd's preprocessing pool and its inference thread, on the CPU (no GPU needed).

    python bench/preprocess_contention.py [MODEL_DIR] [--threads 2,4,8]

htrd preprocesses images in a pool of threads while one inference thread launches the GPU's work and waits
for it (every wait hands the GIL over). Under load htrd reports 30-50 ms of preprocessing per image on an H200
host against ~3 ms alone. This measures both sides of the one interpreter lock on line images of many sizes:

- the preprocessing (``Preprocessor.prepare``) alone, then per image with N pool threads beside an
  "inference-like" thread (waits 10 ms with the GIL released, like a GPU sync, then runs 2 ms of Python);
- that thread's period: 12 ms alone, its excess with N preprocessing threads (p50 / p90) is the time it
  waited to get the GIL back after each wait.

On the 2-core CI-sized machine (ninth session, demo model): 2.3 ms an image alone, 4.1 / 7.7 ms per thread
with 2 / 4 threads (more threads than cores, too); the inference-like period 12.1 ms -> 15.0 / 12.7 ms p50,
16.0 / 16.4 ms p90. Beside a thread that runs Python without pause (not this script's), the same
preprocessing took 8.5 ms with one pool thread and 29-50 ms with 2-4: the convoy effect -- how busy htrd's
inference thread is with Python decides how slow its pool gets. A preprocessing pool of processes would
remove both; not measured on a GPU host. MODEL_DIR defaults to the demo model (built on first use).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir", nargs="?", type=Path)
    ap.add_argument("--threads", default="2,4,8")
    ap.add_argument("--iters", type=int, default=100, help="periods of the inference-like thread per setting")
    args = ap.parse_args(argv)
    from bench_generate import line_image
    from htrd.model import Preprocessor, load_model

    from htrctl.demo_model import build_demo_model

    model_dir = args.model_dir or build_demo_model(Path.home() / ".cache" / "htrctl-bench" / "demo-model")
    loaded = load_model(model_dir, device="cpu")
    pre = Preprocessor(loaded.processor, loaded.model, prompt="Transcribe the text.", one_cpu_thread=True)
    images = [line_image(300 + (137 * i) % 1700, 64 + (13 * i) % 96, seed=i) for i in range(40)]
    for im in images:
        pre.prepare(im)  # the prompt per grid cached, as in a warm daemon
    t = time.perf_counter()
    for im in images:
        pre.prepare(im)
    print(f"preprocessing alone: {(time.perf_counter() - t) / len(images) * 1000:.1f} ms an image")

    def periods() -> tuple[float, float]:
        out = []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            time.sleep(0.010)  # the GIL released, as in a wait for the GPU
            end = time.perf_counter() + 0.002
            while time.perf_counter() < end:  # 2 ms of Python
                pass
            out.append((time.perf_counter() - t0) * 1000)
        q = statistics.quantiles(out, n=10)
        return statistics.median(out), q[-1]

    p50, p90 = periods()
    print(f"inference-like thread alone: period p50 {p50:.1f} ms, p90 {p90:.1f} ms")
    for n in (int(x) for x in args.threads.split(",")):
        stop, done = threading.Event(), [0]

        def worker() -> None:
            i = 0
            while not stop.is_set():
                pre.prepare(images[i % len(images)])
                done[0] += 1
                i += 1

        pool = [threading.Thread(target=worker, daemon=True) for _ in range(n)]
        for th in pool:
            th.start()
        time.sleep(0.3)
        start, t0 = done[0], time.perf_counter()
        p50, p90 = periods()
        rate = (done[0] - start) / (time.perf_counter() - t0)
        stop.set()
        for th in pool:
            th.join()
        print(f"{n} preprocessing threads: inference-like period p50 {p50:.1f} ms, p90 {p90:.1f} ms; "
              f"preprocessing {1000 * n / rate:.1f} ms an image per thread ({rate:.0f} images/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
