"""A bounded load generator for htrd: N requests from C concurrent clients over the Unix socket.

    .venv/bin/python bench/load.py --demo -n 10000 -c 64            # starts htrd on the demo model (CPU)
    .venv/bin/python bench/load.py --socket /run/htr/htr.sock -n 2000 -c 32 --images DIR

Each client is one keep-alive connection (httpx over the Unix socket, asyncio) that sends the next image
(round-robin over ``--images``, default the shipped line samples) as soon as its previous answer is in.
Every request ends in exactly one recorded outcome: an HTTP status, a transport error, or a client-side
timeout (``--timeout``, default the daemon's deadline + 30 s): nothing is dropped silently.

Printed (and written with ``--json PATH``): per-status counts, error types, latency p50/p95/p99/max,
throughput, the daemon's RSS sampled every 250 answers (from ``/proc/<pid>/status``; the pid comes from
``/v1/status``), and the RSS growth from the first to the last thousand answers. No assertions: the
reliability suite (tests/reliability/test_load.py) asserts on these figures.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "htrctl" / "data" / "samples"
RSS_EVERY = 250

# htrd settings for the demo model on a small CPU box: short answers, batches up to 16, a queue that
# holds every client's request (so 503 means a real refusal, not a too-small queue).
DEMO_CONFIG = {
    "gpu": {"select": "cpu"},
    "limits": {"batch_sizes": [1, 2, 4, 8, 16], "queue_length": 256, "batch_window_ms": 5.0,
               "request_deadline_s": 60.0, "drain_timeout_s": 30.0},
    "generation": {"max_new_tokens": 4},
    "watchdog": {"generate_timeout_s": 60.0},
    "log": {"level": "INFO"},
}


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def load_images(paths: list[str] | None) -> list[bytes]:
    files: list[Path] = []
    for p in paths or [str(SAMPLES)]:
        q = Path(p)
        files += sorted(x for x in q.rglob("*") if x.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif", ".tiff",
                                                                         ".webp")) if q.is_dir() else [q]
    if not files:
        raise SystemExit(f"no images in {paths}")
    # single-page images only: one request = one image
    return [f.read_bytes() for f in files if not f.name.endswith((".tif", ".tiff")) or "2p" not in f.name]


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    k = (len(sorted_values) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


async def _run(socket_path: str, n: int, concurrency: int, images: list[bytes], timeout: float,
               pid: int | None, progress: bool) -> dict:
    statuses: collections.Counter = collections.Counter()
    errors: collections.Counter = collections.Counter()
    latencies: list[float] = []
    rss: list[dict] = []
    next_index = 0
    answered = 0
    t_start = time.monotonic()
    if pid:
        rss.append({"answered": 0, "rss_mib": round((rss_kib(pid) or 0) / 1024, 1), "t": 0.0})

    async def client(k: int) -> None:
        nonlocal next_index, answered
        transport = httpx.AsyncHTTPTransport(uds=socket_path, retries=0)
        async with httpx.AsyncClient(transport=transport, base_url="http://htr", timeout=timeout) as c:
            while True:
                i = next_index
                if i >= n:
                    return
                next_index += 1
                body = images[i % len(images)]
                t0 = time.monotonic()
                try:
                    r = await c.post("/v1/transcribe", content=body, headers={"X-Request-Id": f"load-{i}"})
                    statuses[str(r.status_code)] += 1
                    if r.status_code != 200:
                        try:
                            errors[r.json()["error"]["type"]] += 1
                        except (ValueError, KeyError, TypeError):
                            errors["no envelope"] += 1
                except httpx.TimeoutException:
                    statuses["client timeout"] += 1
                except httpx.TransportError as exc:
                    statuses["transport error"] += 1
                    errors[type(exc).__name__] += 1
                latencies.append(time.monotonic() - t0)
                answered += 1
                if pid and (answered % RSS_EVERY == 0 or answered == n):
                    rss.append({"answered": answered, "rss_mib": round((rss_kib(pid) or 0) / 1024, 1),
                                "t": round(time.monotonic() - t_start, 2)})
                    if progress:
                        el = time.monotonic() - t_start
                        print(f"  {answered:>6}/{n}  {answered / el:6.1f} req/s  rss {rss[-1]['rss_mib']} MiB",
                              file=sys.stderr, flush=True)

    await asyncio.gather(*(client(k) for k in range(concurrency)))
    elapsed = time.monotonic() - t_start
    lat = sorted(latencies)

    def at(count: int) -> float | None:
        hit = [s["rss_mib"] for s in rss if s["answered"] >= count]
        return hit[0] if hit else None

    first_k = at(min(1000, n))
    last_k = rss[-1]["rss_mib"] if rss else None
    return {
        "requests": n, "concurrency": concurrency, "answered": answered, "seconds": round(elapsed, 2),
        "throughput_rps": round(n / elapsed, 2) if elapsed else None,
        "statuses": dict(sorted(statuses.items())), "error_types": dict(sorted(errors.items())),
        "latency_s": {"p50": _r(percentile(lat, 0.50)), "p95": _r(percentile(lat, 0.95)),
                      "p99": _r(percentile(lat, 0.99)), "max": _r(lat[-1] if lat else None),
                      "mean": _r(statistics.fmean(lat) if lat else None)},
        "client_timeout_s": timeout,
        "rss": rss,
        "rss_first_thousand_mib": first_k, "rss_last_mib": last_k,
        "rss_growth_pct": round(100.0 * (last_k - first_k) / first_k, 2) if first_k and last_k else None,
    }


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 4)


def run_load(socket_path: str | os.PathLike, n: int, concurrency: int, *, images: list[bytes] | None = None,
             timeout: float | None = None, progress: bool = False) -> dict:
    """Run the load against the daemon at *socket_path*; returns the figures (see the module docstring)."""
    sock = str(socket_path)
    with httpx.Client(transport=httpx.HTTPTransport(uds=sock), base_url="http://htr", timeout=30) as c:
        status = c.get("/v1/status").json()
    pid = status.get("pid")
    if pid and rss_kib(pid) is None:
        pid = None  # another host or pid namespace: no RSS
    imgs = images or load_images(None)
    if timeout is None:
        timeout = 90.0  # the daemon answers by its deadline (60 s in DEMO_CONFIG) or 504s
    result = asyncio.run(_run(sock, n, concurrency, imgs, timeout, pid, progress))
    result["daemon"] = {"pid": pid, "version": status.get("version"), "device": status.get("gpu", {}).get("device"),
                        "batch_sizes": status.get("batch_sizes"), "queue_capacity": status.get("queue_capacity")}
    with httpx.Client(transport=httpx.HTTPTransport(uds=sock), base_url="http://htr", timeout=30) as c:
        after = c.get("/v1/status").json()
    result["daemon"]["state_after"] = after.get("state")
    result["daemon"]["counters_after"] = after.get("counters")
    return result


def start_demo_daemon(workdir: Path, config: dict | None = None) -> tuple[subprocess.Popen, Path]:
    """htrd on the demo model (built/cached under .cache/tests), CPU, a socket in *workdir*; waits for ready."""
    sys.path[:0] = [str(REPO), str(REPO / "tests")]
    from helpers import wait_ready_states

    from htrctl.demo_model import build_demo_model

    model = build_demo_model(REPO / ".cache" / "tests" / "demo-model")
    sock = workdir / "htr.sock"
    cfg = json.loads(json.dumps(config or DEMO_CONFIG))
    cfg["model"] = {"dir": str(model), "verify_on_start": "quick"}
    cfg["socket"] = {"path": str(sock), "group": None, "mode": "0o660"}
    cfg_path = workdir / "htr.yaml"
    cfg_path.write_text(json.dumps(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HTR_")}
    log = open(workdir / "htrd.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "htrd", "--config", str(cfg_path)], stdout=log, stderr=log,
                            stdin=subprocess.DEVNULL, env=env, cwd=workdir)
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://htr", timeout=5) as c:
        try:
            wait_ready_states(c, proc, 300, workdir / "htrd.log", interval=0.2)
        except AssertionError as exc:  # exited, or not ready in time: the message and the log's end
            proc.kill()
            raise SystemExit(str(exc)) from None
    return proc, sock


def render(result: dict) -> str:
    lat = result["latency_s"]
    lines = [
        f"requests      {result['requests']} from {result['concurrency']} concurrent clients in {result['seconds']} s "
        f"({result['throughput_rps']} req/s)",
        f"answered      {result['answered']}",
        f"statuses      {result['statuses']}",
        f"error types   {result['error_types'] or '-'}",
        f"latency (s)   p50 {lat['p50']}  p95 {lat['p95']}  p99 {lat['p99']}  max {lat['max']}",
    ]
    if result.get("rss"):
        series = ", ".join(f"{s['answered']}:{s['rss_mib']}" for s in result["rss"][:: max(1, len(result['rss']) // 10)])
        lines.append(f"daemon RSS    {result['rss_first_thousand_mib']} MiB at 1000 answers -> {result['rss_last_mib']} "
                     f"MiB at the end ({result['rss_growth_pct']:+.2f} %)")
        lines.append(f"RSS series    (answers:MiB) {series}")
    lines.append(f"daemon after  {result['daemon'].get('state_after')}, counters {result['daemon'].get('counters_after')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", help="an htrd socket to load")
    where.add_argument("--demo", action="store_true", help="start htrd on the demo model (CPU) for the run")
    p.add_argument("-n", "--requests", type=int, default=10_000)
    p.add_argument("-c", "--concurrency", type=int, default=64)
    p.add_argument("--images", nargs="*", help="image files or directories (default: the shipped samples)")
    p.add_argument("--timeout", type=float, default=None, help="client-side limit per request (s)")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("-q", "--quiet", action="store_true")
    a = p.parse_args(argv)
    proc = None
    tmp = None
    try:
        if a.demo:
            tmp = tempfile.TemporaryDirectory(prefix="htr-load-")
            proc, sock = start_demo_daemon(Path(tmp.name))
        else:
            sock = Path(a.socket)
        result = run_load(sock, a.requests, a.concurrency, images=load_images(a.images) if a.images else None,
                          timeout=a.timeout, progress=not a.quiet)
        if a.demo:
            result["daemon"]["config"] = DEMO_CONFIG
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        if tmp is not None:
            tmp.cleanup()
    result["machine"] = {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)}
    print(render(result))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
