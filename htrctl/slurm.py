"""``htrctl slurm script``: an ``sbatch`` script that transcribes a collection as a job array.

Task I of N runs ``htrctl run-job --shard slurm --resume --out DIR INPUTS``:
its own htrd on the GPU Slurm granted it (``--gres=gpu:1``), the inputs of
shard I (:mod:`htrctl.shard`), outputs written atomically. ``--requeue`` lets
Slurm put a task back in the queue when its node fails or it is preempted (or
on ``scontrol requeue``); ``--resume`` makes the re-run skip every input whose
output is complete, so nothing is transcribed twice and nothing is lost.
A task that hit its time limit is not requeued by Slurm: submitting the same
script again finishes what is left (finished tasks exit at once).

The script is printed, not submitted: read it, keep it with the collection,
``sbatch`` it.
"""

from __future__ import annotations

import math
import shlex
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from . import __version__
from .errors import UsageError

DEFAULT_PER_TASK = 2000  # inputs per array task when --tasks is not given (about an hour on one GPU)


@dataclass
class ScriptOptions:
    inputs: list[str]
    out_dir: Path
    tasks: int = 0  # 0: ceil(inputs / per_task)
    per_task: int = DEFAULT_PER_TASK
    gpus: int = 1  # per task; 0: CPU only (the config must say gpu.select: cpu)
    cpus_per_task: int = 4
    mem: str | None = "32G"
    time: str = "04:00:00"
    partition: str | None = None
    account: str | None = None
    max_running: int = 0  # the array's %throttle; 0: no limit
    job_name: str = "htr"
    log: str = "htr-%A_%a.log"
    config: Path | None = None
    transcribe_args: list[str] = field(default_factory=list)  # more `htrctl transcribe` options (--format json ...)
    htrctl: list[str] = field(default_factory=lambda: [sys.executable, "-m", "htrctl"])
    extra_sbatch: list[str] = field(default_factory=list)  # more #SBATCH lines' options ("--qos=long")


def count_inputs(inputs: list[str], include: list[str] | None = None, exclude: list[str] | None = None) -> int:
    from .transcribe import discover_inputs

    items, missing = discover_inputs(inputs, include=include, exclude=exclude)
    if missing:
        raise UsageError(f"{missing[0][0]}: {missing[0][1]}", remedy="the script's inputs must exist when it runs")
    return len(items)


def render_script(o: ScriptOptions, n_inputs: int) -> str:
    """The sbatch script's text."""
    if "-" in o.inputs:
        raise UsageError("an array job cannot read stdin (-)", remedy="pass files or directories")
    if n_inputs < 1:
        raise UsageError(f"no images found in {', '.join(o.inputs)}")
    tasks = o.tasks or math.ceil(n_inputs / max(1, o.per_task))
    tasks = max(1, min(tasks, n_inputs))
    array = f"0-{tasks - 1}" + (f"%{o.max_running}" if o.max_running else "")
    sb = [f"--job-name={o.job_name}", f"--array={array}", "--ntasks=1", f"--cpus-per-task={o.cpus_per_task}"]
    if o.gpus:
        sb.append(f"--gres=gpu:{o.gpus}")
    if o.mem:
        sb.append(f"--mem={o.mem}")
    sb += [f"--time={o.time}", "--requeue", "--open-mode=append", f"--output={o.log}"]
    if o.partition:
        sb.append(f"--partition={o.partition}")
    if o.account:
        sb.append(f"--account={o.account}")
    sb += o.extra_sbatch
    cmd = [*o.htrctl]
    if o.config is not None:
        cmd += ["--config", str(Path(o.config).absolute())]
    cmd += ["run-job", "--shard", "slurm", "--resume", "--out", str(Path(o.out_dir).absolute()),
            *o.transcribe_args, *[str(Path(p).absolute()) for p in o.inputs]]
    for x in sb:
        if any(c.isspace() for c in x):
            raise UsageError(f"sbatch option {x!r} contains white space", remedy="#SBATCH lines take no quoting")
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    per = math.ceil(n_inputs / tasks)
    lines = [
        "#!/bin/bash",
        f"# Written by htrctl {__version__} (htrctl slurm script) on {now}:",
        f"# {n_inputs} inputs in {tasks} array task(s) of at most {per}; task I transcribes shard I/{tasks}.",
        "# A requeued or resubmitted task skips the inputs whose output is complete (--resume).",
        *[f"#SBATCH {x}" for x in sb],
        "",
        "set -u",
        "exec " + " ".join(shlex.quote(c) for c in cmd),
        "",
    ]
    return "\n".join(lines)
