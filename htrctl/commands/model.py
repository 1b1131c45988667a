"""``htrctl demo-model``: build the tiny demo model (needs the 'model' extra)."""

from __future__ import annotations

from pathlib import Path

import typer

from ._common import emit_json


def demo_model(
    dest: Path = typer.Argument(..., metavar="DEST", help="directory to write (replaced atomically)"),
    force: bool = typer.Option(False, "--force", help="rebuild even if an identical build is there"),
    json_out: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Write the tiny random-weight Qwen3-VL demo model (base + LoRA adapter in final_model/)."""
    from ..errors import require

    require("torch", "model", "building the demo model")
    require("transformers", "model", "building the demo model")
    require("peft", "model", "building the demo model")
    from ..demo_model import build_demo_model, tree_digest

    out = build_demo_model(dest, force=force)
    digest = tree_digest(out)
    if json_out:
        emit_json({"path": str(out), "digest": digest})
    else:
        typer.echo(f"{out}  (tree sha256 {digest[:16]}…; random weights, for testing only)")


def register(app: typer.Typer) -> None:
    app.command("demo-model")(demo_model)
