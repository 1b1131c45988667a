"""Helpers shared by the command modules (rendering, JSON output)."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer


def emit_json(data: Any) -> None:
    """Write *data* as JSON on stdout (data on stdout, diagnostics on stderr)."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def info(msg: str, *, quiet: bool = False) -> None:
    """A diagnostic line on stderr."""
    if not quiet:
        typer.echo(msg, err=True)


def globals_of(ctx: typer.Context):
    return ctx.find_root().obj
