"""The main thread's loop: signals, sd_notify, the watchdog, draining.

- Signal handlers only enqueue the signal; this loop acts on it.
- ``WATCHDOG=1`` is sent (every ``watchdog.ping_interval_s``, default half of
  ``$WATCHDOG_USEC``) only while the inference loop makes progress: a
  generate call running longer than ``watchdog.generate_timeout_s`` stops the
  pings and sends ``WATCHDOG=trigger`` (systemd then kills and restarts the
  service). Outside systemd (no ``$WATCHDOG_USEC``) the same condition makes
  the process exit with :data:`ExitCode.WATCHDOG` (86).
- While loading and warming: ``STATUS=`` progress, and ``EXTEND_TIMEOUT_USEC``
  (systemd's start timeout) and ``WATCHDOG=1`` only while a step reports
  progress within max(``watchdog.generate_timeout_s``, 120 s): a load that hangs
  is ended by systemd's ``TimeoutStartSec=``, never extended forever.
- SIGTERM/SIGINT: ``STOPPING=1``, state ``draining`` (new work gets 503),
  in-flight requests finish within ``limits.drain_timeout_s``, exit 0.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from typing import Any

from htrctl.errors import ExitCode, HtrError

from . import sdnotify
from .state import DRAINING, FAILED, LOADING, READY, STARTING, WARMING

logger = logging.getLogger(__name__)

EXTEND_STEP_S = 30.0  # each EXTEND_TIMEOUT_USEC asks for this much more start time
# One loading step (import, reading the weights, one warm-up shape) may take this long, or
# watchdog.generate_timeout_s if larger, before the start timeout is no longer extended.
LOAD_STEP_MIN_S = 120.0


def watchdog_usec(env: dict | None = None) -> int | None:
    """systemd's watchdog period for this process (``$WATCHDOG_USEC``), or None."""
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid.isdigit() and int(pid) != os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value if value > 0 else None


