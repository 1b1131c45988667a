"""Benchmark: the naive generation path against htrd, in one run on one device.

    python bench/bench_generate.py --cpu                      # smoke run on the demo model (CPU)
    python bench/bench_generate.py --model-dir /tmp/m8b --make-model   # GPU, 8B-shaped random model

(a) **naive** -- what the incident's fix arrived at: ``from_pretrained`` base +
``PeftModel.from_pretrained`` adapter + ``generate``, one request at a time
(in a subprocess, so its GPU memory is gone before the daemon starts). The
same worker then merges the adapter and runs :class:`htrd.fastgen.FastGenerator`
in-process on the same weights and images, to compare greedy tokens with (a)
and to time the fast path without HTTP.

(b) **htrd** -- a real daemon subprocess with a config written here, reached
through its Unix socket by N concurrent client threads (httpx over UDS):
time to READY (cold, then a restart with warm caches), the first request after
READY, steady single-client latency, N-client throughput, peak GPU memory
(NVML, whole device) and the daemon's own ``/v1/status``.

Every request is a 1200x160 text-line image and generates exactly
``--new-tokens`` tokens (random weights emit EOS early, so EOS is suppressed
until then: ``min_new_tokens`` for naive ``generate``,
``generation.min_new_tokens`` in the daemon's config). Prints a table and
the (b)/(a) ratios on stdout; ``--json PATH`` writes everything.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

logger = logging.getLogger("bench")
REPO = Path(__file__).resolve().parents[1]
PROMPT = "Transcribe the handwritten text in this image exactly. Output only the text."


# --------------------------------------------------------------------------- inputs
def line_image(width: int = 1200, height: int = 160, seed: int = 0):
    """A synthetic handwritten-looking text line (strokes and letters), deterministic."""
    import random

    from PIL import Image, ImageDraw, ImageFont

    rnd = random.Random(seed)
    img = Image.new("L", (width, height), 235)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=int(height * 0.45))
    x = 20
    words = ["In", "principio", "erat", "verbum", "et", "verbum", "erat", "apud", "deum", "hoc", "erat"]
    while x < width - 120:
        w = rnd.choice(words)
        draw.text((x, height * 0.25 + rnd.uniform(-6, 6)), w, fill=rnd.randint(10, 60), font=font)
        x += int(font.getlength(w)) + rnd.randint(18, 40)
    for _ in range(12):
        x0 = rnd.uniform(0, width)
        draw.line([(x0, rnd.uniform(0, height)), (x0 + rnd.uniform(-30, 30), rnd.uniform(0, height))], fill=120)
    return img.convert("RGB")


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


# ------------------------------------------------------------------ GPU sampler (memory, utilization)
class GpuSampler:
    """Peak used memory of each visible GPU (NVML), sampled every 50 ms in a thread, and how busy each was:
    NVML's utilization (the share of its last sample period in which a kernel ran), averaged."""

    def __init__(self) -> None:
        self.peak: dict[int, int] = {}
        self.util: dict[int, list[tuple[float, int]]] = {}  # (time.perf_counter(), %) per GPU
        self.names: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            for i, h in enumerate(self._handles):
                name = pynvml.nvmlDeviceGetName(h)
                self.names[i] = name.decode() if isinstance(name, bytes) else name
        except Exception:  # noqa: BLE001 -- no NVIDIA driver (CPU mode): no samples
            self._nvml = None
            self._handles = []

    def used(self) -> dict[int, int]:
        return {i: int(self._nvml.nvmlDeviceGetMemoryInfo(h).used) for i, h in enumerate(self._handles)}

    def reset(self) -> None:
        self.peak = self.used() if self._handles else {}
        self.util = {}

    def busy(self, since: float | None = None, until: float | None = None) -> dict[int, float]:
        """Each GPU's mean utilization (%) over the samples taken between *since* and *until*
        (``time.perf_counter()``; default: all of them)."""
        out = {}
        for i, v in self.util.items():
            u = [x for t, x in v if (since is None or t >= since) and (until is None or t <= until)]
            if u:
                out[i] = sum(u) / len(u)
        return out

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            for i, u in self.used().items():
                self.peak[i] = max(self.peak.get(i, 0), u)
            now = time.perf_counter()
            for i, h in enumerate(self._handles):
                self.util.setdefault(i, []).append((now, int(self._nvml.nvmlDeviceGetUtilizationRates(h).gpu)))

    def __enter__(self) -> GpuSampler:
        if self._handles:
            self.reset()
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()


