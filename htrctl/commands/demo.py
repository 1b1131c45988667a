"""``htrctl demo``: the main job end to end on the tiny demo model (CPU is enough)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._common import emit_json


def demo(
    workdir: Optional[Path] = typer.Option(
        None, "--workdir", help="where the demo model, its provisioned copy and the daemon's log go "
        "(default: ~/.cache/htrctl/demo; the model build is cached there)"
    ),
    json_out: bool = typer.Option(False, "--json", help="print a JSON report on stdout (progress on stderr)"),
) -> None:
    """Build the demo model, provision, verify, doctor, serve it with htrd and transcribe the samples.

    The demo model's weights are random: the text is noise; the pipeline is real. Needs the 'daemon' extra.
    """
    from ..errors import require

    for mod in ("torch", "transformers", "peft"):
        require(mod, "model", "htrctl demo (it builds and serves the demo model)")
    require("fastapi", "daemon", "htrctl demo (it starts htrd)")
    from ..demo import run_demo

    if json_out:
        report = run_demo(workdir, say=lambda line: typer.echo(line, err=True))
        emit_json(report)
    else:
        run_demo(workdir, say=typer.echo)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
