"""Start a real ``htrd`` process on the demo model, on the CPU, over a Unix socket in tmp_path.

Reusable by every test that needs a running daemon::

    from daemon_harness import start_daemon        # tests/ is on sys.path under pytest

    def test_something(tmp_path, demo_model_dir):
        with start_daemon(tmp_path, demo_model_dir) as d:   # waits for readiness (bounded polling)
            r = d.client().post("/v1/transcribe", content=png_bytes)
            assert r.status_code == 200
        # leaving the block: SIGTERM, wait for the exit, d.returncode / d.stderr() available

or the ``htrd`` fixture (a factory; every daemon it started is stopped at teardown)::

    def test_other(htrd):
        d = htrd(config={"limits": {"queue_length": 4}}, faults="slow_generate=1")

or one daemon for a whole test module, its socket where other uids reach it::

    daemon = module_daemon("transcribe-e2e")     # a module-scoped fixture named ``daemon``

Nothing sleeps: readiness is a bounded poll of ``/v1/ready`` (``wait_until``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from helpers import stop_process, wait_until

DEFAULT_BATCH_SIZES = [1, 2, 4]
START_TIMEOUT_S = 180.0  # a cold torch import on a busy 2-core machine can take a while


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def socket_path_for(tmp_path: Path) -> Path:
    """A socket path in tmp_path, or in a fresh private temp dir when tmp_path is too long for AF_UNIX."""
    path = Path(tmp_path) / "htrd.sock"
    if len(os.fsencode(path)) < 100:
        return path
    return Path(tempfile.mkdtemp(prefix="htrd-")) / "htrd.sock"


def write_config(tmp_path: Path, model_dir: Path, overrides: dict | None = None, *, socket_path: Path | None = None) -> Path:
    """A config for a CPU daemon on *model_dir* with a socket in *tmp_path* (YAML is a superset of JSON)."""
    cfg = {
        "model": {"dir": str(model_dir), "verify_on_start": "quick"},
        "gpu": {"select": "cpu"},
        "socket": {"path": str(socket_path or socket_path_for(tmp_path)), "group": None, "mode": "0o660"},
        "limits": {"batch_sizes": DEFAULT_BATCH_SIZES, "queue_length": 64, "batch_window_ms": 20.0,
                   "request_deadline_s": 60.0, "drain_timeout_s": 30.0},
        "generation": {"max_new_tokens": 16},
        "watchdog": {"generate_timeout_s": 60.0},
        "log": {"level": "DEBUG"},
    }
    cfg = _deep_merge(cfg, overrides or {})
    path = Path(tmp_path) / "htr.yaml"
    path.write_text(json.dumps(cfg, indent=2))
    return path


class Daemon:
    """A running (or finished) ``htrd`` subprocess and an httpx client for its socket."""

    def __init__(self, proc: subprocess.Popen, socket_path: Path, config_path: Path, stderr_path: Path) -> None:
        self.proc = proc
        self.socket_path = socket_path
        self.config_path = config_path
        self.stderr_path = stderr_path
        self._clients: list[httpx.Client] = []

    # -- talking to it -----------------------------------------------------------------------------------
    def client(self, timeout: float = 60.0) -> httpx.Client:
        c = httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket_path)), base_url="http://htr",
                         timeout=timeout)
        self._clients.append(c)
        return c

    def get(self, path: str, **kw) -> httpx.Response:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket_path)), base_url="http://htr",
                          timeout=kw.pop("timeout", 30.0)) as c:
            return c.get(path, **kw)

    def post(self, path: str, **kw) -> httpx.Response:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket_path)), base_url="http://htr",
                          timeout=kw.pop("timeout", 60.0)) as c:
            return c.post(path, **kw)

    def state(self) -> str | None:
        """The readiness state, or None while the socket does not answer."""
        try:
            r = self.get("/v1/ready", timeout=5.0)
        except (httpx.TransportError, OSError):
            return None
        return r.json().get("state")

    def status(self) -> dict:
        return self.get("/v1/status").json()

    def metrics(self) -> str:
        return self.get("/metrics").text

    # -- lifecycle ---------------------------------------------------------------------------------------
    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"htrd exited with {self.proc.returncode} before ready:\n{self.stderr()[-4000:]}")
            return self.state() == "ready"

        try:
            wait_until(ready, timeout, what="htrd readiness")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- htrd stderr ---\n{self.stderr()[-4000:]}") from None

    def wait_exit(self, timeout: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"htrd did not exit within {timeout:g}s:\n{self.stderr()[-4000:]}") from None

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; SIGKILL if it does not exit in time. Returns the exit code."""
        for c in self._clients:
            c.close()
        self._clients.clear()
        return stop_process(self.proc, timeout)

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def launch(tmp_path: Path, model_dir: Path, *, config: dict | None = None, faults: str | None = None,
           env: dict | None = None, args: list[str] | None = None, config_path: Path | None = None,
           socket_path: Path | None = None) -> Daemon:
    """Start ``python -m htrd`` without waiting for readiness."""
    tmp_path = Path(tmp_path)
    sock = socket_path or socket_path_for(tmp_path)
    cfg = config_path or write_config(tmp_path, model_dir, config, socket_path=sock)
    full_env = dict(os.environ)
    full_env["PYTHONUNBUFFERED"] = "1"
    full_env.pop("HTR_TEST_FAULTS", None)
    if faults:
        full_env["HTR_TEST_FAULTS"] = faults
    full_env.update(env or {})
    stderr_path = tmp_path / f"htrd-{time.monotonic_ns()}.stderr"
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "htrd", "--config", str(cfg), *(args or [])],
            stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=full_env, cwd=tmp_path,
        )
    return Daemon(proc, sock, cfg, stderr_path)


