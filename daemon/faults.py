"""Fault injection for tests. TEST-ONLY: never set ``HTR_TEST_FAULTS`` in production.

``HTR_TEST_FAULTS`` is a comma-separated list; without it every fault is off.

- ``hang_generate``       every serving ``generate`` call blocks forever (a hung
                          peer-to-peer copy); the watchdog must notice.
- ``slow_generate=S``     every serving ``generate`` call takes S more seconds.
- ``slow_load=S``         loading takes S more seconds (readiness states).
- ``oom`` / ``oom=N``     the next N (default 1) serving ``generate`` calls raise
                          ``torch.cuda.OutOfMemoryError``.
- ``crash``               the process dies abruptly (SIGKILL) at the first
                          serving ``generate`` call.
- ``crash_preprocess=W``  a preprocessing worker process dies abruptly
                          (``os._exit``) on every image W pixels wide (a
                          decoder crashing on a hostile file).
- ``hang_preprocess=W``   a preprocessing worker process never finishes an
                          image W pixels wide (a decoder looping on one).
- ``fail_preprocess_start`` the preprocessing worker processes fail to start
                          (a host whose multiprocessing does not work).

Warm-up is never faulted, so a faulted daemon still reaches READY.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

logger = logging.getLogger(__name__)

ENV = "HTR_TEST_FAULTS"
KNOWN = ("hang_generate", "slow_generate", "slow_load", "oom", "crash", "crash_preprocess", "hang_preprocess",
         "fail_preprocess_start")


@dataclass
class Faults:
    hang_generate: bool = False
    slow_generate_s: float = 0.0
    slow_load_s: float = 0.0
    oom_remaining: int = 0
    crash: bool = False
    crash_preprocess_width: int = 0
    hang_preprocess_width: int = 0
    fail_preprocess_start: bool = False

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        return bool(self.hang_generate or self.slow_generate_s or self.slow_load_s or self.oom_remaining or self.crash
                    or self.crash_preprocess_width or self.hang_preprocess_width or self.fail_preprocess_start)

    def take_oom(self) -> bool:
        """True (once per remaining count) when this generate must raise an OOM."""
        with self._lock:
            if self.oom_remaining > 0:
                self.oom_remaining -= 1
                return True
            return False

    @classmethod
    def parse(cls, spec: str | None) -> Faults:
        """Parse ``HTR_TEST_FAULTS``; an unknown or malformed entry is a ValueError."""
        faults = cls()
        for raw in (spec or "").split(","):
            item = raw.strip()
            if not item:
                continue
            name, _, value = item.partition("=")
            name = name.strip()
            try:
                if name == "hang_generate":
                    faults.hang_generate = True
                elif name == "slow_generate":
                    faults.slow_generate_s = float(value)
                elif name == "slow_load":
                    faults.slow_load_s = float(value)
                elif name == "oom":
                    faults.oom_remaining = int(value) if value else 1
                elif name == "crash":
                    faults.crash = True
                elif name == "crash_preprocess":
                    faults.crash_preprocess_width = int(value)
                elif name == "hang_preprocess":
                    faults.hang_preprocess_width = int(value)
                elif name == "fail_preprocess_start":
                    faults.fail_preprocess_start = True
                else:
                    raise ValueError(f"unknown fault {name!r} (known: {', '.join(KNOWN)})")
            except ValueError as exc:
                raise ValueError(f"${ENV}: bad entry {item!r}: {exc}") from None
        return faults

    @classmethod
    def from_env(cls, env: dict | None = None) -> Faults:
        spec = (os.environ if env is None else env).get(ENV)
        faults = cls.parse(spec)
        if faults.active:
            logger.warning("TEST-ONLY fault injection is ON ($%s=%s); never use this in production", ENV, spec)
        return faults
