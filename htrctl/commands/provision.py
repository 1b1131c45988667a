"""``htrctl provision SOURCE DEST`` and ``htrctl verify DIR``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._common import emit_json, globals_of, info


def provision_cmd(
    ctx: typer.Context,
    source: str = typer.Argument(..., metavar="SOURCE", help="model directory, adapter, [user@]host:/path or hf://org/name[@rev]"),
    dest: str = typer.Argument(..., metavar="DEST", help="directory to produce: local or [user@]host:/path"),
    base: Optional[str] = typer.Option(None, "--base", help="the adapter's base: directory, host:path or hf://repo"),
    merge: bool = typer.Option(False, "--merge", help="also write the adapter folded into the base (merged/)"),
    dry_run: bool = typer.Option(False, "--dry-run", "-n", help="say what would move; change nothing"),
    allow_download: bool = typer.Option(
        False, "--allow-download", help="allow fetching a missing base from the Hugging Face hub (never implicit)"
    ),
    ssh: Optional[str] = typer.Option(None, "--ssh", envvar="HTR_SSH", help="ssh command for host:path (default ssh)"),
    transport: str = typer.Option(
        "auto", "--transport", help="pulling from host:path: rsync, sftp (no rsync there: Windows OpenSSH, "
        "internal-sftp accounts) or auto (rsync when the remote has it)"),
    json_out: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Bring a complete, verified model directory (base + adapter) to DEST; never downloads implicitly."""
    from ..provision import provision

    g = globals_of(ctx)
    result = provision(source, dest, base=base, merge=merge, dry_run=dry_run, allow_download=allow_download,
                       progress=not (g.quiet or json_out), ssh=ssh,
                       transport=transport)
    if json_out:
        emit_json(result.to_dict())
        return
    if dry_run:
        for a in result.actions:
            typer.echo(f"{a.kind:8} {a.path}" + (f"  ({a.size} bytes)" if a.size else ""))
    info(result.summary(), quiet=g.quiet)
    if result.manifest_digest and not result.noop:
        info(f"manifest sha256 {result.manifest_digest}", quiet=g.quiet)


def verify_cmd(
    ctx: typer.Context,
    path: Path = typer.Argument(..., metavar="DIR", help="model directory"),
    quick: bool = typer.Option(False, "--quick", help="sizes, headers and structure only (no full sha256)"),
    json_out: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Check a model directory against its manifest: exit 0 only when everything holds."""
    from ..verify import verify_model_dir

    g = globals_of(ctx)
    report = verify_model_dir(path, quick=quick, progress=not (g.quiet or json_out))
    if json_out:
        emit_json(report.to_dict())
    else:
        for f in report.findings:
            typer.echo(f"{f.severity.upper():7} {f.path}: {f.problem}\n        fix: {f.remedy}", err=True)
        what = "sizes, headers and structure" if quick else f"{report.bytes_hashed / 2**20:.1f} MiB hashed"
        status = ("ok" if report.verified else "NOT VERIFIED (no manifest)" if report.ok
                  else f"FAILED ({len(report.errors)} problem(s))")
        typer.echo(f"{path}: {status} ({report.files_checked} files; {what})")
    if not report.verified:  # exit 0 only when everything holds, checked against a manifest
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("provision")(provision_cmd)
    app.command("verify")(verify_cmd)