class Supervisor:
    def __init__(self, daemon, *, server=None, server_thread: threading.Thread | None = None) -> None:
        self.daemon = daemon
        self.settings = daemon.settings
        self.state = daemon.state
        self.engine = daemon.engine
        self.server = server  # uvicorn.Server
        self.server_thread = server_thread
        self.events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.wd_usec = watchdog_usec()
        wd = self.settings.watchdog
        self.generate_timeout_s = wd.generate_timeout_s
        if wd.ping_interval_s > 0:
            self.ping_interval_s: float | None = wd.ping_interval_s
        elif self.wd_usec:
            self.ping_interval_s = self.wd_usec / 2e6
        else:
            self.ping_interval_s = None
        self.tick_s = min(0.25, self.generate_timeout_s / 4, self.ping_interval_s or 0.25)
        self.triggered = False
        self._last_status: str | None = None
        self._next_ping = 0.0
        self._next_extend = 0.0
        self._load_stall_logged = False

    # -- signals: only enqueue -----------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.events.put(("signal", signum))

    # -- notifications ---------------------------------------------------------------------------------------
    def notify(self, message: str) -> None:
        try:
            sdnotify.notify(message)
        except OSError as exc:
            logger.warning("sd_notify(%s) failed: %s", message.split("=")[0], exc)

    def _status(self) -> None:
        st, detail = self.state.snapshot()
        text = st + (f": {detail}" if detail else "")
        if text != self._last_status:
            self._last_status = text
            self.notify(f"STATUS={text}")

    # -- watchdog --------------------------------------------------------------------------------------------
    def stalled_for(self, now: float) -> float | None:
        """Seconds the current generate call has run past its timeout, or None when healthy."""
        started = self.engine.generate_started_at
        if started is None:
            return None
        running = now - started
        return running if running > self.generate_timeout_s else None

    def _watchdog(self, now: float) -> int | None:
        """Ping or fire; returns an exit code when the process must exit now."""
        stalled = self.stalled_for(now)
        if stalled is not None:
            msg = (f"watchdog: a generate call has been running for {stalled:.1f}s, past "
                   f"watchdog.generate_timeout_s={self.generate_timeout_s:g}s (hung GPU or peer-to-peer copy?)")
            if self.wd_usec:
                if not self.triggered:
                    self.triggered = True
                    logger.critical("%s; WATCHDOG=trigger, systemd restarts the service", msg)
                    self.state.set(FAILED, "watchdog: generate stalled")
                    self.notify(f"STATUS=failed: {msg}")
                    self.notify("WATCHDOG=trigger")
                return None
            logger.critical("%s; exiting with code %d", msg, int(ExitCode.WATCHDOG))
            self.state.set(FAILED, "watchdog: generate stalled")
            return int(ExitCode.WATCHDOG)
        if self.engine.thread_error is not None:
            logger.critical("the inference thread died (%s); exiting so the service restarts",
                            type(self.engine.thread_error).__name__)
            return int(ExitCode.FAILURE)
        if self.ping_interval_s and not self.triggered and now >= self._next_ping:
            self._next_ping = now + self.ping_interval_s
            self.notify("WATCHDOG=1")
        return None

    def _load_stalled(self, now: float) -> bool:
        """Loading/warming reported no progress for max(generate_timeout_s, 120 s) (a generate is judged apart)."""
        if self.engine.generate_started_at is not None:
            return False
        quiet = now - self.state.progress_at
        if quiet <= max(self.generate_timeout_s, LOAD_STEP_MIN_S):
            self._load_stall_logged = False
            return False
        if not self._load_stall_logged:
            self._load_stall_logged = True
            logger.error("loading made no progress for %.0fs (%s); no longer extending the start timeout",
                         quiet, self.state.snapshot()[1])
        return True

    # -- the loop --------------------------------------------------------------------------------------------
    def run(self) -> int:
        """Run until stopped; returns the process exit code."""
        while True:
            try:
                kind, value = self.events.get(timeout=self.tick_s)
            except queue.Empty:
                kind, value = None, None
            now = time.monotonic()
            if kind == "signal":
                if value == signal.SIGHUP:
                    logger.info("SIGHUP ignored (restart the service to reload the configuration)")
                else:
                    logger.info("received %s: draining", signal.Signals(value).name)
                    return self.drain()
            elif kind == "ready":
                self._status()
                self.notify("READY=1")
                logger.info("ready: serving on %s", self.settings.socket.path)
            elif kind == "load_failed":
                err: BaseException = value
                self.state.set(FAILED, str(getattr(err, "message", err)))
                self._status()
                if isinstance(err, HtrError):
                    logger.error("%s", err.one_line())
                    code = int(err.exit_code)
                else:
                    logger.error("loading failed: %s: %s", type(err).__name__, err, exc_info=err)
                    code = int(ExitCode.FAILURE)
                self.stop_server()
                return code
            st = self.state.snapshot()[0]
            if st in (STARTING, LOADING, WARMING):
                self._status()
                if self._load_stalled(now):
                    continue  # no EXTEND_TIMEOUT_USEC, no WATCHDOG=1: systemd's start timeout ends it
                if now >= self._next_extend:
                    self._next_extend = now + EXTEND_STEP_S / 3
                    self.notify(f"EXTEND_TIMEOUT_USEC={int(EXTEND_STEP_S * 1e6)}")
            code = self._watchdog(now)
            if code is not None:
                return code
            if self.server_thread is not None and not self.server_thread.is_alive():
                logger.critical("the HTTP server stopped unexpectedly; exiting")
                return int(ExitCode.FAILURE)

    def drain(self) -> int:
        """SIGTERM: refuse new work, finish in-flight work within limits.drain_timeout_s."""
        timeout = self.settings.limits.drain_timeout_s
        self.state.set(DRAINING, f"stopping: finishing in-flight work (up to {timeout:g}s)")
        self.notify("STOPPING=1")
        self._status()
        deadline = time.monotonic() + timeout
        code = 0
        while True:
            now = time.monotonic()
            if self.state.in_flight == 0 and self.engine.idle():
                logger.info("drained: no request in flight")
                break
            if now >= deadline:
                logger.warning("drain timeout (limits.drain_timeout_s=%gs): %d request(s) still in flight are "
                               "abandoned", timeout, self.state.in_flight)
                break
            wd = self._watchdog(now)
            if wd is not None:
                code = wd
                break
            if self.triggered:
                logger.warning("a generate call is stuck (watchdog fired): in-flight work cannot finish; stopping now")
                break
            try:
                kind, value = self.events.get(timeout=self.tick_s)
                if kind == "signal" and value == signal.SIGINT:
                    logger.warning("second SIGINT: stopping without waiting")
                    break
            except queue.Empty:
                pass
        if self.triggered and code == 0:
            code = int(ExitCode.WATCHDOG)
        abandoned = self.engine.abandon("htrd stopped before this request could finish; retry")
        if abandoned:
            logger.warning("%d image(s) abandoned by the stop (answered 503 not_ready)", abandoned)
            self.state.wait_idle(2.0)  # let their handlers send the 503s before the server closes
        self.engine.stop()
        self.stop_server()
        return code

    def stop_server(self, timeout: float = 5.0) -> None:
        if self.server is None:
            return
        self.server.should_exit = True
        if self.server_thread is not None and self.server_thread.is_alive():
            self.server_thread.join(timeout)
            if self.server_thread.is_alive():
                self.server.force_exit = True
                self.server_thread.join(1.0)


__all__ = ["Supervisor", "watchdog_usec", "READY"]
