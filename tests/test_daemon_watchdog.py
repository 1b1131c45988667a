"""The watchdog against a real htrd with a hung generate: exit 86 outside systemd; sd_notify under a fake systemd."""

from __future__ import annotations

import concurrent.futures
import io
import os
import signal
import socket
import threading
import time

import httpx
import pytest
from daemon_harness import htrd  # noqa: F401 -- htrd is a fixture
from helpers import wait_until
from PIL import Image

from htrctl import protocol as P
from htrctl.errors import ExitCode

# Long enough that a normal CPU generate on a busy 2-core machine never trips it, short enough to test.
GENERATE_TIMEOUT_S = 4.0
CONFIG = {"watchdog": {"generate_timeout_s": GENERATE_TIMEOUT_S}, "limits": {"batch_sizes": [1]}}


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (300, 40), "white").save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_hung_generate_exits_86_outside_systemd(htrd):
    d = htrd(faults="hang_generate", config=CONFIG)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        t0 = time.monotonic()
        pending = pool.submit(d.post, P.PATH_TRANSCRIBE, content=png(), timeout=60)
        code = d.wait_exit(30)
        elapsed = time.monotonic() - t0
        with pytest.raises(httpx.TransportError):
            pending.result(30)  # the process is gone: the client sees the connection drop
    assert code == ExitCode.WATCHDOG, d.stderr()[-3000:]
    assert GENERATE_TIMEOUT_S <= elapsed < GENERATE_TIMEOUT_S + 5.0
    err = d.stderr()
    assert "watchdog" in err and "generate_timeout_s" in err


class FakeSystemd:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET; records every message with its time."""

    def __init__(self, path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.path = path
        self.messages: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            with self._lock:
                for line in data.decode().splitlines():
                    self.messages.append((time.monotonic(), line))

    def lines(self, since: float = 0.0) -> list[str]:
        with self._lock:
            return [m for t, m in self.messages if t >= since]

    def first(self, line: str) -> float | None:
        with self._lock:
            return next((t for t, m in self.messages if m == line), None)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.mark.slow
def test_sd_notify_ready_pings_trigger_and_stopping(htrd, tmp_path):
    fake = FakeSystemd(tmp_path / "notify.sock")
    try:
        d = htrd(
            faults="hang_generate",
            config=CONFIG,
            env={"NOTIFY_SOCKET": str(fake.path), "WATCHDOG_USEC": "400000"},  # pings every 0.2 s
        )
        wait_until(lambda: fake.first("READY=1"), 10, what="READY=1")
        lines = fake.lines()
        assert any(m.startswith("EXTEND_TIMEOUT_USEC=") for m in lines)  # while loading
        assert any(m.startswith("STATUS=loading") for m in lines)
        ready_at = fake.first("READY=1")
        wait_until(lambda: fake.lines(since=ready_at).count("WATCHDOG=1") >= 3, 10, what="watchdog pings")

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            sent = time.monotonic()
            pending = pool.submit(d.post, P.PATH_TRANSCRIBE, content=png(), timeout=60)
            trigger_at = wait_until(lambda: fake.first("WATCHDOG=trigger"), GENERATE_TIMEOUT_S + 5,
                                    what="WATCHDOG=trigger")
            assert GENERATE_TIMEOUT_S <= trigger_at - sent < GENERATE_TIMEOUT_S + 3.0
            # No more "alive" pings once the generate is stuck past its deadline.
            threading.Event().wait(1.0)
            assert "WATCHDOG=1" not in fake.lines(since=trigger_at)
            assert any(m.startswith("STATUS=failed") for m in fake.lines(since=sent))
            r = d.get(P.PATH_READY)
            assert r.status_code == 503 and r.json()["state"] == "failed"
            assert d.returncode is None  # under systemd, systemd kills it; the daemon does not exit itself
            # systemd would now kill it; a SIGTERM instead: STOPPING=1, and the exit code says why.
            d.signal(signal.SIGTERM)
            assert d.wait_exit(30) == ExitCode.WATCHDOG
            abandoned = pending.result(30)  # answered, not dropped: 503, retry
            assert abandoned.status_code == 503 and abandoned.json()["error"]["type"] == "not_ready"
        assert fake.first("STOPPING=1") is not None
    finally:
        fake.close()


def test_notify_is_a_noop_without_notify_socket(monkeypatch):
    from htrd import sdnotify

    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False


def test_notify_reaches_an_abstract_notify_socket(monkeypatch):
    from htrd import sdnotify

    name = f"htrd-test-{os.getpid()}-{time.monotonic_ns()}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind("\0" + name)
    server.settimeout(5)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("READY=1\nSTATUS=ok") is True
        assert server.recv(100) == b"READY=1\nSTATUS=ok"
    finally:
        server.close()


def test_watchdog_usec_respects_watchdog_pid(monkeypatch):
    from htrd.supervisor import watchdog_usec

    assert watchdog_usec({}) is None
    assert watchdog_usec({"WATCHDOG_USEC": "2000000"}) == 2_000_000
    assert watchdog_usec({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}) == 2_000_000
    assert watchdog_usec({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}) is None  # meant for another process
    assert watchdog_usec({"WATCHDOG_USEC": "junk"}) is None
