"""``htrctl run-job [OPTIONS] TRANSCRIBE-ARGS...``: htrd and a transcription inside one batch job."""

from __future__ import annotations

from typing import Optional

import typer

from ._common import globals_of

HELP = """Start htrd in this job (its GPU from the scheduler), transcribe, stop it; exit with transcribe's code.

Every other argument is `htrctl transcribe`'s (paths, --out, --shard slurm, --resume, --format ...),
except --socket: the job's own daemon(s) listen on sockets in a private directory under $TMPDIR.
`htrctl slurm script` writes an sbatch script that runs this command in an array.
"""


def run_job(
    ctx: typer.Context,
    start_timeout: float = typer.Option(
        600.0, "--start-timeout", min=1.0, help="seconds to wait for htrd to load the model and be ready"
    ),
    htrd_log_level: Optional[str] = typer.Option(
        None, "--htrd-log-level", help="htrd's log level (DEBUG, INFO, WARNING, ERROR; default: log.level)"
    ),
) -> None:
    from ..errors import UsageError
    from ..jobs import run_job as run

    g = globals_of(ctx)
    root = ctx.find_root()
    cmd = root.command.get_command(root, "transcribe")
    args = list(ctx.args)
    # Parse transcribe's arguments before anything starts: a usage error costs no model load.
    probe = cmd.make_context("transcribe", ["--socket=/run-job"] + args, parent=root)
    if len(probe.params.get("socket") or []) != 1:
        raise UsageError("run-job starts its own daemon: do not pass --socket")
    settings = g.settings()

    def transcribe(sockets) -> int:
        sub = cmd.make_context("transcribe", [f"--socket={s}" for s in sockets] + args, parent=root)
        try:
            with sub:
                cmd.invoke(sub)
        except typer.Exit as exc:
            return int(exc.exit_code)
        return 0

    code = run(transcribe, config=g.config, gpu_select=settings.gpu.select,
               drain_timeout_s=settings.limits.drain_timeout_s, start_timeout=start_timeout,
               log_level=htrd_log_level, note=lambda m: typer.echo(m, err=True) if not g.quiet else None)
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command("run-job", help=HELP, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(
        run_job
    )
