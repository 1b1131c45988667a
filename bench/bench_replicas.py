"""Benchmark: one htrd replica per GPU (htr@.service) -- scaling against one replica, in one run.

    source bench/device-env.sh && python bench/make_model_8b.py /srv/m8b
    python bench/bench_replicas.py --model-dir /srv/m8b --json replicas.json      # every GPU of the host
    python bench/bench_replicas.py --cpu --model-dir /tmp/t8b --clients 2 --per-client 2 --new-tokens 4

N real htrd processes, started together the way ``htr@<gpu>.service`` starts
them: one config file for all of them, and the unit's environment per replica
(``HTR_GPU__SELECT=<GPU UUID>``, ``HTR_SOCKET__PATH=<dir>/htr-<instance>.sock``,
``CUDA_DEVICE_ORDER=PCI_BUS_ID``, offline Hugging Face, ``MALLOC_ARENA_MAX=2``,
compile caches under the state directory; ``--cpu``: ``HTR_GPU__SELECT=cpu``).
Then, with closed-loop clients (``--clients`` per replica, each sending its
next 1200x160 line as soon as the previous one is answered, exactly
``--new-tokens`` tokens forced):

1. replica 0 alone: lines/s (each replica's clients run in a process of their own, so that the
   benchmark's own GIL is not what is measured);
2. all N replicas at once (every client released at the same instant): lines/s
   in total and per replica, and total / (N x alone) -- the target is >= 0.9;
3. ``htrctl transcribe`` with one ``--socket`` per replica over a folder of
   line images (``--transcribe-images``; 0 skips it), timed.

Also: each replica's start -> READY, its average occupied slots per decode
step in each phase (from ``/v1/status``'s engine section), and, on a GPU,
``nvidia-smi --query-compute-apps`` sampled during phase 2: every replica's
process (and its children) must hold memory on its own GPU only (PASS/FAIL).
Progress on stderr, a table on stdout, everything in ``--json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import (
    PROMPT,
    Daemon,
    client_requests,
    line_image,
    pct,
    png_bytes,
    run_clients,
    stop_daemons_on_sigterm,
    write_config,
)

logger = logging.getLogger("bench_replicas")

# What the device machine requires of every process (no NVLink multicast), kept in the replicas' environment.
DEVICE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


# ------------------------------------------------------------------------------ GPUs
def gpu_uuids() -> list[str]:
    """The host's GPU UUIDs in PCI bus order (nvidia-smi's index), [] without a driver."""
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid", "--format=csv,noheader"],
                           check=False, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    rows = [line.split(",") for line in r.stdout.splitlines() if "," in line]
    return [uuid.strip() for _, uuid in sorted(rows, key=lambda row: int(row[0]))]


def compute_apps() -> list[tuple[int, str, int]]:
    """(pid, GPU UUID, used MiB) of every process holding GPU memory."""
    r = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,gpu_uuid,used_memory", "--format=csv,noheader,nounits"],
                       check=False, capture_output=True, text=True, timeout=60)
    out = []
    for line in r.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3 and parts[0].isdigit():
            out.append((int(parts[0]), parts[1], int(parts[2]) if parts[2].isdigit() else 0))
    return out


def gpu_used() -> dict[str, int]:
    """Used MiB of each GPU by UUID (whole device: seen even when nvidia-smi cannot name the processes)."""
    r = subprocess.run(["nvidia-smi", "--query-gpu=uuid,memory.used", "--format=csv,noheader,nounits"],
                       check=False, capture_output=True, text=True, timeout=60)
    rows = [[p.strip() for p in line.split(",")] for line in r.stdout.splitlines()]
    return {row[0]: int(row[1]) for row in rows if len(row) == 2 and row[1].isdigit()}


def descendants(pid: int) -> set[int]:
    """*pid* and every process below it (from /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        if p not in found:
            found.add(p)
            todo.extend(children.get(p, []))
    return found


class AppsSampler:
    """``compute_apps()`` every *interval* s in a thread: the largest memory seen per (pid, GPU)."""

    def __init__(self, interval: float = 1.0) -> None:
        self.seen: dict[tuple[int, str], int] = {}
        self.gpu_used: dict[str, int] = {}  # GPU UUID -> largest used MiB seen
        self.pids: dict[str, set[int]] = {}  # replica instance -> its process tree, as seen while sampling
        self.interval, self._stop, self._thread = interval, threading.Event(), None
        self.replicas: list = []

    def sample(self) -> None:
        for inst, d in self.replicas:
            if d.proc is not None:
                self.pids.setdefault(inst, set()).update(descendants(d.proc.pid))
        for pid, uuid, mib in compute_apps():
            self.seen[(pid, uuid)] = max(self.seen.get((pid, uuid), 0), mib)
        for uuid, mib in gpu_used().items():
            self.gpu_used[uuid] = max(self.gpu_used.get(uuid, 0), mib)

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> AppsSampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def placement_check(sampler: AppsSampler, assigned: dict[str, str], reported: dict[str, str | None]) -> dict:
    """Every replica's processes hold memory on its own GPU only, and each holds some there; *reported* is
    the GPU UUID each replica's /v1/status names. pass: None when nvidia-smi lists none of the replicas'
    processes at all (another PID namespace, as in some containers): then only *reported* is checked."""
    rows, problems = [], []
    owner = {pid: inst for inst, pids in sampler.pids.items() for pid in pids}
    for (pid, uuid), mib in sorted(sampler.seen.items()):
        inst = owner.get(pid)
        good = None if inst is None else uuid == assigned[inst]
        rows.append({"pid": pid, "gpu_uuid": uuid, "used_mib": mib, "replica": inst, "own_gpu": good})
        if good is False:
            problems.append(f"replica {inst} (pid {pid}) holds {mib} MiB on {uuid}")
    for inst, uuid in assigned.items():
        if reported.get(inst) != uuid:
            problems.append(f"replica {inst}: /v1/status names GPU {reported.get(inst)}, not {uuid}")
    listed = any(r["replica"] is not None for r in rows)
    if listed:
        for inst, uuid in assigned.items():
            if not any(r["replica"] == inst and r["own_gpu"] for r in rows):
                problems.append(f"replica {inst}: none of its processes listed on its GPU {uuid}")
    ok = False if problems else (True if listed else None)
    return {"pass": ok, "rows": rows, "problems": problems, "status_uuids": reported,
            "gpu_used_mib": dict(getattr(sampler, "gpu_used", {})),
            "note": None if listed else "nvidia-smi listed none of the replicas' PIDs (another PID namespace?)"}


# ------------------------------------------------------------------------- replicas
def replica_env(base: dict, state: Path, select: str, socket_path: Path, cfg: Path) -> dict:
    """The environment htr@<select>.service gives htrd (systemd/htr@.service), with directories under *state*;
    HOME is left as it is (a GPU host's Python packages may live in the user's site directory)."""
    env = {k: v for k, v in base.items() if not k.startswith("HTR_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               CUDA_DEVICE_ORDER="PCI_BUS_ID", PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1",
               MALLOC_ARENA_MAX="2", HF_HOME=str(state / "cache" / "huggingface"),
               CUDA_CACHE_PATH=str(state / "cache" / "nv"),
               TORCHINDUCTOR_CACHE_DIR=str(state / "torchinductor"), TRITON_CACHE_DIR=str(state / "triton"),
               HTR_CONFIG=str(cfg), HTR_GPU__SELECT=select, HTR_SOCKET__PATH=str(socket_path), **DEVICE_ENV)
    return env


def status(socket_path: Path) -> dict:
    import httpx

    with httpx.Client(transport=httpx.HTTPTransport(uds=str(socket_path)), base_url="http://htr", timeout=60) as c:
        return c.get("/v1/status").json()


def engine_delta(before: dict, after: dict) -> dict:
    """Requests, generated tokens and average occupied slots per decode step between two /v1/status."""
    eb, ea = before.get("engine") or {}, after.get("engine") or {}
    steps = (ea.get("decode_steps") or 0) - (eb.get("decode_steps") or 0)
    occ = (ea.get("occupied_slot_steps") or 0) - (eb.get("occupied_slot_steps") or 0)
    cb, ca = before.get("counters") or {}, after.get("counters") or {}
    return {"requests_served": ca.get("requests", 0) - cb.get("requests", 0),
            "tokens_generated": ca.get("generated_tokens", 0) - cb.get("generated_tokens", 0),
            "decode_steps": steps, "avg_occupied_slots": occ / steps if steps else None}


def closed_loop(sockets: list[Path], body: bytes, clients: int, per_client: int, new_tokens: int) -> dict:
    """*clients* closed-loop clients on each socket, all released at the same moment.

    Each replica's clients run in a process of their own (``--worker``), as separate users' clients would:
    128 client threads in one Python process share its GIL, and the benchmark would measure itself. The
    workers start their threads, then release them all at one wall-clock instant."""
    before = [status(s) for s in sockets]
    release = time.time() + 3.0 + 0.02 * clients  # after every worker has imported httpx and started its threads
    with tempfile.TemporaryDirectory(prefix="htrr-body-") as tmp:
        png = Path(tmp) / "line.png"
        png.write_bytes(body)
        workers = [subprocess.Popen([sys.executable, __file__, "--worker", str(sock), "--worker-body", str(png),
                                     "--worker-release", repr(release), "--clients", str(clients),
                                     "--per-client", str(per_client), "--new-tokens", str(new_tokens)],
                                    stdout=subprocess.PIPE, text=True) for sock in sockets]
        outs = [w.communicate()[0] for w in workers]
    for w, out in zip(workers, outs):
        if w.returncode != 0:
            raise RuntimeError(f"a client worker exited with {w.returncode}: {out[-500:]}")
    got = [json.loads(out.strip().splitlines()[-1]) for out in outs]
    after = [status(s) for s in sockets]
    per = []
    for g, b, a in zip(got, before, after):
        w = g["end"] - release
        per.append({"requests": len(g["lat"]), "n_errors": g["n_errors"], "errors": g["errors"], "wall_s": w,
                    "lines_per_s": len(g["lat"]) / w if w > 0 else 0.0,
                    "p50_s": pct(g["lat"], 0.5), "p95_s": pct(g["lat"], 0.95), **engine_delta(b, a)})
    total = sum(p["requests"] for p in per)
    wall = max(g["end"] for g in got) - release
    return {"clients_per_replica": clients, "requests": total, "n_errors": sum(p["n_errors"] for p in per),
            "wall_s": wall, "lines_per_s": total / wall if wall > 0 else 0.0, "replicas": per}


def client_worker(args) -> int:
    """``--worker SOCKET``: this replica's closed-loop clients, released at ``--worker-release`` (wall clock);
    prints their latencies and the moment the last one ended, as one JSON line."""
    body = Path(args.worker_body).read_bytes()
    lat: list[float] = []
    errors: list[str] = []
    ends: list[float] = []

    def client(start) -> None:  # a bench_generate.Release
        client_requests(Path(args.worker), body, args.per_client, lat, errors, args.new_tokens, start)
        ends.append(time.time())

    run_clients(args.clients, client, release_at=float(args.worker_release))
    sys.stdout.write(json.dumps({"lat": lat, "errors": errors[:3], "n_errors": len(errors),
                                 "end": max(ends) if ends else time.time()}) + "\n")
    return 0


def start_all(replicas: list[tuple[str, Daemon]], timeout: float) -> dict[str, float]:
    """Start every replica at once (as systemd starts htr@ units); seconds to READY of each."""
    ready: dict[str, float] = {}
    failed: list[str] = []

    def one(inst: str, d: Daemon) -> None:
        try:
            ready[inst] = d.start(timeout)
            logger.info("replica %s READY after %.1f s (pid %d)", inst, ready[inst], d.proc.pid)
        except SystemExit as exc:
            failed.append(f"{inst}: {exc}")

    threads = [threading.Thread(target=one, args=r) for r in replicas]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failed:
        raise SystemExit("; ".join(failed))
    return ready


def transcribe_pass(sockets: list[Path], folder: Path, n: int, per_socket: int, timeout: float) -> dict:
    """``htrctl transcribe`` with one --socket per replica (*per_socket* requests in flight on each) over *n*
    line images in *folder*. Its workers pull from one queue, the first socket's first: with fewer images than
    its concurrency, the first replica gets them all."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        line_image(seed=k).save(folder / f"line-{k:03d}.png")
    before = [status(s) for s in sockets]
    cmd = [sys.executable, "-m", "htrctl", "transcribe", *(a for s in sockets for a in ("--socket", str(s))),
           "-j", str(per_socket), "-f", "jsonl", str(folder)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HTR_")}
    t = time.perf_counter()
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, env=env)
    wall = time.perf_counter() - t
    after = [status(s) for s in sockets]
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.strip()]
    return {"command": " ".join(cmd), "exit_code": r.returncode, "images": n, "results": len(lines),
            "wall_s": wall, "lines_per_s": len(lines) / wall if wall else 0.0, "stderr_tail": r.stderr[-1500:],
            "served_per_replica": [engine_delta(b, a)["requests_served"] for b, a in zip(before, after)]}


def run(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="htrr-"))  # short: socket paths hold a GPU UUID (108-byte limit)
    state = Path(args.state_dir) if args.state_dir else work / "state"
    state.mkdir(parents=True, exist_ok=True)
    if args.cpu:
        instances = [(f"cpu{i}", "cpu") for i in range(args.replicas)]
    else:
        uuids = gpu_uuids()
        if args.replicas > len(uuids):
            raise SystemExit(f"--replicas {args.replicas}: nvidia-smi lists {len(uuids)} GPUs")
        instances = [(u, u) for u in uuids[:args.replicas]]
    cfg = work / "htr.yaml"  # ONE config, as /etc/htr/htr.yaml for every htr@ unit
    cfg_args = SimpleNamespace(model_dir=args.model_dir, device="cpu" if args.cpu else "cuda:0", gpu_select="first",
                               clients=args.clients, batch_sizes=args.batch_sizes, batch_window_ms=5.0,
                               prompt=PROMPT, new_tokens=args.new_tokens, daemon_naive=False,
                               max_cache_len=args.max_cache_len, compile=not args.no_compile)
    write_config(cfg, cfg_args, work / "htr.sock", state)
    replicas, assigned = [], {}
    for inst, select in instances:
        sock = work / f"htr-{inst}.sock"
        env = replica_env(dict(os.environ), state, select, sock, cfg)
        replicas.append((inst, Daemon(cfg, sock, work / f"htrd-{inst}.log", env)))
        assigned[inst] = select
    sockets = [d.socket_path for _, d in replicas]
    body = png_bytes(line_image())
    res: dict = {"instances": [i for i, _ in instances], "config": cfg.read_text(),
                 "logs": [str(d.log_path) for _, d in replicas]}
    try:
        logger.info("starting %d replicas: %s", len(replicas), ", ".join(assigned))
        res["ready_s"] = start_all(replicas, args.timeout)
        st = [status(s) for s in sockets]
        res["replica_info"] = [{"instance": inst, "pid": s.get("pid"), "daemon_pid": d.proc.pid,
                                "gpu": s.get("gpu"), "engine": s.get("engine")}
                               for (inst, d), s in zip(replicas, st)]
        warm = closed_loop(sockets, body, args.clients, 1, args.new_tokens)
        logger.info("warm-up: %d lines on %d replicas in %.1f s", warm["requests"], len(sockets), warm["wall_s"])
        res["single"] = closed_loop(sockets[:1], body, args.clients, args.per_client, args.new_tokens)
        logger.info("replica %s alone, %d clients: %.2f lines/s (%d lines, %d errors)", instances[0][0],
                    args.clients, res["single"]["lines_per_s"], res["single"]["requests"], res["single"]["n_errors"])
        if args.cpu:
            res["placement"] = {"pass": None, "skipped": "--cpu: the replicas hold no GPU memory"}
            res["all"] = closed_loop(sockets, body, args.clients, args.per_client, args.new_tokens)
        else:
            sampler = AppsSampler()
            sampler.replicas = replicas
            with sampler:
                res["all"] = closed_loop(sockets, body, args.clients, args.per_client, args.new_tokens)
            reported = {i["instance"]: (i.get("gpu") or {}).get("uuid") for i in res["replica_info"]}
            res["placement"] = placement_check(sampler, assigned, reported)
        a = res["all"]
        logger.info("all %d replicas, %d clients each: %.2f lines/s (%s per replica; %d errors)", len(sockets),
                    args.clients, a["lines_per_s"], ", ".join(f"{p['lines_per_s']:.2f}" for p in a["replicas"]),
                    a["n_errors"])
        single = res["single"]["lines_per_s"]
        res["scaling"] = a["lines_per_s"] / (len(sockets) * single) if single else None
        n_images = 2 * args.clients * len(sockets) if args.transcribe_images is None else args.transcribe_images
        if n_images:
            t = res["transcribe"] = transcribe_pass(sockets, work / "lines", n_images, args.clients, args.timeout)
            logger.info("htrctl transcribe, %d sockets, %d images: %.1f s, exit %d, served per replica %s",
                        len(sockets), n_images, t["wall_s"], t["exit_code"], t["served_per_replica"])
    finally:
        res["exit_codes"] = {inst: d.stop() for inst, d in replicas}
    return res


# ------------------------------------------------------------------------- report
def report(args, res: dict) -> str:
    n = len(res["instances"])
    rows = [(f"{n} htrd replicas ({'CPU' if args.cpu else 'one per GPU'}); model {args.model_dir}; "
             f"{args.clients} closed-loop clients per replica x {args.per_client} lines; "
             f"{args.new_tokens} new tokens forced"), ""]
    rows.append("| replica | READY s | alone lines/s | all: lines/s | all: p50 s | all: p95 s | slots alone | "
                "slots all | errors |")
    rows.append("|---|---|---|---|---|---|---|---|---|")
    single = res["single"]["replicas"][0]

    def f(v, fmt="{:.2f}"):
        return "-" if v is None else fmt.format(v)

    for i, inst in enumerate(res["instances"]):
        p = res["all"]["replicas"][i]
        rows.append(f"| {inst} | {f(res['ready_s'].get(inst), '{:.1f}')} | "
                    f"{f(single['lines_per_s']) if i == 0 else '-'} | {f(p['lines_per_s'])} | {f(p['p50_s'], '{:.3f}')} | "
                    f"{f(p['p95_s'], '{:.3f}')} | {f(single['avg_occupied_slots'], '{:.1f}') if i == 0 else '-'} | "
                    f"{f(p['avg_occupied_slots'], '{:.1f}')} | {p['n_errors']} |")
    a, s = res["all"], res["single"]
    rows.append("")
    rows.append(f"one replica alone: {s['lines_per_s']:.2f} lines/s ({s['requests']} lines in {s['wall_s']:.1f} s)")
    rows.append(f"all {n} at once:   {a['lines_per_s']:.2f} lines/s ({a['requests']} lines in {a['wall_s']:.1f} s)")
    if res.get("scaling") is not None:
        rows.append(f"scaling: total / ({n} x alone) = {res['scaling']:.3f} "
                    f"({a['lines_per_s'] / s['lines_per_s']:.2f}x one replica; target >= 0.9)")
    t = res.get("transcribe")
    if t:
        rows.append(f"htrctl transcribe, {n} --socket, {t['images']} images: {t['results']} results in "
                    f"{t['wall_s']:.1f} s = {t['lines_per_s']:.1f} lines/s (exit {t['exit_code']}; "
                    f"served per replica {t['served_per_replica']})")
    pl = res["placement"]
    rows.append("")
    if pl.get("skipped"):
        rows.append(f"GPU placement check skipped: {pl['skipped']}")
    else:
        rows.append("nvidia-smi --query-compute-apps during the all-replica load (largest seen):")
        rows.append("| pid | GPU | MiB | replica | own GPU |")
        rows.append("|---|---|---|---|---|")
        for r in pl["rows"]:
            rows.append(f"| {r['pid']} | {r['gpu_uuid']} | {r['used_mib']} | {r['replica'] or '(other)'} | "
                        f"{'-' if r['own_gpu'] is None else r['own_gpu']} |")
        rows.append("GPU memory used (whole device, largest seen): " +
                    ", ".join(f"{u} {m} MiB" for u, m in sorted(pl["gpu_used_mib"].items())))
        verdict = {True: "PASS", False: "FAIL", None: "UNKNOWN"}[pl["pass"]]
        rows.append(f"GPU placement: {verdict}" + "".join(f"; {p}" for p in pl["problems"]) +
                    (f"; {pl['note']}" if pl.get("note") else ""))
    for info in res.get("replica_info", []):
        g = info.get("gpu") or {}
        rows.append(f"replica {info['instance']}: /v1/status says pid {info['pid']}, device {g.get('device')}, "
                    f"uuid {g.get('uuid')}, slots {(info.get('engine') or {}).get('slots')}")
    rows.append(f"exit codes after SIGTERM: {res.get('exit_codes')}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", type=Path, help="e.g. from bench/make_model_8b.py (--tiny on --cpu)")
    ap.add_argument("--cpu", action="store_true", help="smoke run: CPU replicas (gpu.select: cpu)")
    ap.add_argument("--replicas", type=int, default=None, help="default: every GPU nvidia-smi lists; 2 on --cpu")
    ap.add_argument("--clients", type=int, default=64, help="closed-loop clients PER REPLICA")
    ap.add_argument("--per-client", type=int, default=4, help="lines each client sends in each phase")
    ap.add_argument("--new-tokens", type=int, default=50)
    ap.add_argument("--batch-sizes", default="1,2,4,8,16,32,64,128,256", help="limits.batch_sizes (the shipped config's)")
    ap.add_argument("--max-cache-len", type=int, default=1024)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--transcribe-images", type=int, default=None,
                    help="line images for the final htrctl transcribe pass, -j CLIENTS per socket "
                         "(default: 2 x clients x replicas; 0: skip it)")
    ap.add_argument("--state-dir", default=None, help="the replicas' state dir (compile caches); default: temporary")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds to READY, and for the transcribe pass")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one replica's clients (closed_loop)
    ap.add_argument("--worker-body", help=argparse.SUPPRESS)
    ap.add_argument("--worker-release", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    stop_daemons_on_sigterm()
    if args.worker:
        return client_worker(args)
    if args.model_dir is None:
        ap.error("--model-dir is required")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args.batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    if args.replicas is None:
        args.replicas = 2 if args.cpu else len(gpu_uuids())
    if args.replicas < 1:
        ap.error("no GPU found (nvidia-smi): pass --cpu for CPU replicas")
    error = None
    try:
        res = run(args)
        text = report(args, res)
    except SystemExit as exc:  # a replica did not come up (its log is named)
        res, error = {}, str(exc)
        text = f"FAILED: {error}"
    except Exception as exc:  # e.g. a replica died mid-run: still write the JSON
        logger.exception("benchmark failed")
        res, error = {}, f"{type(exc).__name__}: {exc}"
        text = f"FAILED: {error}"
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "error": error, **res},
                                        indent=1, default=str))
    sys.stdout.write(text + "\n")
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main())
