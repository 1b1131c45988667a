"""htrd on one GPU of a multi-GPU host: memory only on that GPU, time to READY, a 50-token request.

    source bench/device-env.sh
    python bench/make_model_8b.py /tmp/m8b                       # 8B-shaped random model
    python bench/htrd_gpu_check.py /tmp/m8b --gpu 1 --json $OUT/htrd_gpu.json
    python bench/htrd_gpu_check.py /tmp/m8b --gpu 1 --fast        # generation.static_cache: true

    python bench/htrd_gpu_check.py .cache/tests/demo-model --cpu  # the script itself, on a CPU

It starts a real ``htrd`` (``python -m htrd``) on a private socket, measures
spawn -> ``/v1/ready`` 200, sends one 1200x160 line image with
``max_new_tokens = min_new_tokens = 50`` (random weights would stop at any
token), and reads NVML: which GPUs hold memory of htrd's process. Then SIGTERM
and the exit code. Prints a JSON report; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # helpers.py: shared with the tests
from helpers import line_png, stop_process, wait_ready_states  # noqa: E402


def _nvml_gpus():
    """(UUID, handle) of every GPU of the host; NVML is initialised and shut down around the iteration."""
    import pynvml

    pynvml.nvmlInit()
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            uuid = pynvml.nvmlDeviceGetUUID(h)
            yield (uuid.decode() if isinstance(uuid, bytes) else uuid), h
    finally:
        pynvml.nvmlShutdown()


def nvml_process_memory(pid: int) -> dict[str, int]:
    """GPU UUID -> bytes used by *pid* (NVML), for every GPU of the host."""
    import pynvml

    return {uuid: sum(int(p.usedGpuMemory or 0) for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h)
                      if p.pid == pid) for uuid, h in _nvml_gpus()}


def nvml_used() -> dict[str, int]:
    """GPU UUID -> device memory used (all processes), for the before/after comparison."""
    import pynvml

    return {uuid: int(pynvml.nvmlDeviceGetMemoryInfo(h).used) for uuid, h in _nvml_gpus()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--gpu", default="1", help="gpu.select (default: index 1, the second GPU in PCI order)")
    ap.add_argument("--cpu", action="store_true", help="gpu.select: cpu (tests this script without a GPU)")
    ap.add_argument("--fast", action="store_true", help="generation.static_cache: true (htrd.fastgen)")
    ap.add_argument("--tokens", type=int, default=50)
    ap.add_argument("--batch-sizes", default="1,2,4,8", help="limits.batch_sizes (all are warmed before READY)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for READY")
    ap.add_argument("--json", type=Path, help="also write the report here")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="htrd-gpu-"))
    sock = work / "htrd.sock"
    cfg = {
        "model": {"dir": str(args.model_dir.resolve()), "verify_on_start": "quick"},
        "gpu": {"select": "cpu" if args.cpu else str(args.gpu)},
        "socket": {"path": str(sock), "group": None},
        "limits": {"batch_sizes": [int(b) for b in args.batch_sizes.split(",")], "request_deadline_s": 600.0},
        "generation": {"max_new_tokens": args.tokens, "min_new_tokens": args.tokens, "static_cache": args.fast},
        "watchdog": {"generate_timeout_s": 900.0},
    }
    (work / "htr.yaml").write_text(json.dumps(cfg))
    log = work / "htrd.log"
    import httpx

    report: dict = {"config": cfg, "checks": {}}
    before = {} if args.cpu else nvml_used()
    t0 = time.monotonic()
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "htrd", "--config", str(work / "htr.yaml")],
                                stdout=err, stderr=err, stdin=subprocess.DEVNULL, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    client = httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://htr", timeout=600)
    try:
        try:
            states = wait_ready_states(client, proc, args.timeout, log, since=t0)
        except AssertionError as exc:  # exited, or not ready in time: the message and the log's end
            raise SystemExit(str(exc)) from None
        report["start_to_ready_s"] = round(time.monotonic() - t0, 2)
        report["states"] = states
        status = client.get("/v1/status").json()
        report["status_at_ready"] = status
        png = line_png()
        latencies = []
        for _ in range(3):
            t1 = time.perf_counter()
            r = client.post("/v1/transcribe", content=png)
            latencies.append(round(time.perf_counter() - t1, 3))
            r.raise_for_status()
        res = r.json()["results"][0]
        report["request_latency_s"] = latencies
        report["tokens"] = res["tokens"]
        report["generate_ms"] = round(res["timings"]["generate_ms"], 1)
        report["checks"]["50_tokens_generated"] = res["tokens"] == args.tokens
        if not args.cpu:
            mem = nvml_process_memory(proc.pid)
            report["nvml_process_memory_bytes"] = mem
            after = nvml_used()
            delta = {u: after[u] - before.get(u, 0) for u in after}
            report["nvml_used_delta_bytes"] = delta
            chosen = status["gpu"]["uuid"]
            if any(mem.values()):
                ok = mem.get(chosen, 0) > 0 and all(v == 0 for u, v in mem.items() if u != chosen)
            else:  # NVML shows host pids (containers): judge by the growth of each GPU's used memory
                ok = delta.get(chosen, 0) > 2**30 and all(v < 256 * 2**20 for u, v in delta.items() if u != chosen)
            report["checks"]["memory_only_on_configured_gpu"] = ok
            report["checks"]["status_device_cuda0"] = status["gpu"]["device"] == "cuda:0"
        report["metrics_excerpt"] = [l for l in client.get("/metrics").text.splitlines()
                                     if l.startswith(("htrd_gpu_memory_bytes", "htrd_load_seconds", "htrd_warmup_seconds",
                                                      "htrd_generation_tokens_per_second"))]
    finally:
        client.close()
        stop_process(proc, 120)
    report["exit_code"] = proc.returncode
    report["checks"]["sigterm_exit_0"] = proc.returncode == 0
    report["log_tail"] = log.read_text(errors="replace").splitlines()[-25:]
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0 if all(report["checks"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
