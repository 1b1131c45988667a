"""Helpers shared by the command modules (rendering, JSON output)."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer


# Set once a command wrote its JSON document: an error after it must not add a second one.
json_emitted = False


def emit_json(data: Any) -> None:
    """Write *data* as JSON on stdout (data on stdout, diagnostics on stderr)."""
    global json_emitted
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    json_emitted = True


def use_color(stream: Any = None) -> bool:
    """Colour for a terminal, unless NO_COLOR is set (no-color.org) or TERM=dumb."""
    import os

    stream = stream if stream is not None else sys.stdout
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def info(msg: str, *, quiet: bool = False) -> None:
    """A diagnostic line on stderr."""
    if not quiet:
        typer.echo(msg, err=True)


def globals_of(ctx: typer.Context):
    return ctx.find_root().obj
