"""The daemon's explicit readiness state and its counters.

States (``htrctl.protocol.STATES``): ``starting`` (socket bound, nothing
loaded) -> ``loading`` (weights) -> ``warming`` (first generate of every batch
size) -> ``ready`` -> ``draining`` (SIGTERM: no new work) ; ``failed`` from any
of them. Only ``ready`` accepts transcriptions.
"""

from __future__ import annotations

import logging
import threading
import time

from htrctl.protocol import DRAINING, FAILED, LOADING, READY, STARTING, WARMING, Counters

logger = logging.getLogger(__name__)

_ALLOWED = {
    STARTING: {LOADING, DRAINING, FAILED},
    LOADING: {WARMING, DRAINING, FAILED},
    WARMING: {READY, DRAINING, FAILED},
    READY: {DRAINING, FAILED},
    DRAINING: {FAILED},
    FAILED: {DRAINING},
}


class DaemonState:
    """Thread-safe state, detail text, request accounting and counters."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.state = STARTING
        self.detail: str | None = "starting"
        self.started_at = time.monotonic()
        self.started_wall = time.time()
        self.ready_at: float | None = None
        self.in_flight = 0  # accepted transcription requests not yet answered
        self.counters = Counters()
        self.history: list[tuple[str, float]] = [(STARTING, 0.0)]
        self.progress_at = self.started_at  # last state change or progress report (loading, warming)

    # -- state -----------------------------------------------------------------------------------
    def set(self, new: str, detail: str | None = None) -> bool:
        """Move to *new*; an impossible transition (e.g. out of draining) is ignored and False."""
        with self._lock:
            if new == self.state:
                self.detail = detail
                return True
            if new not in _ALLOWED[self.state]:
                logger.debug("ignored state change %s -> %s", self.state, new)
                return False
            logger.info("state %s -> %s%s", self.state, new, f" ({detail})" if detail else "")
            self.state = new
            self.detail = detail
            now = time.monotonic()
            self.progress_at = now
            self.history.append((new, now - self.started_at))
            if new == READY:
                self.ready_at = now
            self._changed.notify_all()
            return True

    def set_detail(self, detail: str) -> None:
        """Progress while loading/warming (also what ``STATUS=`` shows; logged: where a slow start went)."""
        logger.info("%s: %s", self.state, detail)
        with self._lock:
            self.detail = detail
            self.progress_at = time.monotonic()

    def snapshot(self) -> tuple[str, str | None]:
        with self._lock:
            return self.state, self.detail

    @property
    def is_ready(self) -> bool:
        return self.state == READY

    def uptime(self) -> float:
        return time.monotonic() - self.started_at

    # -- requests ----------------------------------------------------------------------------------
    def try_begin_request(self) -> bool:
        """Admit a transcription request (only while ready); pair with :meth:`end_request`."""
        with self._lock:
            if self.state != READY:
                return False
            self.in_flight += 1
            return True

    def end_request(self) -> None:
        with self._lock:
            self.in_flight -= 1
            self._changed.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self.in_flight > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(min(left, 0.1))
            return True

    def count(self, **increments: int) -> None:
        with self._lock:
            for name, n in increments.items():
                setattr(self.counters, name, getattr(self.counters, name) + n)

    def counters_copy(self) -> Counters:
        with self._lock:
            return self.counters.model_copy()
