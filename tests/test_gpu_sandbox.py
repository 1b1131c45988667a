"""On a GPU host, as root (pytest -m gpu): the real htrd inside htr.service's sandbox.

The sandbox is the GPU sandbox tool's emulation of the unit without systemd as PID 1 (unshare +
setpriv + a seccomp filter: @system-service minus @privileged, AF_UNIX only, read-only /, private
/tmp, hidden /home and /root, private network, only the NVIDIA device nodes, user nobody, no
capabilities, 8 MiB memlock). Inside it htrd serves an 8B-shaped model (random bf16 weights,
bench/make_model_8b.py) on the fast path with torch.compile: time to READY, one transcription,
SIGTERM -> exit 0. Then again without /dev/nvidia-uvm: exit 69 naming the node and the remedy,
before torch starts, instead of "CUDA unknown error" and a restart loop.

One command, from the repository root on the GPU machine (root; needs util-linux unshare/setpriv):

    HTR_GPU_SANDBOX=/path/to/gpu-sandbox python -m pytest -m gpu -s tests/test_gpu_sandbox.py

Environment:
- HTR_GPU_SANDBOX: the folder holding gpu-sandbox.sh and gpu-smoke.py (default: shared/gpu-sandbox
  in the checkout, then /work/shared/gpu-sandbox);
- HTR_GPU_STAGE: where the model, a copy of the code and the tool go -- outside /home, /root and
  /tmp, which the sandbox hides (default /srv/htr-gputest);
- HTR_GPU_MODEL: an existing 8B-shaped model directory (default: written into the stage once, ~17.5 GB);
- HTR_GPU_STATE: the state directory (StateDirectory= stand-in; compile caches; default
  /var/lib/htr-gputest; delete it for a cold compile);
- HTR_GPU_REPORT: also write the JSON report there (it is printed in any case).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, line_png, stop_process, wait_ready_states

try:  # the 8B model's write + a cold compile take longer than the suite's default 300 s
    import pytest_timeout  # noqa: F401

    pytestmark = [pytest.mark.gpu, pytest.mark.timeout(1500)]
except ImportError:  # pytest-timeout absent on the GPU host: no marker (--strict-markers would refuse it)
    pytestmark = pytest.mark.gpu

HIDDEN = (Path("/home"), Path("/root"), Path("/tmp"), Path("/var/tmp"), Path("/run/user"))
PSEUDO = ["/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty", "/dev/ptmx"]
READY_TIMEOUT_S = 900.0
TOKENS = 50


def _hidden(p: Path) -> bool:
    p = Path(os.path.realpath(p))
    return any(p == h or h in p.parents for h in HIDDEN)


def _tool() -> Path | None:
    for cand in (os.environ.get("HTR_GPU_SANDBOX"), REPO / "shared" / "gpu-sandbox", "/work/shared/gpu-sandbox"):
        if cand and (Path(cand) / "gpu-sandbox.sh").is_file() and (Path(cand) / "gpu-smoke.py").is_file():
            return Path(cand)
    return None


def _readable_tree(root: Path) -> None:
    for p in [root, *root.rglob("*")]:
        if not p.is_symlink():
            p.chmod(0o755 if p.is_dir() else (p.stat().st_mode & 0o777) | 0o444)


@pytest.fixture(scope="module")
def sandbox():
    """Everything the sandboxed htrd needs, outside the directories the sandbox hides."""
    missing = [w for w, ok in (("root", os.geteuid() == 0), ("unshare", shutil.which("unshare")),
                               ("setpriv", shutil.which("setpriv")), ("an NVIDIA GPU", Path("/dev/nvidiactl").exists()),
                               ("the GPU sandbox tool (HTR_GPU_SANDBOX)", _tool())) if not ok]
    if missing:
        pytest.skip("needs " + ", ".join(missing))
    import importlib.util

    heavy = {m: importlib.util.find_spec(m) for m in ("torch", "transformers", "triton")}
    hidden_py = [str(p) for p in (Path(sys.executable), Path(sys.base_prefix)) if _hidden(p)]
    hidden_py += [m for m, s in heavy.items() if s is None or _hidden(Path(s.origin))]
    if hidden_py:
        pytest.skip(f"the sandbox hides /home, /root and /tmp; this Python or its packages live there: {hidden_py}")

    stage = Path(os.environ.get("HTR_GPU_STAGE", "/srv/htr-gputest"))
    stage.mkdir(parents=True, exist_ok=True)
    stage.chmod(0o755)
    # This checkout's code as the packages htrctl and htrd, plus every sys.path entry the sandbox would hide
    # (e.g. bench/device-env.sh's /tmp/site) -- small things; torch itself must already live elsewhere.
    py = stage / "py"
    shutil.rmtree(py, ignore_errors=True)
    (py / "app").mkdir(parents=True)
    shutil.copytree(REPO / "htrctl", py / "app" / "htrctl", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "daemon", py / "app" / "htrd", ignore=shutil.ignore_patterns("__pycache__"))
    pythonpath: list = [py / "app"]
    copies: dict[str, Path] = {}
    for i, entry in enumerate(p for p in sys.path if p and Path(p).is_dir() and _hidden(Path(p))):
        if Path(entry).resolve() in (REPO.resolve(), (REPO / "tests").resolve()):
            continue  # the checkout: py/app holds its packages
        copies[entry] = py / f"path{i}"
        shutil.copytree(entry, copies[entry], symlinks=False, ignore=shutil.ignore_patterns("__pycache__", "*.whl"))
    for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep):  # keep the order, visible entries as they are
        if entry and not _hidden(Path(entry)):
            pythonpath.append(entry)
    pythonpath += [c for c in copies.values()]
    tool = stage / "tool"
    shutil.rmtree(tool, ignore_errors=True)
    tool.mkdir()
    for f in ("gpu-sandbox.sh", "gpu-smoke.py"):
        shutil.copy(_tool() / f, tool / f)
    _readable_tree(py)
    _readable_tree(tool)

    model = Path(os.environ.get("HTR_GPU_MODEL") or stage / "model-8b")
    made_s = None
    if not (model / "config.json").is_file():
        t0 = time.monotonic()
        subprocess.run([sys.executable, str(REPO / "bench" / "make_model_8b.py"), str(model)], check=True,
                       timeout=900)
        made_s = round(time.monotonic() - t0, 1)
    _readable_tree(model)  # the service user (nobody here) reads it, as htr does a provisioned model

    state = Path(os.environ.get("HTR_GPU_STATE", "/var/lib/htr-gputest"))
    cold = not (state / "torchinductor").is_dir() or not any((state / "torchinductor").iterdir())
    cfg = {
        "model": {"dir": str(model), "verify_on_start": "quick"},
        "gpu": {"select": "0"},
        "socket": {"path": str(state / "htr.sock"), "group": None},  # htrd's own chown is refused (~@privileged)
        "limits": {"batch_sizes": [1, 4], "request_deadline_s": 600.0},
        "generation": {"static_cache": True, "compile": True, "max_new_tokens": TOKENS, "min_new_tokens": TOKENS},
        "watchdog": {"generate_timeout_s": 900.0},
    }
    config = stage / "htr.yaml"
    config.write_text(json.dumps(cfg, indent=2))
    config.chmod(0o644)
    report = {"model": str(model), "model_written_s": made_s, "cold_compile_cache": cold, "config": cfg}
    # htrd refuses HTR_* names that are not settings: this test's own variables (HTR_GPU_MODEL, ...) and
    # HTR_NVML_FAKE stay out of the daemon's environment, as they are out of the unit's.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HTR_")}
    env.update({"SC": "sys", "STATE": str(state), "PYTHONPATH": os.pathsep.join(map(str, pythonpath)),
                "PYTHONUNBUFFERED": "1"})
    yield {"tool": tool, "config": config, "state": state, "env": env, "report": report}
    text = json.dumps(report, indent=2, default=str)
    print("\n=== GPU sandbox report ===\n" + text)
    if os.environ.get("HTR_GPU_REPORT"):
        Path(os.environ["HTR_GPU_REPORT"]).write_text(text)


def _start(sb, log: Path, devs: list[str] | None = None) -> subprocess.Popen:
    """unshare -> gpu-sandbox.sh -> setpriv -> gpu-smoke.py --exec (seccomp) -> htrd: each step execs, so the
    returned process IS htrd in the end."""
    env = dict(sb["env"])
    if devs is not None:
        env["DEVS"] = " ".join(devs)
    argv = ["unshare", "-m", "-n", "-u", "--propagation", "private", "sh", str(sb["tool"] / "gpu-sandbox.sh"),
            sys.executable, str(sb["tool"] / "gpu-smoke.py"), "--exec",
            sys.executable, "-m", "htrd", "--config", str(sb["config"])]
    with open(log, "wb") as out:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env,
                                start_new_session=True, cwd=sb["config"].parent)  # python -m puts cwd first


def _tail(log: Path, n: int = 30) -> list[str]:
    return log.read_text(errors="replace").splitlines()[-n:]


def test_htrd_in_the_units_sandbox_serves_a_compiled_8b_model(sandbox, tmp_path):
    import httpx

    rep = sandbox["report"]
    log = tmp_path / "htrd.log"
    sock = sandbox["state"] / "htr.sock"
    t0 = time.monotonic()
    proc = _start(sandbox, log)
    client = httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://htr", timeout=600)
    try:
        states = wait_ready_states(client, proc, READY_TIMEOUT_S, log, since=t0, interval=0.2)
        rep["start_to_ready_s"] = round(time.monotonic() - t0, 1)
        rep["states"] = states
        status = client.get("/v1/status").json()
        rep["status_gpu"] = status.get("gpu")
        png = line_png()
        lat = []
        for _ in range(2):  # the first after READY, then a second one
            t1 = time.perf_counter()
            r = client.post("/v1/transcribe", content=png, headers={"Content-Type": "image/png"})
            lat.append(round(time.perf_counter() - t1, 3))
            assert r.status_code == 200, r.text
        res = r.json()["results"][0]
        rep["request_latency_s"] = lat
        rep["tokens"] = res.get("tokens")
        rep["timings"] = res.get("timings")
        assert res.get("tokens") == TOKENS
    finally:
        client.close()
        stop_process(proc, 120)
        rep["exit_code_after_sigterm"] = proc.returncode
        rep["log_tail"] = _tail(log)
    out = log.read_text(errors="replace")
    assert "seccomp sys 0" in out  # the filter was installed (gpu-smoke.py prints prctl's result)
    assert "device nodes open: " in out and "/dev/nvidia-uvm" in out
    assert proc.returncode == 0


def test_without_nvidia_uvm_htrd_exits_69_before_torch(sandbox, tmp_path):
    rep = sandbox["report"]
    nodes = sorted(str(p) for p in Path("/dev").glob("nvidia*") if not p.name.startswith("nvidia-uvm"))
    log = tmp_path / "htrd-no-uvm.log"
    t0 = time.monotonic()
    proc = _start(sandbox, log, devs=nodes + PSEUDO)
    try:
        code = proc.wait(180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = log.read_text(errors="replace")
    msg = next((ln for ln in out.splitlines() if "nvidia-uvm" in ln and "ERROR" in ln), "")
    rep["no_uvm"] = {"exit_code": code, "seconds_to_exit": round(time.monotonic() - t0, 1), "message": msg,
                     "devices": nodes, "log_tail": _tail(log, 12)}
    assert code == 69, out[-3000:]
    assert "/dev/nvidia-uvm does not exist" in msg and "htr-gpu-prepare.service" in msg, msg
    assert "state starting -> loading" not in out  # stopped before the model (and torch) loads