# ------------------------------------------------------------------------ (a) naive
def naive_worker(args) -> dict:
    """Runs in a subprocess: the naive path, then the fast path on the same (merged) weights."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    if args.compile and args.device.startswith("cuda"):
        from htrd.fastgen import configure_compile_cache

        configure_compile_cache(Path(args.state_dir or tempfile.mkdtemp(prefix="htrb-state-")) / "compile-cache")
    import torch
    from peft import PeftModel
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    from htrd.fastgen import FastGenerator

    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(args.device)  # synchronize() and streams below act on this GPU
    dtype = torch.bfloat16 if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model_dir = Path(args.model_dir)
    res: dict = {"device": args.device}
    if cuda:
        res["gpu"] = torch.cuda.get_device_name(args.device)
    img = line_image()
    new = args.new_tokens

    t0 = time.perf_counter()
    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    base = Qwen3VLForConditionalGeneration.from_pretrained(
        model_dir, dtype=dtype, local_files_only=True, use_safetensors=True, device_map={"": args.device}
    )
    model = PeftModel.from_pretrained(base, model_dir / "final_model", local_files_only=True).eval()
    sync()
    res["naive_load_s"] = time.perf_counter() - t0
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    lat, tokens = [], None
    for i in range(args.naive_requests + 1):  # +1: the first generate after load (CUDA warm-up), reported apart
        sync()
        t = time.perf_counter()
        enc = processor(text=[text], images=[img], return_tensors="pt").to(args.device)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        sync()
        dt = time.perf_counter() - t
        if i == 0:
            res["naive_first_s"] = dt
            tokens = out[0, enc["input_ids"].shape[1] :].tolist()
            res["prompt_tokens"] = int(enc["input_ids"].shape[1])
        else:
            lat.append(dt)
    res["naive_lat_s"] = lat
    res["naive_tokens"] = tokens
    if cuda:
        res["naive_peak_alloc_bytes"] = torch.cuda.max_memory_allocated()

    # ---- the fast path, in-process, on the same weights merged
    t0 = time.perf_counter()
    merged = model.merge_and_unload().eval()
    del model, base
    res["fast_merge_s"] = time.perf_counter() - t0
    # HF generate on the merged weights: tells bf16 merge rounding apart from fast-path differences.
    enc = processor(text=[text], images=[img], return_tensors="pt").to(args.device)
    with torch.inference_mode():
        out = merged.generate(**enc, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    res["merged_hf_tokens"] = out[0, enc["input_ids"].shape[1] :].tolist()
    t0 = time.perf_counter()
    fast = FastGenerator(
        merged,
        processor,
        prompt=args.prompt,
        batch_sizes=args.batch_sizes,
        max_cache_len=args.max_cache_len,
        max_new_tokens=new,
        compile=args.compile and cuda,
    )
    res["fast_init_s"] = time.perf_counter() - t0
    warm = fast.warmup(img, max_new_tokens=new)
    res["fast_warmup_s"] = warm["warmup_s"]
    prep = fast.prepare(img)
    lat = []
    for _ in range(args.naive_requests * 2):
        sync()
        t = time.perf_counter()
        p = fast.prepare(img)
        g = fast.generate([p], max_new_tokens=new, min_new_tokens=new)[0]
        sync()
        lat.append(time.perf_counter() - t)
    res["fast_b1_lat_s"] = lat
    res["fast_tokens"] = g.token_ids
    res["fast_prefill_ms_b1"] = g.stats.get("prefill_ms")
    res["fast_step_ms_b1"] = g.stats["decode_ms"] / max(1, len(g.token_ids) - 1)
    same = 0
    for a, b in zip(tokens, g.token_ids):
        if a != b:
            break
        same += 1
    res["tokens_equal_prefix"] = same
    res["tokens_compared"] = min(len(tokens), len(g.token_ids))
    res["merged_hf_equal_prefix_vs_naive"] = _common_prefix(tokens, res["merged_hf_tokens"])
    res["fast_equal_prefix_vs_merged_hf"] = _common_prefix(res["merged_hf_tokens"], g.token_ids)
    big = max(args.batch_sizes)
    for b in sorted({big, *[x for x in args.batch_sizes if x in (8, 16, 32)]}):
        sync()
        t = time.perf_counter()
        outs = fast.generate([prep] * b, max_new_tokens=new, min_new_tokens=new)
        sync()
        dt = time.perf_counter() - t
        res[f"fast_b{b}_s"] = dt
        res[f"fast_b{b}_prefill_ms"] = outs[0].stats.get("prefill_ms")
        res[f"fast_b{b}_step_ms"] = outs[0].stats["decode_ms"] / max(1, len(outs[0].token_ids) - 1)
        res[f"fast_b{b}_rows_equal_b1"] = sum(o.token_ids == g.token_ids for o in outs)
    if cuda:
        res["fast_peak_alloc_bytes"] = torch.cuda.max_memory_allocated()
    return res


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def run_naive(args) -> dict:
    cmd = [sys.executable, __file__, "--worker", "naive", "--model-dir", str(args.model_dir), "--device", args.device,
           "--new-tokens", str(args.new_tokens), "--naive-requests", str(args.naive_requests),
           "--prompt", args.prompt, "--max-cache-len", str(args.max_cache_len),
           "--batch-sizes", ",".join(map(str, args.batch_sizes))]
    if not args.compile:
        cmd.append("--no-compile")
    if args.state_dir:
        cmd += ["--state-dir", str(args.state_dir)]
    logger.info("(a) naive path + in-process fast path: %s", " ".join(cmd[2:]))
    with GpuSampler() as gpu:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        raise SystemExit(f"naive worker failed with exit code {proc.returncode}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["naive_phase_gpu_peak_used_bytes"] = gpu.peak
    return res


# ------------------------------------------------------------------------ (b) htrd
def write_config(path: Path, args, socket_path: Path, state_dir: Path) -> None:
    import yaml

    cfg = {
        "model": {"dir": str(args.model_dir), "variant": "auto", "dtype": "auto", "verify_on_start": "off"},
        "gpu": {"select": "cpu" if args.device == "cpu" else args.gpu_select},
        "socket": {"path": str(socket_path), "group": None, "mode": 0o660},
        "limits": {
            "queue_length": max(1024, 4 * args.clients),
            "request_deadline_s": 600.0,
            "batch_sizes": list(args.batch_sizes),
            "batch_window_ms": args.batch_window_ms,
            "max_images_per_request": 256,
        },
        "generation": {
            "prompt": args.prompt,
            "max_new_tokens": args.new_tokens,
            "min_new_tokens": args.new_tokens,
            "static_cache": "auto" if not args.daemon_naive else False,
            "max_cache_len": args.max_cache_len,
        },
        "watchdog": {"generate_timeout_s": 600.0},
        "log": {"level": "INFO"},
    }
    cfg["generation"]["compile"] = bool(args.compile)
    cfg["generation"]["compile_cache_dir"] = str(state_dir / "compile-cache")
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def stop_daemons_on_sigterm() -> None:
    """SIGTERM (``timeout``, a CI job's end) raises SystemExit in the main thread, so the benchmark's
    ``finally`` blocks stop the htrd processes it started: they run in sessions of their own and would
    otherwise outlive it, holding the GPU for whatever runs next."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def ready_split(engine: dict) -> str:
    """Where start -> READY went, from /v1/status's engine: loading, decode-graph capture, the rest of warm-up."""
    load, warm, graphs = engine.get("load_s"), engine.get("warmup_s"), engine.get("warmup_graphs_s")
    parts = []
    if load is not None:
        parts.append(f"load {load:.1f} s")
    if warm is not None and graphs is not None:
        parts.append(f"{engine.get('warmup_graphs')} decode graphs {graphs:.1f} s")
        parts.append(f"prefills and the rest of warm-up {warm - graphs:.1f} s")
    elif warm is not None:
        parts.append(f"warm-up {warm:.1f} s")
    return ", ".join(parts) or "-"


class Daemon:
    def __init__(self, cfg: Path, socket_path: Path, log_path: Path, env: dict) -> None:
        self.cfg, self.socket_path, self.log_path, self.env = cfg, socket_path, log_path, env
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float) -> float:
        """Start htrd; return seconds from spawn to /v1/ready == 200."""
        import httpx

        self.socket_path.unlink(missing_ok=True)
        log = open(self.log_path, "ab")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from htrd.app import main; sys.exit(main())", "--config", str(self.cfg)],
            stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
        )
        log.close()
        deadline = t0 + timeout
        transport = httpx.HTTPTransport(uds=str(self.socket_path))
        with httpx.Client(transport=transport, base_url="http://htr", timeout=5.0) as c:
            while time.perf_counter() < deadline:
                if self.proc.poll() is not None:
                    raise SystemExit(f"htrd exited with code {self.proc.returncode} before READY; log: {self.log_path}"
                                     f", its end:\n{self.log_tail()}")
                if self.socket_path.exists():
                    try:
                        if c.get("/v1/ready").status_code == 200:
                            return time.perf_counter() - t0
                    except httpx.TransportError:
                        pass
                threading.Event().wait(0.05)
        raise SystemExit(f"htrd not READY within {timeout:.0f} s; log: {self.log_path}, its end:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        """The last *lines* of the daemon's log (what a failed start says; the log may be on a lent machine)."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"(unreadable: {exc})"

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def _nvidia_smi() -> str | None:
    """Per-GPU and per-process memory while htrd runs (which GPU the daemon really uses)."""
    if shutil.which("nvidia-smi") is None:
        return None
    out = []
    for q in (["--query-gpu=index,uuid,name,memory.used,memory.total", "--format=csv"],
              ["--query-compute-apps=pid,gpu_uuid,used_memory", "--format=csv"]):
        r = subprocess.run(["nvidia-smi", *q], capture_output=True, text=True, timeout=30)
        out.append(r.stdout.strip())
    return "\n".join(out)


def client_requests(socket_path: Path, body: bytes, n: int, lat: list, errors: list, new_tokens: int,
                    start: Release) -> None:
    import httpx

    transport = httpx.HTTPTransport(uds=str(socket_path))
    with httpx.Client(transport=transport, base_url="http://htr", timeout=600.0) as c:
        start.wait()
        for _ in range(n):
            t = time.perf_counter()
            r = c.post("/v1/transcribe", content=body, headers={"Content-Type": "image/png"},
                       params={"max_new_tokens": new_tokens})
            dt = time.perf_counter() - t
            if r.status_code == 200:
                lat.append(dt)
            else:
                errors.append(f"{r.status_code} {r.text[:200]}")


class Release:
    """What ``client(start)`` waits on: :meth:`wait` counts the client as set up (its HTTP client built), then
    blocks until the release. :func:`run_clients` releases only once every client is set up -- building an
    httpx client takes ~20-55 ms of the GIL (its TLS context), so 256 clients released while still building
    theirs trickled their first requests out over ~6 s: the "slow start" of earlier 256-client loads was
    this benchmark's, not htrd's."""

    def __init__(self, n: int) -> None:
        self.n, self.ready = n, 0
        self._cond = threading.Condition()
        self._go = threading.Event()

    def wait(self) -> None:
        with self._cond:
            self.ready += 1
            self._cond.notify_all()
        self._go.wait()

    def all_ready(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.ready >= self.n, timeout)

    def set(self) -> None:
        self._go.set()


def run_clients(n: int, client, release_at: float | None = None, setup_timeout: float = 300.0) -> float:
    """Start *n* threads running ``client(start)`` (each sets up, then waits on ``start.wait()``, a
    :class:`Release`), release them together once all are set up -- at the wall-clock time *release_at* if given
    (clients in several processes released together) -- and return the wall time from the release until the
    last one ends."""
    start = Release(n)
    threads = [threading.Thread(target=client, args=(start,), daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    if not start.all_ready(setup_timeout):
        logger.warning("only %d of %d clients set up within %.0f s: released anyway", start.ready, n, setup_timeout)
    if release_at is not None:
        time.sleep(max(0.0, release_at - time.time()))
    t0 = time.perf_counter()
    start.set()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def load(socket_path: Path, body: bytes, clients: int, per_client: int, new_tokens: int) -> dict:
    lat: list[float] = []
    errors: list[str] = []
    wall = run_clients(clients, lambda start: client_requests(socket_path, body, per_client, lat, errors,
                                                               new_tokens, start))
    return {"clients": clients, "requests": len(lat), "errors": errors[:5], "n_errors": len(errors),
            "wall_s": wall, "lines_per_s": len(lat) / wall if wall else 0.0,
            "p50_s": pct(lat, 0.5), "p95_s": pct(lat, 0.95)}


@contextlib.contextmanager
def py_spy(pid: int, out: Path | None):
    """Sample htrd (every thread, idle ones too) with py-spy while the block runs; raw collapsed stacks to *out*."""
    exe = shutil.which("py-spy") if out else None
    if out and exe is None:
        logger.warning("--profile-load: py-spy is not on PATH; not profiling")
    if exe is None:
        yield
        return
    proc = subprocess.Popen([exe, "record", "-p", str(pid), "-o", str(out), "--format", "raw", "--rate", "100",
                             "--threads", "--idle", "--nonblocking"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_daemon(args) -> dict:
    import httpx

    work = Path(tempfile.mkdtemp(prefix="htrb-"))
    socket_path = work / "htr.sock"
    state_dir = Path(args.state_dir) if args.state_dir else work / "state"
    cfg = work / "htr.yaml"
    write_config(cfg, args, socket_path, state_dir)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HTR_")}
    env["PYTHONUNBUFFERED"] = "1"
    log_path = Path(args.daemon_log) if args.daemon_log else work / "htrd.log"
    d = Daemon(cfg, socket_path, log_path, env)
    body = png_bytes(line_image())
    res: dict = {"config": cfg.read_text(), "log": str(log_path)}
    transport = httpx.HTTPTransport(uds=str(socket_path))
    try:
        with GpuSampler() as gpu:
            res["ready_cold_s"] = d.start(args.timeout)
            with httpx.Client(transport=transport, base_url="http://htr", timeout=600.0) as c:
                def one() -> float:
                    t = time.perf_counter()
                    r = c.post("/v1/transcribe", content=body, headers={"Content-Type": "image/png"},
                               params={"max_new_tokens": args.new_tokens})
                    r.raise_for_status()
                    res.setdefault("sample_response", r.json())
                    return time.perf_counter() - t

                res["first_request_s"] = one()
                res["first_response"] = res.pop("sample_response")
                res["single"] = [one() for _ in range(args.single_requests)]
                res["single_p50_s"] = pct(res["single"], 0.5)
                res["single_p95_s"] = pct(res["single"], 0.95)
                with py_spy(d.proc.pid, args.profile_load):
                    res["loads"] = [load(socket_path, body, n, args.per_client, args.new_tokens)
                                    for n in args.clients_list]
                res["status"] = c.get("/v1/status").json()
                res["nvidia_smi"] = _nvidia_smi()
            res["gpu_peak_used_bytes"] = dict(gpu.peak)
            res["gpu_names"] = dict(gpu.names)
        res["exit_code"] = d.stop()
        if args.restart:
            res["ready_warm_s"] = d.start(args.timeout)
            with httpx.Client(transport=transport, base_url="http://htr", timeout=600.0) as c:
                lat = []
                for _ in range(1 + args.single_requests // 2):
                    t = time.perf_counter()
                    r = c.post("/v1/transcribe", content=body, headers={"Content-Type": "image/png"},
                               params={"max_new_tokens": args.new_tokens})
                    r.raise_for_status()
                    lat.append(time.perf_counter() - t)
                res["first_request_warm_s"] = lat[0]
                res["single_warm_p50_s"] = pct(lat[1:], 0.5)
                res["warm_status"] = c.get("/v1/status").json()
            res["exit_code_warm"] = d.stop()
    finally:
        d.stop()
        if not args.keep:
            shutil.rmtree(work / "state", ignore_errors=True)
    return res


# ------------------------------------------------------------------------- report
def report(args, a: dict | None, b: dict | None) -> str:
    rows = []
    gpu = (a or {}).get("gpu") or ", ".join(sorted(set((b or {}).get("gpu_names", {}).values()))) or "CPU"
    rows.append(f"device: {args.device} ({gpu}); model: {args.model_dir}; {args.new_tokens} new tokens forced; "
                f"prompt tokens: {(a or {}).get('prompt_tokens', '?')}")
    rows.append("")
    rows.append("| measurement | value |")
    rows.append("|---|---|")

    def add(name, value, fmt="{:.3f} s"):
        if value is not None:
            rows.append(f"| {name} | {fmt.format(value)} |")

    naive_p50 = None
    if a:
        naive_p50 = statistics.median(a["naive_lat_s"]) if a["naive_lat_s"] else a["naive_first_s"]
        add("(a) naive: load base + adapter", a["naive_load_s"])
        add("(a) naive: first request after load", a["naive_first_s"])
        add("(a) naive: p50 one request", naive_p50)
        add("(a) naive: p95 one request", pct(a["naive_lat_s"], 0.95))
        add("(a) naive: lines/s (one at a time)", 1.0 / naive_p50, "{:.2f}")
        add("(a) naive: peak GPU memory allocated", a.get("naive_peak_alloc_bytes"), "{:.2e} B")
        add("fast path in-process: p50 batch 1", statistics.median(a["fast_b1_lat_s"]))
        big = max(args.batch_sizes)
        if f"fast_b{big}_s" in a:
            add(f"fast path in-process: batch {big}", a[f"fast_b{big}_s"])
            add(f"fast path in-process: lines/s at batch {big}", big / a[f"fast_b{big}_s"], "{:.1f}")
        add("fast path warm-up (graphs for every batch size)", a["fast_warmup_s"])
        add("fast path batch 1: prefill", a["fast_prefill_ms_b1"] / 1000.0)
        add("fast path batch 1: one decode step", a["fast_step_ms_b1"], "{:.2f} ms")
        if f"fast_b{big}_step_ms" in a:
            add(f"fast path batch {big}: prefill", a[f"fast_b{big}_prefill_ms"] / 1000.0)
            add(f"fast path batch {big}: one decode step", a[f"fast_b{big}_step_ms"], "{:.2f} ms")
        rows.append(f"| greedy tokens equal to naive (common prefix) | {a['tokens_equal_prefix']} of {a['tokens_compared']} |")
        rows.append(f"| HF generate on merged weights vs naive (prefix) | {a['merged_hf_equal_prefix_vs_naive']} |")
        rows.append(f"| fast path vs HF generate on merged weights (prefix) | {a['fast_equal_prefix_vs_merged_hf']} |")
    if b:
        add("(b) htrd: start -> READY (cold)", b["ready_cold_s"])
        add("(b) htrd: start -> READY (restart, warm caches)", b.get("ready_warm_s"))
        for label, key in (("cold", "status"), ("warm", "warm_status")):
            if key in b:
                rows.append(f"| (b) READY {label}, of which | {ready_split(b[key].get('engine', {}))} |")
        add("(b) htrd: first request after READY", b["first_request_s"])
        add("(b) htrd: p50 one client", b["single_p50_s"])
        add("(b) htrd: p95 one client", b["single_p95_s"])
        rows.append(f"| (b) first request / steady p50 | {b['first_request_s'] / b['single_p50_s']:.2f}x |")
        if "first_request_warm_s" in b:
            add("(b) after the restart: first request", b["first_request_warm_s"])
            add("(b) after the restart: p50 one client", b["single_warm_p50_s"])
            rows.append(f"| (b) after the restart: first / p50 | "
                        f"{b['first_request_warm_s'] / b['single_warm_p50_s']:.2f}x |")
        for ld in b["loads"]:
            add(f"(b) htrd: {ld['clients']} clients lines/s", ld["lines_per_s"], "{:.1f}")
            add(f"(b) htrd: {ld['clients']} clients p50", ld["p50_s"])
            add(f"(b) htrd: {ld['clients']} clients p95", ld["p95_s"])
            if ld["n_errors"]:
                rows.append(f"| (b) {ld['clients']} clients errors | {ld['n_errors']}: {ld['errors'][:1]} |")
        for i, used in sorted(b.get("gpu_peak_used_bytes", {}).items()):
            add(f"(b) peak GPU {i} memory used (NVML)", used / 2**30, "{:.1f} GiB")
        st = b.get("status", {}).get("gpu", {})
        if st.get("memory_reserved_bytes"):
            add("(b) htrd /v1/status memory reserved", st["memory_reserved_bytes"] / 2**30, "{:.1f} GiB")
    if a and b and naive_p50:
        rows.append("")
        rows.append(f"ratio (b)/(a) one-request latency: {b['single_p50_s'] / naive_p50:.3f} "
                    f"({naive_p50 / b['single_p50_s']:.1f}x faster)")
        best = max(ld["lines_per_s"] for ld in b["loads"])
        rows.append(f"ratio (b)/(a) throughput: {best * naive_p50:.1f}x ({best:.1f} vs {1 / naive_p50:.2f} lines/s)")
    if b and b.get("nvidia_smi"):
        rows.append("")
        rows.append(f"nvidia-smi while htrd served (gpu.select: {args.gpu_select}):")
        rows.extend("    " + line for line in b["nvidia_smi"].splitlines())
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="naive path vs htrd, same run, same device")
    ap.add_argument("--cpu", action="store_true", help="smoke run: the demo model on the CPU")
    ap.add_argument("--model-dir", type=Path, help="model directory (GPU mode); see --make-model")
    ap.add_argument("--make-model", action="store_true", help="write the 8B-shaped random model to --model-dir first")
    ap.add_argument("--device", default=None, help="cuda:0 (default on GPU) or cpu")
    ap.add_argument("--gpu-select", default="0", help="the daemon's gpu.select (default: index 0)")
    ap.add_argument("--new-tokens", type=int, default=50)
    ap.add_argument("--naive-requests", type=int, default=5)
    ap.add_argument("--single-requests", type=int, default=20)
    ap.add_argument("--clients", default="64", help="comma-separated concurrent client counts")
    ap.add_argument("--per-client", type=int, default=4, help="requests per client in each load run")
    ap.add_argument("--batch-sizes", default="1,2,4,8,16,32,64,128,256")
    ap.add_argument("--batch-window-ms", type=float, default=5.0)
    ap.add_argument("--max-cache-len", type=int, default=1024)
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="fast path without torch.compile (CUDA graphs of the eager step only)")
    ap.add_argument("--daemon-naive", action="store_true", help="run htrd with generation.static_cache: false")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--skip-daemon", action="store_true")
    ap.add_argument("--restart", action="store_true", default=True, help="(default) restart htrd to time a warm start")
    ap.add_argument("--no-restart", dest="restart", action="store_false")
    ap.add_argument("--state-dir", default=None, help="htrd state dir (compile cache); default: a temp dir")
    ap.add_argument("--daemon-log", default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--profile-load", type=Path, default=None,
                    help="sample htrd with py-spy during the load runs (raw collapsed stacks to this file)")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--json", type=Path, default=None, help="write all measurements here")
    ap.add_argument("--worker", choices=["naive"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    stop_daemons_on_sigterm()
    args.batch_sizes = sorted({int(x) for x in str(args.batch_sizes).split(",") if x})
    args.clients_list = [int(x) for x in str(args.clients).split(",") if x]
    args.clients = max(args.clients_list)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)

    if args.worker == "naive":
        sys.stdout.write(json.dumps(naive_worker(args)) + "\n")
        return 0

    if args.cpu:
        args.device = "cpu"
        if args.model_dir is None:
            from htrctl.demo_model import build_demo_model

            args.model_dir = build_demo_model(Path(tempfile.gettempdir()) / "htr-bench-demo-model")
    else:
        args.device = args.device or "cuda:0"
        if args.model_dir is None:
            ap.error("--model-dir is required in GPU mode (with --make-model to create it)")
    if args.make_model:
        sys.path.insert(0, str(REPO / "bench"))
        import make_model_8b

        t = time.perf_counter()
        info = make_model_8b.build(args.model_dir, tiny=args.device == "cpu")
        logger.info("model written in %.1f s: %s", time.perf_counter() - t, info)

    a = None if args.skip_naive else run_naive(args)
    b, failed = None, None
    if not args.skip_daemon:
        try:
            b = run_daemon(args)
        except SystemExit as exc:  # htrd failed: still report the naive side
            failed = str(exc)
    text = report(args, a, b)
    if failed:
        text += f"\n(b) htrd FAILED: {failed}"
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "naive": a,
                                         "daemon": b, "daemon_error": failed, "table": text}, indent=2, default=str))
    sys.stdout.write(text + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
