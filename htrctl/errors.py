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
3     NOT_RUNNING            service status: the unit is not running (LSB's and systemctl's 3)
4     PARTIAL                transcribe: some inputs failed, the rest are done
5     WARNINGS               doctor: no failures, but warnings
6     MISSING_EXTRA          an optional dependency group is not installed
65    MODEL                  model directory missing, incomplete or corrupt
69    GPU                    the configured GPU is absent or unusable
73    PROVISION              provisioning/sync failed (nothing was lost)
74    IO                     a file or stdout could not be written (disk full, I/O error)
75    UNAVAILABLE            the daemon is not running / not ready (retry)
77    PERMISSION             permission denied (socket group, files)
78    CONFIG                 invalid configuration
86    WATCHDOG               htrd: inference stalled past its deadline
130   INTERRUPTED            Ctrl-C
141   PIPE                   stdout's reader went away (``| head``): ends quietly
====  =====================  ===============================================

Each code means one thing (:func:`enum.unique` refuses two names for one value).
An :class:`OSError` that reaches the entry point (a full disk, a directory the
user may not write, a closed pipe) goes through the same path:
:func:`from_os_error` turns it into one line with the file, the cause and the
fix.
"""

from __future__ import annotations

import errno
import re
from enum import IntEnum, unique
from typing import Any


@unique
class ExitCode(IntEnum):
    OK = 0
    FAILURE = 1
    USAGE = 2
    NOT_RUNNING = 3  # `htrctl service status` only: the LSB init-script code for "program is not running"
    PARTIAL = 4
    WARNINGS = 5
    MISSING_EXTRA = 6
    MODEL = 65
    GPU = 69
    PROVISION = 73
    IO = 74
    UNAVAILABLE = 75
    PERMISSION = 77
    CONFIG = 78
    WATCHDOG = 86
    INTERRUPTED = 130
    PIPE = 141  # 128 + SIGPIPE, what a shell reports for a writer killed by SIGPIPE


# The daemon's "do not restart, a human must fix this" codes.
NO_RESTART_EXIT_CODES = (ExitCode.CONFIG, ExitCode.MODEL, ExitCode.GPU)


class HtrError(Exception):
    """Base of every error htrctl/htrd reports to a user."""

    exit_code: ExitCode = ExitCode.FAILURE
    # True: the entry point prints nothing (e.g. the reader of stdout went away).
    quiet: bool = False

    def __init__(self, message: str, *, remedy: str | None = None, detail: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.remedy = remedy
        self.detail = detail

    @property
    def kind(self) -> str:
        """The error's type for scripts (``--json``): stable, snake_case, without "Error"
        (``ConfigError`` -> ``config``, ``DaemonUnavailableError`` -> ``daemon_unavailable``)."""
        name = type(self).__name__
        name = name[: -len("Error")] if name.endswith("Error") and name != "Error" else name
        return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()

    def one_line(self) -> str:
        """The message and the remedy, as printed on stderr."""
        if self.remedy:
            return f"{self.message} -- {self.remedy}"
        return self.message

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.kind,
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


class DaemonBusyError(DaemonError):
    """503 queue_full: the daemon's queue is full; retry after ``retry_after`` seconds."""


class RequestError(DaemonError):
    """The daemon refused one request (4xx): the message names the cause."""

    exit_code = ExitCode.FAILURE


class DaemonTimeoutError(DaemonError):
    """No answer within the request's timeout (or the daemon's deadline, 504)."""

    exit_code = ExitCode.FAILURE


class ArchivalError(HtrError):
    """A PAGE-XML or ALTO input that cannot be used: malformed, hostile, an unknown format, its page image
    missing. Reported for that file; the run goes on with the others."""

    exit_code = ExitCode.FAILURE


class WatchdogError(HtrError):
    """htrd: inference made no progress within its deadline."""

    exit_code = ExitCode.WATCHDOG


class InterruptedRunError(HtrError):
    """Ctrl-C: the message says what was left where, the remedy how to go on."""

    exit_code = ExitCode.INTERRUPTED


class FileAccessError(HtrError):
    """An OS error on a file or directory (permission denied, read-only filesystem)."""

    exit_code = ExitCode.PERMISSION


class OutputError(HtrError):
    """A file or stdout could not be written (disk full, I/O error)."""

    exit_code = ExitCode.IO


class OutputClosedError(OutputError):
    """stdout's reader went away (``htrctl ... | head``): end quietly, as SIGPIPE would."""

    exit_code = ExitCode.PIPE
    quiet = True


_REMEDIES = {
    errno.ENOSPC: "free space on that filesystem, or write somewhere else",
    errno.EDQUOT: "your disk quota is used up: free space, or write somewhere else",
    errno.EROFS: "that filesystem is mounted read-only: choose another place",
    errno.EACCES: "you may not write there: choose a place you own, or run it as a user who may (e.g. sudo)",
    errno.EPERM: "the operation is not permitted there: choose a place you own, or run it as a user who may",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a directory: check the path",
    errno.EISDIR: "give a file, not a directory",
    errno.EIO: "the device reported an I/O error: check the disk (dmesg)",
}


def from_os_error(exc: OSError, *, target: str | None = None) -> HtrError:
    """One :class:`HtrError` for an :class:`OSError`: the file (or *target*), the cause, the fix."""
    if isinstance(exc, BrokenPipeError) or exc.errno == errno.EPIPE:
        return OutputClosedError(f"{target or 'output'}: the reader went away")
    where = target or exc.filename
    cause = exc.strerror or str(exc) or type(exc).__name__
    message = f"{where}: {cause}" if where else cause
    if exc.filename2:
        message += f" (-> {exc.filename2})"
    remedy = _REMEDIES.get(exc.errno or 0)
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return FileAccessError(message, remedy=remedy)
    return OutputError(message, remedy=remedy)


class ServiceError(HtrError):
    """Installing or querying the systemd units failed."""

    exit_code = ExitCode.FAILURE


class ServicePermissionError(ServiceError):
    """Installing needs root (writing /etc, creating a user, systemctl)."""

    exit_code = ExitCode.PERMISSION


class DemoError(HtrError):
    """A demo step failed (the message names the step and where its log is)."""

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
