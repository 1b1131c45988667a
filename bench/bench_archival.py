"""Benchmark: a PAGE-XML page through ``htrctl transcribe`` against its lines sent as separate images.

    .venv/bin/python bench/bench_archival.py                 # CPU, the demo model, a 30-line page
    .venv/bin/python bench/bench_archival.py --model-dir DIR --gpu 0 --lines 30

Three ways to get the same 30 line texts from one real ``htrd`` (a subprocess on a private socket):

1. **page** -- the PAGE file: parse, find the image, cut and straighten the lines, ONE batch request,
   write the texts back (``run_transcribe`` on the .xml with ``--out``); and apart, that batch request
   alone (the lines already cut, one warm client);
2. **separate, one at a time** -- the same line crops as 30 PNG files, one request after the other
   (``--concurrency 1``): what a script that loops over lines does;
3. **separate, concurrent** -- the same 30 files with the client's default concurrency (twice the
   daemon's largest batch), so the daemon batches them too.

Lines/s is lines divided by the best wall time of ``--repeats`` runs after a warm-up run. The page's
client-side preparation (parse + crop + PNG encode) is reported apart. ``--json PATH`` writes every number.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the synthetic page generator the archival tests use
sys.path.insert(0, str(REPO / "bench"))


def best_of(fn, repeats: int) -> tuple[float, list[float]]:
    runs = []
    for _ in range(repeats + 1):  # the first run warms shapes and the page cache
        t0 = time.perf_counter()
        fn()
        runs.append(round(time.perf_counter() - t0, 3))
    return min(runs[1:]), runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, help="model directory (default: the demo model, built if needed)")
    ap.add_argument("--gpu", default="cpu", help="gpu.select for the daemon (default: cpu)")
    ap.add_argument("--lines", type=int, default=30)
    ap.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--batch-window-ms", type=float, default=5.0)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    from archival_pages import make_page
    from bench_client import start_daemon, write_config

    from htrctl.archival import prepare
    from htrctl.client import HtrClient
    from htrctl.transcribe import TranscribeOptions, run_transcribe

    if args.model_dir is None:
        from htrctl.demo_model import build_demo_model

        args.model_dir = build_demo_model(REPO / ".cache" / "tests" / "demo-model")
    work = Path(tempfile.mkdtemp(prefix="htr-bench-archival-"))
    try:
        config = write_config(work, args)
        sock = work / "htr.sock"
        xml, _, _ = make_page(work / "page", "folio 1r", n_lines=args.lines, geometry="both", angle_deg=1.5)
        prepare(xml.read_bytes(), name=xml.name, xml_path=xml, replace=True)  # imports, page cache
        t0 = time.perf_counter()
        job = prepare(xml.read_bytes(), name=xml.name, xml_path=xml, replace=True)
        prep_s = time.perf_counter() - t0
        lines_dir = work / "lines"
        lines_dir.mkdir()
        for ln, png in zip(job.todo, job.crops):
            (lines_dir / f"{ln.id}.png").write_bytes(png)
        n = len(job.crops)
        print(f"model {args.model_dir}, device {args.gpu}, a {n}-line page, batch sizes {args.batch_sizes}, "
              f"max_new_tokens {args.max_new_tokens}", file=sys.stderr)

        def run(inputs, concurrency=0, out=None) -> None:
            if out is not None:
                shutil.rmtree(out, ignore_errors=True)
            s = run_transcribe(TranscribeOptions(inputs=inputs, sockets=[sock], fmt="jsonl", out_dir=out,
                                                 concurrency=concurrency, timeout=600, progress=False, quiet=True,
                                                 replace=True),
                               stdout=io.StringIO(), stderr=io.StringIO())
            if s.failed or s.exit_code:
                raise SystemExit(f"run failed: {s.to_dict()}")

        proc = start_daemon(config, sock, work / "htrd.log")
        try:
            page_s, page_runs = best_of(lambda: run([str(xml)], out=work / "out"), args.repeats)
            with HtrClient(sock, timeout=600) as client:
                req_s, req_runs = best_of(lambda: job.send(client, timeout=600, max_new_tokens=None), args.repeats)
            seq_s, seq_runs = best_of(lambda: run([str(lines_dir)], concurrency=1), args.repeats)
            conc_s, conc_runs = best_of(lambda: run([str(lines_dir)]), args.repeats)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "lines": n, "device": args.gpu, "batch_sizes": args.batch_sizes, "max_new_tokens": args.max_new_tokens,
        "page": {"seconds": page_s, "lines_per_s": n / page_s, "runs_s": page_runs,
                 "client_prepare_s": round(prep_s, 3)},
        "page_request_only": {"seconds": req_s, "lines_per_s": n / req_s, "runs_s": req_runs},
        "separate_sequential": {"seconds": seq_s, "lines_per_s": n / seq_s, "runs_s": seq_runs},
        "separate_concurrent": {"seconds": conc_s, "lines_per_s": n / conc_s, "runs_s": conc_runs},
    }
    print(f"page (one batch request):        {n / page_s:6.1f} lines/s  ({page_s:.2f} s; cutting the lines "
          f"{prep_s * 1000:.0f} ms of it)")
    print(f"  of which the batch request:    {n / req_s:6.1f} lines/s  ({req_s:.2f} s; the lines already cut)")
    print(f"separate images, one at a time:  {n / seq_s:6.1f} lines/s  ({seq_s:.2f} s)  -> page is "
          f"{seq_s / page_s:.2f}x")
    print(f"separate images, concurrent:     {n / conc_s:6.1f} lines/s  ({conc_s:.2f} s)  -> page is "
          f"{conc_s / page_s:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if all(math.isfinite(v) for v in (page_s, seq_s, conc_s)) else 1


if __name__ == "__main__":
    sys.exit(main())
