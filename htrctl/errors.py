"""The exception tree and the exit codes, in one place.

Every error a user can meet is an :class:`HtrError` subclass carrying a
one-line message, a remedy (what to do about it) and the process exit code.
``htrctl``'s entry point and ``htrd``'s ``main()`` translate them once
(see :func:`htrctl.cli.main`); commands carry no try/except of their own.

Exit codes (documented in the README; the daemon's are listed in
``RestartPreventExitStatus=`` of ``systemd/htr.service`` so a broken setup
does not restart in a loop):

====  =====================  ===============================================
code  name                   meaning
====  =====================  ===============================================
0     OK                     success
1     FAILURE                a check failed (verify, doctor) / generic error
2     USAGE                  bad command-line usage (typer/click)
3     MISSING_EXTRA          an optional dependency group is not installed
4     PARTIAL                transcribe: some inputs failed, the rest are done
5     WARNINGS               doctor: no failures, but warnings
65    MODEL                  model directory missing, incomplete or corrupt
69    GPU                    the configured GPU is absent or unusable
73    PROVISION              provisioning/sync failed (nothing was lost)
75    UNAVAILABLE            the daemon is not running / not ready (retry)
77    PERMISSION             permission denied (socket group, files)
78    CONFIG                 invalid configuration
86    WATCHDOG               htrd: inference stalled past its deadline
130   INTERRUPTED            Ctrl-C
====  =====================  ===============================================
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any


class ExitCode(IntEnum):
    OK = 0
    FAILURE = 1
    USAGE = 2
    MISSING_EXTRA = 3
    PARTIAL = 4
    WARNINGS = 5
    MODEL = 65
    GPU = 69
    PROVISION = 73
    UNAVAILABLE = 75
    PERMISSION = 77
    CONFIG = 78
    WATCHDOG = 86
    INTERRUPTED = 130


# The daemon's "do not restart, a human must fix this" codes.
NO_RESTART_EXIT_CODES = (ExitCode.CONFIG, ExitCode.MODEL, ExitCode.GPU)


class HtrError(Exception):
    """Base of every error htrctl/htrd reports to a user."""

    exit_code: ExitCode = ExitCode.FAILURE

    def __init__(self, message: str, *, remedy: str | None = None, detail: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.remedy = remedy
        self.detail = detail

    def one_line(self) -> str:
        """The message and the remedy, as printed on stderr."""
        if self.remedy:
            return f"{self.message} -- {self.remedy}"
        return self.message

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": type(self).__name__,
            "message": self.message,
            "remedy": self.remedy,
            "detail": self.detail,
            "exit_code": int(self.exit_code),
        }


class UsageError(HtrError):
    """Bad command-line input found after parsing (no inputs, colliding outputs...)."""

    exit_code = ExitCode.USAGE


class ConfigError(HtrError):
    """The configuration file or an HTR_* override is invalid."""

    exit_code = ExitCode.CONFIG


class MissingExtraError(HtrError):
    """An optional dependency group (extra) is not installed."""

    exit_code = ExitCode.MISSING_EXTRA

    def __init__(self, extra: str, module: str, purpose: str) -> None:
        super().__init__(
            f"{purpose} needs the '{extra}' extra (python module '{module}' is not installed)",
            remedy=f"pip install 'htrctl[{extra}]'",
        )
        self.extra = extra


class ModelError(HtrError):
    """The model directory is missing, incomplete, corrupt or inconsistent."""

    exit_code = ExitCode.MODEL


class ModelMissingError(ModelError):
    pass


class ModelCorruptError(ModelError):
    pass


class IncompatibleAdapterError(ModelError):
    pass


class VerifyError(ModelError):
    """``htrctl verify`` found problems (``detail`` holds the findings)."""


class GpuError(HtrError):
    """The configured GPU does not exist, is not usable, or is too small."""

    exit_code = ExitCode.GPU


class ProvisionError(HtrError):
    """Provisioning or syncing failed; the destination is left as it was."""

    exit_code = ExitCode.PROVISION


class LockedError(ProvisionError):
    """Another provision holds the destination's lock."""


class DaemonError(HtrError):
    """Talking to htrd failed."""

    exit_code = ExitCode.UNAVAILABLE


class DaemonUnavailableError(DaemonError):
    """The socket is missing / refuses connections (daemon down or restarting)."""


class DaemonNotReadyError(DaemonError):
    """The daemon answers but is not ready (loading, warming, draining, failed)."""


class DaemonPermissionError(DaemonError):
    exit_code = ExitCode.PERMISSION


class RequestError(DaemonError):
    """The daemon refused one request (4xx): the message names the cause."""

    exit_code = ExitCode.FAILURE


class ArchivalError(HtrError):
    """A PAGE-XML or ALTO input that cannot be used: malformed, hostile, an unknown format, its page image
    missing. Reported for that file; the run goes on with the others."""

    exit_code = ExitCode.FAILURE


class WatchdogError(HtrError):
    """htrd: inference made no progress within its deadline."""

    exit_code = ExitCode.WATCHDOG


class ServiceError(HtrError):
    """Installing or querying the systemd units failed."""

    exit_code = ExitCode.FAILURE


def require(module: str, extra: str, purpose: str):
    """Import *module* or raise :class:`MissingExtraError` naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # only the missing-module case is translated
        if exc.name and module.split(".")[0] != exc.name.split(".")[0]:
            raise
        raise MissingExtraError(extra, module, purpose) from exc
