"""``htrctl``: the admin CLI. Thin: parse, call one library function, render.

Known errors (:class:`htrctl.errors.HtrError`) are translated here, once, into
one actionable line on stderr and a documented exit code; a traceback only
with ``--debug`` (or ``HTR_DEBUG=1``).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from . import __version__
from .errors import ExitCode, HtrError

logger = logging.getLogger(__name__)

app = typer.Typer(
    name="htrctl",
    help="Deploy, check and use the handwritten-text-recognition service (htrd).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Each module in htrctl/commands registers its commands with `register(app)`.
# They import their heavy dependencies lazily, inside the command functions.
COMMAND_MODULES = ["config", "model", "transcribe", "status", "demo", "service", "provision", "doctor"]


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


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point: run the app, translate known errors into one line + exit code."""
    debug = os.environ.get("HTR_DEBUG", "") not in ("", "0") or "--debug" in (argv or sys.argv[1:])
    try:
        # standalone mode: click prints usage errors itself (exit 2) and handles Ctrl-C.
        app(args=argv, prog_name="htrctl")
    except HtrError as exc:
        if debug:
            logger.exception("error")
        typer.echo(f"htrctl: error: {exc.one_line()}", err=True)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        typer.echo("htrctl: interrupted", err=True)
        return int(ExitCode.INTERRUPTED)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
