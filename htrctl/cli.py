"""``htrctl``: the admin CLI. Thin: parse, call one library function, render.

Known errors (:class:`htrctl.errors.HtrError`) are translated here, once, into
one actionable line on stderr and a documented exit code; a traceback only
with ``--debug`` (or ``HTR_DEBUG=1``).
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import re
import sys
from pathlib import Path
from typing import Optional

import typer

from . import __version__
from .errors import ExitCode, HtrError, from_os_error

logger = logging.getLogger(__name__)

app = typer.Typer(
    name="htrctl",
    help="Deploy, check and use the handwritten-text-recognition service (htrd). "
    "The options below may also follow the command (htrctl transcribe ... -q).",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish)
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: flags without "<bool>", arguments as SOURCE DEST
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Each module in htrctl/commands registers its commands with `register(app)`.
# They import their heavy dependencies lazily, inside the command functions.
COMMAND_MODULES = ["config", "model", "transcribe", "status", "demo", "service", "provision", "doctor", "job", "slurm"]


class Globals:
    """Options of the root command, reachable from every command as ctx.obj."""

    def __init__(self, config: Optional[Path], debug: bool, verbose: int, quiet: bool) -> None:
        self.config = config
        self.debug = debug
        self.verbose = verbose
        self.quiet = quiet

    def settings(self, override: Optional[Path] = None):
        from .config import load_settings

        return load_settings(override or self.config)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"htrctl {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    config: Optional[Path] = typer.Option(
        None, "--config", "-c", envvar="HTR_CONFIG", help="config file (default: $HTR_CONFIG, /etc/htr/htr.yaml)"
    ),
    debug: bool = typer.Option(False, "--debug", envvar="HTR_DEBUG", help="show tracebacks"),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="more log output (-vv for debug)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress output"),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version"),
) -> None:
    from .logs import setup_logging

    level = "DEBUG" if (debug or verbose >= 2) else "INFO" if verbose == 1 else "WARNING"
    setup_logging(level)
    ctx.obj = Globals(config, debug, verbose, quiet)


for _name in COMMAND_MODULES:
    importlib.import_module(f"htrctl.commands.{_name}").register(app)


_STDOUT_ERRNOS = (errno.EPIPE, errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG)


def _report(exc: HtrError, debug: bool) -> int:
    """The one error path: one line on stderr (a traceback with --debug), the documented exit code."""
    if exc.quiet:
        _silence_stdout()
    else:
        if debug:
            logger.error("error", exc_info=exc)
        try:
            typer.echo(f"htrctl: error: {exc.one_line()}", err=True)
        except OSError:  # stderr is gone too: the exit code still says it
            pass
    return int(exc.exit_code)


def _json_error(exc: HtrError, argv: list[str]) -> None:
    """With --json, a script gets its JSON document on stdout even when the command failed: {"error": {...}}."""
    from .commands import _common

    if "--json" not in argv or exc.quiet or _common.json_emitted:
        return
    try:
        _common.emit_json({"error": exc.to_dict()})
    except OSError:
        pass  # stdout is broken as well: the line on stderr and the exit code remain


def _silence_stdout() -> None:
    """Point fd 1 at /dev/null so that the interpreter's last flush of a broken stdout cannot fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # not a real file (tests capture it)
        pass


def _flush_stdout() -> Optional[HtrError]:
    """Flush stdout now, inside the error path: a full disk or a closed pipe is an error, not a traceback."""
    try:
        sys.stdout.flush()
    except OSError as exc:
        _silence_stdout()
        return from_os_error(exc, target="stdout")
    return None


_GLOBAL_FLAGS = {"--debug", "--quiet", "-q", "--verbose", "-v"}
_GLOBAL_WITH_VALUE = {"--config", "-c"}


def hoist_global_options(argv: list[str]) -> list[str]:
    """Move the root's options (--config/-c, --debug, -q, -v) written after the command before it.

    click only accepts a group's options before the subcommand; people write
    ``htrctl transcribe ... -q`` or ``htrctl config check --config F``. No
    command reuses these names; everything after ``--`` is left alone. A
    hoisted option comes after the ones already in front, so it wins.
    """
    i = 0
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "--":  # the root's own options
        i += 2 if argv[i] in _GLOBAL_WITH_VALUE else 1
    lead, hoisted, rest = argv[:i], [], []
    if i < len(argv):
        rest.append(argv[i])  # the command (or "--")
        i += 1
    while i < len(argv):
        a = argv[i]
        if a == "--" or rest[:1] == ["--"]:
            rest += argv[i:]
            break
        if a in _GLOBAL_FLAGS or re.fullmatch(r"-v+", a):
            hoisted.append(a)
        elif a in _GLOBAL_WITH_VALUE and i + 1 < len(argv):
            hoisted += argv[i:i + 2]
            i += 1
        elif a.startswith("--config=") or (a.startswith("-c") and not a.startswith("--") and len(a) > 2):
            hoisted.append(a)
        else:
            rest.append(a)
        i += 1
    return lead + hoisted + rest


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point: run the app, translate known errors into one line + exit code."""
    argv = hoist_global_options(list(sys.argv[1:] if argv is None else argv))
    from .commands import _common

    _common.json_emitted = False  # per run (main may be called again in one process)
    debug = os.environ.get("HTR_DEBUG", "") not in ("", "0") or "--debug" in argv
    try:
        # standalone mode: click prints usage errors itself (exit 2) and handles Ctrl-C.
        app(args=argv, prog_name="htrctl")
        code = 0
    except HtrError as exc:
        code = _report(exc, debug)
        _json_error(exc, argv)
    except OSError as exc:  # an OS error no library call translated: the same one-line path
        # Without a file name, a write error of this kind comes from writing stdout (click flushes each echo).
        on_stdout = exc.filename is None and exc.errno in _STDOUT_ERRNOS
        code = _report(from_os_error(exc, target="stdout" if on_stdout else None), debug)
    except KeyboardInterrupt:
        typer.echo("htrctl: interrupted", err=True)
        code = int(ExitCode.INTERRUPTED)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if code == ExitCode.INTERRUPTED and isinstance(getattr(exc.__context__, "__cause__", None), KeyboardInterrupt):
            typer.echo("htrctl: interrupted", err=True)  # typer turned Ctrl-C into a silent exit 130
        if type(sys.stdout).__name__ == "PacifyFlushWrapper":  # click met EPIPE on stdout and exited 1
            code = _report(from_os_error(BrokenPipeError(errno.EPIPE, "Broken pipe"), target="stdout"), debug)
    failed_flush = _flush_stdout()
    if failed_flush is not None:
        flush_code = _report(failed_flush, debug)
        code = code or flush_code  # output that did not arrive is never a success
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
