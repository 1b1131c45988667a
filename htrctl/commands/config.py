"""``htrctl config show|check|template``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._common import emit_json, globals_of, info

config_app = typer.Typer(help="Show or check the configuration.", no_args_is_help=True)


@config_app.command("show")
def show(
    ctx: typer.Context,
    json_out: bool = typer.Option(False, "--json", help="JSON instead of YAML"),
) -> None:
    """Print the effective settings (file + HTR_* overrides + defaults)."""
    from ..config import dump_settings

    settings = globals_of(ctx).settings()
    if json_out:
        emit_json({"source": settings.source, "settings": settings.model_dump(mode="json")})
    else:
        info(f"# from {settings.source}")
        typer.echo(dump_settings(settings), nl=False)


@config_app.command("check")
def check(
    ctx: typer.Context,
    path: Optional[Path] = typer.Argument(None, metavar="[PATH]", help="config file (default: the lookup order)"),
) -> None:
    """Validate a config file, and what it needs from this host; exit 78 naming the field and the fix."""
    from ..config import host_problems

    settings = globals_of(ctx).settings(path)
    problems = host_problems(settings)
    for p in problems[1:]:
        info(f"htrctl: error: {p.one_line()}")
    if problems:
        raise problems[0]
    typer.echo(f"{settings.source}: ok")


@config_app.command("template")
def template() -> None:
    """Print the documented config (every setting, its default and allowed values), e.g. to start /etc/htr/htr.yaml."""
    from ..packaged import config_template

    typer.echo(config_template(), nl=False)


def register(app: typer.Typer) -> None:
    app.add_typer(config_app, name="config")
