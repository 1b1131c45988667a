"""Benchmark: htrd with continuous batching against the same daemon with static batches, in one run.

    python bench/bench_serving.py --model-dir /tmp/m8b                 # GPU (8B-shaped model, bench/make_model_8b.py)
    python bench/bench_serving.py --cpu --model-dir /tmp/tiny8b --make-tiny --clients 4 --per-client 3

Real daemons, one after the other, on the same model and the same requests:
``static`` (``generation.continuous_batching: false``: a batch runs until its
longest line is done -- the engine before continuous batching),
``continuous`` (the default) and, with ``--engines static,continuous,mixed,threads,flash``,
``mixed`` (``generation.mixed_steps``: prompts prefilled inside the decode steps), ``threads``
(``limits.preprocess_workers: 0``: the images decoded and preprocessed in threads of htrd's own process, under
its GIL, instead of worker processes), ``flash`` (``generation.decode_attention: flash``: the decode steps'
attention through flash attention's kernel instead of the Triton one), ``slots64`` and ``slots128`` (64 or 128
slots instead of ``--batch-sizes``' 256 -- the shipped config's, where they fit), ``gcscan`` (the loaded heap
not frozen, ``HTRD_GC_FREEZE=0``: Python's full collections walk the model's ~0.4 M objects, see htrd.heap). Closed-loop clients (each sends its next line as
soon as the previous one is answered) over the Unix socket, in two modes:

- **fixed**: every line a 1200x160 image, exactly ``--new-tokens`` tokens;
- **realistic**: widths drawn from 300-2,000 px, heights 64-160 px, and output
  lengths from a fixed distribution over 5-120 tokens (20 % 5-20, 60 % 30-70,
  20 % 80-120), forced per request (``max_new_tokens`` per request with
  ``generation.min_new_tokens`` at the maximum, so random weights cannot stop early).

``--rounds 2`` runs every load again on the same daemons: round 1 pays for
capturing the CUDA graphs of every new prefill shape (lines of new sizes, a
first few minutes' cost), round 2 is what a daemon serving a collection all day
gets.

For each: lines/s, generated tokens/s, p50/p95 latency, the average number of
occupied slots per decode step (from ``/v1/status``) and, on a GPU, an MFU
estimate: FLOPs per line (2 x parameters x (prompt + new tokens), prompt tokens
from the model's own processor) / time / the bf16 matmul rate measured on the
same GPU in this run; and where the clients' requests were on average while every client was busy
(``/v1/status`` sampled every 100 ms: decoding in a slot, queued, elsewhere in htrd -- HTTP, decoding
and preprocessing the image, the answer on its way out -- or at the clients). Prints a table with
continuous/static ratios; ``--json``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Self

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import Daemon, GpuSampler, line_image, pct, py_spy, run_clients, stop_daemons_on_sigterm

logger = logging.getLogger("bench_serving")
REALISTIC_MAX_NEW = 120


def realistic_requests(n: int, seed: int = 1) -> list[tuple[int, int, int]]:
    """(width, height, new tokens) for *n* lines, deterministic."""
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        r = rnd.random()
        new = rnd.randint(5, 20) if r < 0.2 else rnd.randint(30, 70) if r < 0.8 else rnd.randint(80, 120)
        out.append((rnd.randint(300, 2000), rnd.randint(64, 160), new))
    return out


def encode(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def steady_window(released: float, first_answers: list[float], last_taken: float,
                  finished_at: list[float]) -> tuple[float, float, float | None]:
    """The steady part of a closed-loop load: from the moment every client has had its first answer (before,
    the daemon fills up: the burst of first requests is preprocessed, the first prefills run, nothing is
    answered yet -- 2-5 s on an H200 at 64-256 clients) until the last request is taken (after, the load
    drains with fewer and fewer clients). Returns (start, end, lines answered per second in it); where the
    load is too short to have one, (released, last_taken, None)."""
    start = max(first_answers, default=released)
    if not first_answers or start >= last_taken:
        return released, last_taken, None
    done = sum(1 for t in finished_at if start < t <= last_taken)
    return start, last_taken, done / (last_taken - start)


def closed_loop(socket_path: Path, work: list[tuple[bytes, int]], clients: int) -> dict:
    """*clients* threads take requests from *work* in order until it is empty. Besides the whole load's
    figures, the steady part's (:func:`steady_window`): its lines/s and its time span."""
    import httpx

    lock = threading.Lock()
    items = list(enumerate(work))
    finished_at: list[float] = []
    last_taken = [0.0]
    lat: list[float] = []
    tokens: list[int] = []
    errors: list[str] = []
    done_ids: list[int] = []
    first_answers: list[float] = []

    def client(start) -> None:  # a bench_generate.Release
        first = True
        transport = httpx.HTTPTransport(uds=str(socket_path))
        with httpx.Client(transport=transport, base_url="http://htr", timeout=900.0) as c:
            start.wait()
            while True:
                with lock:
                    if not items:
                        return
                    idx, (body, new) = items.pop(0)
                    if not items:
                        last_taken[0] = time.perf_counter()
                t = time.perf_counter()
                r = c.post("/v1/transcribe", content=body, headers={"Content-Type": "image/png"},
                           params={"max_new_tokens": new})
                dt = time.perf_counter() - t
                with lock:
                    finished_at.append(t + dt)
                    if first:
                        first_answers.append(t + dt)
                        first = False
                    if r.status_code == 200:
                        lat.append(dt)
                        tokens.append(r.json()["results"][0]["tokens"])
                        done_ids.append(idx)
                    else:
                        errors.append(f"{r.status_code} {r.text[:200]}")

    wall = run_clients(clients, client)
    released = time.perf_counter() - wall
    since, until, steady_rate = steady_window(released, first_answers if len(first_answers) == clients else [],
                                              last_taken[0], finished_at)
    # Lines answered in each second of the load: a slow start (first shapes, the pool's first images), a
    # drain, or waves (lines that joined together leaving together) show here, not in the averages.
    per_second = [0] * (int(wall) + 1)
    for t in finished_at:
        per_second[min(len(per_second) - 1, max(0, int(t - released)))] += 1
    return {"clients": clients, "requests": len(lat), "n_errors": len(errors), "errors": errors[:3],
            "per_second": per_second,
            "released_at": released, "first_answer_s": min(first_answers, default=released) - released,
            "steady_since": since, "steady_until": until, "steady_s": until - since if steady_rate else None,
            "steady_lines_per_s": steady_rate,
            "wall_s": wall, "lines_per_s": len(lat) / wall, "tokens_per_s": sum(tokens) / wall,
            "tokens": sum(tokens), "p50_s": pct(lat, 0.5), "p95_s": pct(lat, 0.95), "done_ids": done_ids}