def start_daemon(tmp_path: Path, model_dir: Path, *, wait: bool = True, timeout: float = START_TIMEOUT_S,
                 **kw) -> Daemon:
    """:func:`launch`, then wait for readiness (bounded); kills the process if it never gets ready."""
    d = launch(tmp_path, model_dir, **kw)
    if wait:
        try:
            d.wait_ready(timeout)
        except BaseException:
            d.stop(timeout=10)
            raise
    return d


@pytest.fixture
def htrd(tmp_path, demo_model_dir):
    """Factory fixture: ``htrd(config=..., faults=..., env=..., wait=True)`` -> :class:`Daemon`; all stopped at teardown."""
    started: list[Daemon] = []
    counter = iter(range(1000))

    def factory(**kw) -> Daemon:
        sub = tmp_path / f"d{next(counter)}"
        sub.mkdir()
        model = kw.pop("model_dir", demo_model_dir)
        d = launch(sub, model, **{k: v for k, v in kw.items() if k not in ("wait", "timeout")})
        started.append(d)
        if kw.get("wait", True):
            d.wait_ready(kw.get("timeout", START_TIMEOUT_S))
        return d

    yield factory
    for d in started:
        d.stop(timeout=30)


def module_daemon(name: str, **kw) -> Callable:
    """A module-scoped fixture: one htrd on the provisioned demo model, started once for the module, its socket
    in ``open_dir/<name>/`` (a directory of its own that other uids may enter); stopped at the end, exit 0
    asserted. ``daemon = module_daemon("my-tests")`` in a test module; *kw* go to :func:`start_daemon`."""

    @pytest.fixture(scope="module")
    def daemon(tmp_path_factory, provisioned_model, open_dir):
        own = open_dir / name  # open_dir is shared by the session: a socket of our own in it
        own.mkdir(mode=0o755)
        d = start_daemon(tmp_path_factory.mktemp(name), provisioned_model, socket_path=own / "htr.sock", **kw)
        yield d
        assert d.stop() == 0, d.stderr()[-3000:]

    return daemon
