"""``htrctl slurm script``: print an sbatch script that transcribes a collection as a Slurm job array."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

slurm_app = typer.Typer(help="Transcribe on a Slurm cluster (job arrays; see README, 'Scaling out').",
                        no_args_is_help=True)


@slurm_app.command("script")
def script(
    ctx: typer.Context,
    paths: List[str] = typer.Argument(..., help="image files or directories (as `htrctl transcribe` takes them)"),
    out: Path = typer.Option(..., "--out", "-o", help="the output directory (on storage every node sees)"),
    tasks: int = typer.Option(0, "--tasks", "-n", min=0, help="array size (0: one task per --per-task inputs)"),
    per_task: int = typer.Option(2000, "--per-task", min=1, help="inputs per task when --tasks is 0"),
    gpus: int = typer.Option(1, "--gpus", min=0, help="GPUs per task (--gres=gpu:N; 0: CPU only, gpu.select: cpu)"),
    cpus: int = typer.Option(4, "--cpus-per-task", min=1, help="CPU cores per task (image decoding, the client)"),
    mem: str = typer.Option("32G", "--mem", help="memory per task ('' leaves it to the partition's default)"),
    time_limit: str = typer.Option("04:00:00", "--time", help="time limit per task (a timed-out task resumes "
                                   "when the script is submitted again)"),
    partition: Optional[str] = typer.Option(None, "--partition", "-p", help="Slurm partition"),
    account: Optional[str] = typer.Option(None, "--account", "-A", help="Slurm account"),
    max_running: int = typer.Option(0, "--max-running", min=0, help="at most this many tasks at once (%N)"),
    job_name: str = typer.Option("htr", "--job-name", "-J", help="the job's name"),
    log: str = typer.Option("htr-%A_%a.log", "--log", help="each task's log (%A job id, %a task id); "
                            "its directory must exist"),
    fmt: str = typer.Option("jsonl", "--format", "-f", help="output format: txt | jsonl | json"),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1, help="cap tokens per image"),
    include: List[str] = typer.Option([], "--include", help="glob of files to take from directories (repeatable)"),
    exclude: List[str] = typer.Option([], "--exclude", help="glob of files to leave out (repeatable)"),
    sbatch: List[str] = typer.Option([], "--sbatch", help="another sbatch option for the script, e.g. --qos=long "
                                     "(repeatable)"),
) -> None:
    """Print an sbatch script: an array of tasks, each `htrctl run-job --shard slurm --resume`."""
    from ..slurm import ScriptOptions, count_inputs, render_script
    from ._common import globals_of

    g = globals_of(ctx)
    targs = ["--format", fmt]
    if max_new_tokens is not None:
        targs += ["--max-new-tokens", str(max_new_tokens)]
    for x in include:
        targs += ["--include", x]
    for x in exclude:
        targs += ["--exclude", x]
    opts = ScriptOptions(
        inputs=list(paths), out_dir=out, tasks=tasks, per_task=per_task, gpus=gpus, cpus_per_task=cpus,
        mem=mem or None, time=time_limit, partition=partition, account=account, max_running=max_running,
        job_name=job_name, log=log, config=g.config, transcribe_args=targs, extra_sbatch=list(sbatch),
    )
    typer.echo(render_script(opts, count_inputs(list(paths), include=list(include), exclude=list(exclude))), nl=False)


def register(app: typer.Typer) -> None:
    app.add_typer(slurm_app, name="slurm")