class WhereSampler:
    """Where the load's requests are, sampled from htrd's ``/v1/status`` every *period_s* while the load runs:
    decoding (slots occupied), queued for a slot, elsewhere in htrd (accepted, not queued nor decoding: HTTP,
    image decoding, preprocessing, the answer on its way out) and at the clients (between an answer and the
    next request, in the benchmark's process). Averaged over the samples taken while every client was busy
    (until the last request was taken; see closed_loop)."""

    def __init__(self, socket_path: Path, clients: int, period_s: float = 0.1) -> None:
        self.socket_path, self.clients, self.period_s = socket_path, clients, period_s
        self.samples: list[tuple[float, int, int, int]] = []  # (time, in flight, queued, decoding)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import httpx

        transport = httpx.HTTPTransport(uds=str(self.socket_path))
        with httpx.Client(transport=transport, base_url="http://htr", timeout=30) as c:
            while True:  # a sample at once, then one per period until stopped
                try:
                    st = c.get("/v1/status").json()
                    self.samples.append((time.perf_counter(), int(st.get("in_flight") or 0),
                                         int(st.get("queue_depth") or 0),
                                         int((st.get("engine") or {}).get("slots_occupied") or 0)))
                except (httpx.HTTPError, ValueError):
                    pass
                if self._stop.wait(self.period_s):
                    return

    def averages(self, since: float, until: float) -> dict | None:
        """Over the samples from *since* to *until* (the steady part); over the whole load where that part
        holds fewer than 3 (a short load); None without samples."""
        got, over = [s for s in self.samples if since <= s[0] <= until], "steady part"
        if len(got) < 3:
            got, over = self.samples, "whole load"
        if not got:
            return None
        n = len(got)
        flight, queued, decoding = (sum(s[i] for s in got) / n for i in (1, 2, 3))
        return {"samples": n, "over": over, "decoding": round(decoding, 1), "queued": round(queued, 1),
                "elsewhere_in_htrd": round(max(0.0, flight - queued - decoding), 1),
                "at_clients": round(max(0.0, self.clients - flight), 1)}


