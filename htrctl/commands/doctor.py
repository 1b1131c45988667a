"""``htrctl doctor``: check GPUs, topology, a real P2P copy, host, placement, model and service."""

from __future__ import annotations

from typing import List, Optional

import typer

from ._common import emit_json, globals_of, info, use_color


def doctor(
    ctx: typer.Context,
    json_out: bool = typer.Option(False, "--json", help="the report as JSON (for monitoring)"),
    section: Optional[List[str]] = typer.Option(
        None, "--section", "-s",
        help="only these sections (repeatable): driver, topology, p2p, host, placement, model, service",
    ),
    no_p2p: bool = typer.Option(False, "--no-p2p", help="skip the real peer-to-peer copy test"),
    p2p_timeout: float = typer.Option(30.0, "--p2p-timeout", min=1.0, help="hard limit for the P2P test, seconds"),
    write_config: bool = typer.Option(
        False, "--write-config", help="write the recommended GPU (gpu.select: <UUID>) into the config file"
    ),
) -> None:
    """Check this machine before anything loads.

    Exit codes: 0 all checks ok, 5 warnings only, 1 at least one failure.
    """
    from ..doctor import render_table, run_doctor

    g = globals_of(ctx)
    settings = g.settings()
    report = run_doctor(settings, sections=section, p2p=not no_p2p, p2p_timeout=p2p_timeout)
    written = None
    if write_config:
        from ..doctor.placement import write_recommendation

        written = write_recommendation(_config_target(g, settings), report.recommendation["uuid"]) \
            if report.recommendation else None
    if json_out:
        data = report.to_dict()
        data["config_written"] = str(written) if written else None
        emit_json(data)
    else:
        typer.echo(render_table(report, verbose=g.verbose > 0, color=use_color()), nl=False)
    if write_config:
        info(f"wrote gpu.select: {report.recommendation['uuid']} to {written}" if written
             else "no GPU to recommend: config not changed", quiet=g.quiet)
    raise typer.Exit(report.exit_code)


def _config_target(g, settings):
    from pathlib import Path

    from ..config import SYSTEM_CONFIG

    if settings.source and settings.source != "<defaults>":
        return Path(settings.source)
    return g.config or SYSTEM_CONFIG


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor)
