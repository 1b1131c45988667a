"""systemd queries: the one way htrctl runs ``systemctl`` and reads ``systemctl show``.

``htrctl service`` (install, status, restart), ``htrctl status`` (the unit's line)
and ``htrctl doctor`` (installed, enabled, active) all ask systemd through here.
A failure is a :class:`~htrctl.errors.ServiceError` naming the command and the
last line it printed (:class:`~htrctl.errors.ServicePermissionError` when that
line says "denied").
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Sequence
from pathlib import Path

from .errors import ServiceError, ServicePermissionError

logger = logging.getLogger(__name__)

# Present when systemd is PID 1 (sd_booted(3)).
BOOTED_MARKER = Path("/run/systemd/system")


def run(argv: Sequence[str], *, check: bool = True, timeout: float = 120.0,
        capture: bool = True) -> subprocess.CompletedProcess:
    """Run a host tool (systemctl, and the install's groupadd/useradd) with stdin closed.

    A missing program, a timeout and (with *check*) a non-zero exit are :class:`ServiceError`.
    """
    logger.debug("running %s", " ".join(argv))
    try:
        proc = subprocess.run(
            list(argv), capture_output=capture, text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL
        )
    except FileNotFoundError as exc:
        raise ServiceError(f"{argv[0]} not found", remedy="this needs systemd and shadow-utils (useradd)") from exc
    except subprocess.TimeoutExpired as exc:
        raise ServiceError(f"{' '.join(argv)} did not finish within {timeout:.0f} s") from exc
    if check and proc.returncode != 0:
        err = (proc.stderr or proc.stdout or "").strip().splitlines()
        msg = err[-1] if err else f"exit status {proc.returncode}"
        cls = ServicePermissionError if "denied" in msg.lower() else ServiceError
        raise cls(f"{' '.join(argv)} failed: {msg}", remedy="see `htrctl service logs` and `systemctl status htr`")
    return proc


def booted(marker: Path = BOOTED_MARKER) -> bool:
    """True when systemd is PID 1 here (sd_booted(3))."""
    return marker.is_dir()


def require_booted(marker: Path = BOOTED_MARKER) -> None:
    if not booted(marker):
        raise ServiceError(
            f"systemd is not running on this machine (no {marker})",
            remedy="run htrd directly (htrd --config ...), or only write the units with --root/--unit-dir",
        )


def systemctl(*args: str, check: bool = True, timeout: float = 120.0, exe: str = "systemctl",
              marker: Path = BOOTED_MARKER) -> subprocess.CompletedProcess:
    """``systemctl --no-pager ARGS``; :class:`ServiceError` where systemd is not running."""
    require_booted(marker)
    return run([exe, "--no-pager", *args], check=check, timeout=timeout)


def parse_show(text: str) -> dict[str, str]:
    """``systemctl show``'s ``Key=value`` lines as a dict (a value may itself contain ``=``)."""
    props: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            props[key] = value
    return props


def show(unit: str, properties: Sequence[str], *, timeout: float = 120.0) -> dict[str, str]:
    """*properties* of *unit* from ``systemctl show``."""
    return parse_show(systemctl("show", unit, "--property=" + ",".join(properties), timeout=timeout).stdout)


def is_active(unit: str) -> bool:
    return systemctl("is-active", "--quiet", unit, check=False).returncode == 0


def is_enabled(unit: str) -> bool:
    return systemctl("is-enabled", "--quiet", unit, check=False).returncode == 0
