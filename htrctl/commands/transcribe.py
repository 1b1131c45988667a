"""``htrctl transcribe PATH...``: send images to the running daemon(s)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ._common import globals_of


def transcribe(
    ctx: typer.Context,
    paths: List[str] = typer.Argument(
        ..., metavar="PATH...", help="image files, PAGE/ALTO files (.xml), directories (recursive) or - for stdin"
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="write one file per input here (<name>.<format>), atomically"
    ),
    fmt: str = typer.Option(
        "jsonl", "--format", "-f",
        help="txt | jsonl | json | page | alto (page/alto: an XML file around each image's text, with --out)",
    ),
    include: List[str] = typer.Option(
        [], "--include", help="glob of files to take from directories (repeatable; default: common image types)"
    ),
    exclude: List[str] = typer.Option([], "--exclude", help="glob of files to leave out (repeatable)"),
    socket: List[str] = typer.Option(
        [], "--socket", "-s", help="daemon socket, or ssh://[user@]host[:port]/run/htr/htr.sock (repeatable: "
        "spread work over replicas, local and remote); default: socket.path"
    ),
    concurrency: int = typer.Option(
        0, "--concurrency", "-j", min=0, max=1024,
        help="requests in flight per socket (0: twice the daemon's largest batch size, keeping its batches full)",
    ),
    timeout: float = typer.Option(120.0, "--timeout", min=0.1, help="seconds per request"),
    wait: Optional[float] = typer.Option(
        None, "--wait", min=0.0,
        help="wait up to this many seconds for the daemon to be ready, also when it is not running yet "
        "(default: a daemon that is loading is waited for as long as --retry-for; one that is down fails at once)",
    ),
    retry_for: float = typer.Option(
        120.0, "--retry-for", min=0.0, help="keep retrying a daemon that restarts mid-run for this many seconds"
    ),
    resume: bool = typer.Option(False, "--resume", help="skip inputs whose output in --out is complete"),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1, help="cap tokens per image"),
    images: Optional[Path] = typer.Option(
        None, "--images", help="PAGE/ALTO inputs: their page images are here (default: beside the XML file)"
    ),
    replace: bool = typer.Option(
        False, "--replace", help="PAGE/ALTO inputs: recognise lines that already have a text too, replacing it"
    ),
    in_place: bool = typer.Option(
        False, "--in-place", help="PAGE/ALTO inputs: write the texts into the input files (atomically)"
    ),
    shard: Optional[str] = typer.Option(
        None, "--shard", help="only part I of N of the sorted inputs (I/N, 0-based), or 'slurm' (the array task's)"
    ),
) -> None:
    """Transcribe images through htrd. Data on stdout (or --out), progress and errors on stderr.

    A PAGE-XML or ALTO file (its lines already segmented) gets its lines cut out of its page image, sent
    as one batch, and the texts written back into a copy under --out (same file name) or, with --in-place,
    into the file itself. Directories give only images unless --include '*.xml' is passed.

    Exit 0 when every input is done, 4 when some failed (the rest are done), 75 when the daemon is down.
    """
    from ..replicas import open_sockets
    from ..shard import parse_shard
    from ..transcribe import FORMATS, TranscribeOptions, run_transcribe

    if fmt not in FORMATS:
        raise typer.BadParameter(f"{fmt!r} is not one of {', '.join(FORMATS)}", param_hint="--format")
    if resume and out is None:
        raise typer.BadParameter("--resume needs --out DIR", param_hint="--resume")
    g = globals_of(ctx)
    # ssh://[user@]host[:port]/path sockets are forwarded by ssh while the command runs (htrctl/replicas.py).
    sockets = ctx.with_resource(open_sockets(list(socket), note=lambda m: typer.echo(m, err=True))) if socket \
        else [g.settings().socket.path]
    opts = TranscribeOptions(
        inputs=list(paths), sockets=sockets, fmt=fmt, out_dir=out, include=list(include), exclude=list(exclude),
        concurrency=concurrency, timeout=timeout, wait=wait, retry_for=retry_for, resume=resume,
        max_new_tokens=max_new_tokens, quiet=g.quiet, images_dir=images, replace=replace, in_place=in_place,
        shard=parse_shard(shard),
    )
    summary = run_transcribe(opts)
    raise typer.Exit(summary.exit_code)


def register(app: typer.Typer) -> None:
    app.command("transcribe")(transcribe)