def _get(socket_path: Path, path: str):
    """GET *path* from the htrd at *socket_path* (outside a load: one client each)."""
    import httpx

    with httpx.Client(transport=httpx.HTTPTransport(uds=str(socket_path)), base_url="http://htr", timeout=30) as c:
        return c.get(path)


def status(socket_path: Path) -> dict:
    return _get(socket_path, "/v1/status").json()


def gc_pauses(socket_path: Path) -> dict:
    """htrd's garbage-collection pauses so far (``htrd_gc_pause_seconds`` of ``/metrics``, every generation):
    count, total seconds, and how many lasted over 0.1 s."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {"count": 0.0, "total_s": 0.0, "over_100ms": 0.0}
    for family in text_string_to_metric_families(_get(socket_path, "/metrics").text):
        if family.name != "htrd_gc_pause_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_count"):
                out["count"] += sample.value
                out["over_100ms"] += sample.value
            elif sample.name.endswith("_sum"):
                out["total_s"] += sample.value
            elif sample.name.endswith("_bucket") and float(sample.labels["le"]) == 0.1:
                out["over_100ms"] -= sample.value
    return out


def gc_delta(after: dict, before: dict) -> dict:
    return {k: round(after[k] - before[k], 3) for k in after}


def bf16_peak_tflops(device: str) -> float | None:
    """The bf16 matmul rate on this GPU now (8192^3, best of 20), in TFLOP/s."""
    if device == "cpu":
        return None
    import torch

    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        torch.cuda.synchronize()
        best = min(best, s.elapsed_time(e) / 1000.0)
    del a, b
    torch.cuda.empty_cache()
    return 2 * 8192**3 / best / 1e12


def model_params(model_dir: Path) -> int:
    from htrctl.modeldir import model_footprint

    fp = model_footprint(model_dir, "auto")
    base = fp["parts"].get("merged") or fp["parts"].get("base") or fp["weights_bytes"]
    cfg = json.loads((model_dir / "config.json").read_text())
    dtype = (cfg.get("text_config") or {}).get("dtype") or cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"
    return base // (4 if "32" in str(dtype) else 2)


def prompt_lengths(model_dir: Path, images: list, prompt: str) -> list[int]:
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    cache: dict = {}
    out = []
    for img in images:
        key = img.size
        if key not in cache:
            cache[key] = int(proc(text=[text], images=[img.convert("RGB")], return_tensors="pt")["input_ids"].shape[1])
        out.append(cache[key])
    return out


# The engines --engines names: the generation (and limits) settings each daemon gets on top of the shipped ones.
ENGINES = {
    "static": {"generation": {"continuous_batching": False}},  # a batch runs until its longest line is done
    "continuous": {"generation": {"continuous_batching": True}},  # the shipped config
    # prompts prefilled inside the decode steps
    "mixed": {"generation": {"continuous_batching": True, "mixed_steps": True}},
    # the preprocessing in threads of htrd's process (under its GIL), not worker processes
    "threads": {"generation": {"continuous_batching": True}, "limits": {"preprocess_workers": 0}},
    # the decode steps' attention through flash attention's variable-length kernel, not Triton's (htrd.attention)
    "flash": {"generation": {"continuous_batching": True, "decode_attention": "flash"}},
    # other slot counts than --batch-sizes' largest (the KV cache: slots x max_cache_len x 147 KiB on the 8B model)
    "slots64": {"generation": {"continuous_batching": True}, "limits": {"batch_sizes": [1, 2, 4, 8, 16, 32, 64]}},
    "slots128": {"generation": {"continuous_batching": True},
                 "limits": {"batch_sizes": [1, 2, 4, 8, 16, 32, 64, 128]}},
    # the loaded heap not frozen (htrd.heap): Python's full collections walk the whole model's objects again
    "gcscan": {"generation": {"continuous_batching": True}, "env": {"HTRD_GC_FREEZE": "0"}},
}


def write_config(path: Path, args, socket_path: Path, *, engine: str, min_new: int, max_new: int) -> None:
    import yaml

    cfg = {
        "model": {"dir": str(args.model_dir), "variant": "auto", "dtype": "auto", "verify_on_start": "off"},
        "gpu": {"select": "cpu" if args.cpu else args.gpu_select},
        "socket": {"path": str(socket_path), "group": None, "mode": 0o660},
        "limits": {"queue_length": max(1024, 4 * max(args.clients)), "request_deadline_s": 900.0,
                   "batch_sizes": list(args.batch_sizes), **ENGINES[engine].get("limits", {})},
        "generation": {"max_new_tokens": max_new, "min_new_tokens": min_new, **ENGINES[engine]["generation"],
                       "max_cache_len": args.max_cache_len, "compile": not args.no_compile,
                       "compile_cache_dir": str(Path(args.state_dir) / "compile-cache"),
                       "prefill_chunk": args.prefill_chunk, "prefill_tokens": args.prefill_tokens,
                       "join_wait_ms": args.join_wait_ms},
        "watchdog": {"generate_timeout_s": 900.0},
        "log": {"level": "INFO"},
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def rounds(workloads: dict, n: int):
    """((mode, clients, round), requests) for every load of every round: round 1 of each load, then round 2...
    A later round sends the same requests to a daemon that has seen their shapes (every prefill graph captured):
    what a server serving a collection all day gets."""
    for rnd in range(1, n + 1):
        for (mode, clients), work in workloads.items():
            yield (mode, clients, rnd), work


def load_key(mode: str, clients: int, rnd: int = 1) -> str:
    return f"{mode}@{clients}" + (f" round {rnd}" if rnd > 1 else "")


def run_engine(args, name: str, workloads: dict, work_dir: Path) -> dict:
    import os

    sock = work_dir / f"{name}.sock"
    cfg = work_dir / f"{name}.yaml"
    max_new = max(REALISTIC_MAX_NEW, args.new_tokens)
    write_config(cfg, args, sock, engine=name, min_new=max_new, max_new=max_new)
    env = dict(os.environ, HTR_CONFIG=str(cfg), **ENGINES[name].get("env", {}))
    d = Daemon(cfg, sock, work_dir / f"{name}.log", env)
    res: dict = {"engine": name}
    res["ready_s"] = d.start(args.timeout)
    try:
        if args.settle:  # a daemon that sat idle after READY: it captures prefill graphs ahead of need meanwhile
            time.sleep(args.settle)
            res["precaptured_before_load"] = status(sock)["engine"].get("prefill_precaptured")
        for (mode, clients, rnd), work in rounds(workloads, args.rounds):
            before_all = status(sock)
            before = before_all["engine"]
            gc_before = gc_pauses(sock)
            spy = args.profile / f"spy-{name}-{mode}{clients}-{rnd}.txt" if args.profile else None
            with py_spy(d.proc.pid, spy), GpuSampler() as gpu, WhereSampler(sock, clients) as where:
                r = closed_loop(sock, work, clients)
            r["where"] = where.averages(r["steady_since"], r["steady_until"])  # the steady part's requests
            r["gpu_busy_pct"] = gpu.busy().get(0)  # the daemon's GPU (gpu.select), as NVML counts kernels running
            r["gpu_busy_steady_pct"] = gpu.busy(r["steady_since"], r["steady_until"]).get(0)
            after_all = status(sock)
            after = after_all["engine"]
            r["gc_pauses"] = gc_delta(gc_pauses(sock), gc_before)  # the load's garbage collections (htrd.heap)
            prefills = after_all["counters"]["batches"] - before_all["counters"]["batches"]
            r["avg_prefill_lines"] = ((after_all["counters"]["images"] - before_all["counters"]["images"]) / prefills
                                      if prefills else None)  # lines per prefill group (generation.join_wait_ms)
            steps = (after["decode_steps"] or 0) - (before["decode_steps"] or 0)
            occ = (after["occupied_slot_steps"] or 0) - (before["occupied_slot_steps"] or 0)
            r["avg_occupied_slots"] = occ / steps if steps else None
            checks = (after.get("decode_checks") or 0) - (before.get("decode_checks") or 0)
            r["steps_per_check"] = steps / checks if checks else None  # decode steps per wait for the GPU
            # the GPU's idle time between a host check and the next launch, while lines ran (seconds)
            r["host_turnaround_s"] = ((after.get("turnaround_total_ms") or 0)
                                      - (before.get("turnaround_total_ms") or 0)) / 1000
            r["prefill_replays"] = (after.get("prefill_replays") or 0) - (before.get("prefill_replays") or 0)
            r["prefill_graphs"] = [after.get("prefill_graphs"), after.get("prefill_lm_graphs")]
            r.pop("done_ids")
            res[load_key(mode, clients, rnd)] = r
            logger.info("%s %s: %.1f lines/s (steady part: %.1f over %.1f s; first answer after %.1f s), p50 %.3f s, "
                        "p95 %.3f s, slots %.1f, "
                        "%.2f steps per check, GPU busy %.0f %% (NVML; steady part %.0f %%), idle at host turnarounds "
                        "%.1f %% of the load, %.1f lines per prefill, %d prefills replayed (graphs whole/LM part: %s); "
                        "GC pauses %s; the clients' requests on average (steady part): %s",
                        name, load_key(mode, clients, rnd), r["lines_per_s"], r["steady_lines_per_s"] or 0,
                        r["steady_s"] or 0, r["first_answer_s"],
                        r["p50_s"], r["p95_s"], r["avg_occupied_slots"] or 0, r["steps_per_check"] or 0,
                        r["gpu_busy_pct"] if r["gpu_busy_pct"] is not None else float("nan"),
                        r["gpu_busy_steady_pct"] if r["gpu_busy_steady_pct"] is not None else float("nan"),
                        100 * r["host_turnaround_s"] / r["wall_s"] if r.get("wall_s") else 0,
                        r["avg_prefill_lines"] or 0, r["prefill_replays"],
                        r["prefill_graphs"], r["gc_pauses"], r["where"])
            logger.info("%s %s: lines answered per second of the load: %s", name, load_key(mode, clients, rnd),
                        " ".join(map(str, r["per_second"])))
        res["status"] = status(sock)
    finally:
        res["exit_code"] = d.stop()
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--make-tiny", action="store_true", help="write the tiny 8B-layout model first (CPU smoke)")
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--gpu-select", default="0", help="the daemon's gpu.select (default: index 0)")
    ap.add_argument("--clients", default="64,256", help="fixed-mode client counts; realistic uses the first")
    ap.add_argument("--per-client", type=int, default=8, help="requests per client in each load")
    ap.add_argument("--new-tokens", type=int, default=50)
    ap.add_argument("--batch-sizes", default="1,2,4,8,16,32,64,128,256", help="limits.batch_sizes (the shipped "
                    "config's: as many slots as fit, up to 256)")
    ap.add_argument("--max-cache-len", type=int, default=1024, help="generation.max_cache_len (the shipped default)")
    ap.add_argument("--prefill-chunk", type=int, default=16)
    ap.add_argument("--prefill-tokens", type=int, default=512, help="generation.prefill_tokens (mixed steps' budget)")
    ap.add_argument("--join-wait-ms", type=float, default=30.0, help="generation.join_wait_ms (the shipped default)")
    ap.add_argument("--modes", default="fixed,realistic")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every load this many times on the same daemons (round 2 on: every shape seen before)")
    ap.add_argument("--engines", default="static,continuous",
                    help=f"comma-separated, run one after the other: {', '.join(ENGINES)} (mixed: continuous with "
                         "generation.mixed_steps; threads: continuous with the preprocessing in threads, "
                         "limits.preprocess_workers 0; flash: continuous with generation.decode_attention flash; "
                         "slots64, slots128: continuous with 64 or 128 slots; gcscan: continuous with the loaded "
                         "heap not frozen, HTRD_GC_FREEZE=0)")
    ap.add_argument("--settle", type=float, default=0.0,
                    help="seconds each daemon stays idle after READY before the first load (default 0: loads start "
                         "at READY; an idle daemon captures prefill graphs ahead of need)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--state-dir", default=None)
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--profile", type=Path, default=None,
                    help="sample htrd with py-spy during each load: raw stacks to DIR/spy-ENGINE-MODECLIENTS.txt")
    args = ap.parse_args(argv)
    stop_daemons_on_sigterm()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args.clients = [int(x) for x in args.clients.split(",")]
    args.batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    unknown = [e for e in args.engines.split(",") if e not in ENGINES]
    if unknown:
        ap.error(f"--engines: unknown {', '.join(unknown)} (known: {', '.join(ENGINES)})")
    args.state_dir = args.state_dir or tempfile.mkdtemp(prefix="htrbs-state-")
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.cpu else "cuda:0"
    if args.make_tiny:
        import subprocess

        subprocess.run([sys.executable, str(Path(__file__).parent / "make_model_8b.py"), str(args.model_dir),
                        "--tiny"], check=True)
    prompt = "Transcribe the handwritten text in this image exactly. Output only the text."
    peak = bf16_peak_tflops(device)
    params = model_params(args.model_dir)
    modes = args.modes.split(",")
    workloads: dict = {}
    flops: dict = {}
    if "fixed" in modes:
        img = line_image()
        body = encode(img)
        (plen,) = prompt_lengths(args.model_dir, [img], prompt)
        for c in args.clients:
            n = c * args.per_client
            workloads[("fixed", c)] = [(body, args.new_tokens)] * n
            flops[("fixed", c)] = 2 * params * (plen + args.new_tokens) * n
    if "realistic" in modes:
        c = args.clients[0]
        specs = realistic_requests(c * args.per_client)
        imgs = [line_image(w, h, seed=i) for i, (w, h, _) in enumerate(specs)]
        plens = prompt_lengths(args.model_dir, imgs, prompt)
        workloads[("realistic", c)] = [(encode(im), new) for im, (_, _, new) in zip(imgs, specs)]
        flops[("realistic", c)] = sum(2 * params * (p + new) for p, (_, _, new) in zip(plens, specs))
    work_dir = Path(tempfile.mkdtemp(prefix="htrbs-"))
    results = {"device": device, "bf16_peak_tflops": peak, "params": params, "engines": {}}
    if device != "cpu":
        import torch

        results["gpu"] = torch.cuda.get_device_name(0)
    for name in args.engines.split(","):
        results["engines"][name] = run_engine(args, name, workloads, work_dir)
    rows = [("| load | engine | lines/s | steady lines/s | tokens/s | p50 s | p95 s | p95/p50 | slots occupied | MFU | "
             "GPU busy (steady) |"), "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (mode, clients, rnd), _ in rounds(workloads, args.rounds):
        key = load_key(mode, clients, rnd)
        label = f"{mode} @ {clients} clients" + (f", round {rnd}" if rnd > 1 else "")
        for name, res in results["engines"].items():
            r = res[key]
            mfu = flops[(mode, clients)] / r["wall_s"] / (peak * 1e12) if peak else None
            r["mfu"] = mfu
            steady = f"{r['steady_lines_per_s']:.1f}" if r.get("steady_lines_per_s") else "-"
            rows.append(f"| {label} | {name} | {r['lines_per_s']:.1f} | {steady} | {r['tokens_per_s']:.0f} | {r['p50_s']:.3f} | "
                        f"{r['p95_s']:.3f} | {r['p95_s'] / r['p50_s']:.2f} | {r['avg_occupied_slots'] or 0:.1f} | "
                        + (f"{mfu:.1%}" if mfu is not None else "-") + " | "
                        + (f"{r['gpu_busy_pct']:.0f} % ({r['gpu_busy_steady_pct']:.0f} %)"
                           if r.get("gpu_busy_steady_pct") is not None else "-") + " |")
        for a, b in (("continuous", "static"), ("mixed", "static"), ("mixed", "continuous"), ("continuous", "threads"),
                     ("continuous", "flash"), ("continuous", "slots64"), ("continuous", "slots128"),
                     ("continuous", "gcscan")):
            if {a, b} <= set(results["engines"]):
                ra, rb = (results["engines"][e][key]["lines_per_s"] for e in (a, b))
                rows.append(f"| {label} | **{a} / {b}** | **{ra / rb:.2f}x** | | | | | | | | |")
    for name, res in results["engines"].items():
        rows.append(f"| start -> READY | {name} | {res['ready_s']:.1f} s | | | | | | | | |")
    for name, res in results["engines"].items():
        eng = (res.get("status") or {}).get("engine") or {}
        if eng.get("preprocess_ms_per_image") is not None:
            rows.append(f"| preprocessing per image, on average | {name} | {eng['preprocess_ms_per_image']:g} ms | "
                        f"{eng.get('preprocess_workers')} workers | | | | | | | |")
        if eng.get("decode_attention"):
            rows.append(f"| decode attention, slots | {name} | {eng['decode_attention']}, {eng.get('slots')} slots | "
                        "| | | | | | | |")
    for name, res in results["engines"].items():
        gpu = (res.get("status") or {}).get("gpu") or {}
        if gpu.get("memory_reserved_bytes"):  # at the end: every prefill graph it captured, on first sight or ahead
            eng = res["status"].get("engine") or {}
            rows.append(f"| GPU memory allocated / reserved at the end | {name} | "
                        f"{gpu['memory_allocated_bytes'] / 2**30:.1f} / {gpu['memory_reserved_bytes'] / 2**30:.1f} GiB "
                        f"({eng.get('prefill_packed_graphs')} LM + {eng.get('prefill_vision_graphs')} vision prefill "
                        f"graphs, {eng.get('prefill_precaptured')} captured ahead of need) | | | | | | | | |")
    head = f"device: {results.get('gpu', device)}; bf16 peak measured: " + (f"{peak:.0f} TFLOP/s" if peak else "-")
    print(head)
    print("\n".join(rows))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    bad = [n for n, r in results["engines"].items() if r["exit_code"] != 0 or any(
        isinstance(v, dict) and v.get("n_errors") for v in r.values())]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
