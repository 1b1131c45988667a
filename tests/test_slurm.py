"""Slurm job arrays end to end: a real munged + slurmctld + slurmd on this machine (tests/slurm_harness.py).

The script under test is the one ``htrctl slurm script`` prints (the README shows
the same command); each task runs ``htrctl run-job`` with its own htrd on the
demo model (CPU). Needs root and the Debian packages munge, slurmctld, slurmd,
slurm-client (``make system-deps``); under HTR_CI=1 their absence fails.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, make_inputs, output_files, require_system, wait_until
from slurm_harness import SlurmCluster, missing_binaries

from htrctl.shard import Shard

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = missing_binaries()
    require_system(not missing and os.geteuid() == 0,
                   f"a Slurm to run as root (missing: {', '.join(missing) or 'root'}; packages munge slurmctld "
                   "slurmd slurm-client)")
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
    except AssertionError as exc:
        c.stop()
        require_system(False, f"a Slurm that starts ({exc})")
    yield c
    c.stop()


def job_config(tmp: Path, model: Path, **limits) -> Path:
    cfg = {
        "model": {"dir": str(model), "verify_on_start": "quick"},
        "gpu": {"select": "cpu"},
        "limits": {"batch_sizes": [1, 2], "batch_window_ms": 5.0, "drain_timeout_s": 10.0, **limits},
        "generation": {"max_new_tokens": 4},
        "log": {"level": "WARNING"},
    }
    path = tmp / "htr.yaml"
    path.write_text(json.dumps(cfg))
    return path


def write_script(tmp: Path, config: Path, inputs: Path, out: Path, tasks: int) -> Path:
    """``htrctl slurm script`` as the README shows it (CPU tasks: --gpus 0, one core each)."""
    (tmp / "logs").mkdir()
    r = subprocess.run(
        [sys.executable, "-m", "htrctl", "--config", str(config), "slurm", "script", "--tasks", str(tasks),
         "--gpus", "0", "--cpus-per-task", "1", "--mem", "", "--time", "00:10:00", "--format", "json",
         "--log", str(tmp / "logs" / "%A_%a.log"), "--out", str(out), str(inputs)],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert f"#SBATCH --array=0-{tasks - 1}" in r.stdout and "--requeue" in r.stdout
    script = tmp / "htr.sbatch"
    script.write_text(r.stdout)
    return script


def test_array_of_three_covers_every_input_once(slurm, tmp_path, provisioned_model):
    rels = make_inputs(tmp_path / "in", 6)
    out = tmp_path / "out"
    script = write_script(tmp_path, job_config(tmp_path, provisioned_model), tmp_path / "in", out, 3)
    job = slurm.sbatch(script, cwd=tmp_path)
    states = slurm.wait_job(job, timeout=600)
    logs = {i: (tmp_path / "logs" / f"{job}_{i}.log").read_text() for i in range(3)}
    assert states == {f"{job}_{i}": "COMPLETED" for i in range(3)}, (states, logs)

    assert output_files(out) == sorted(f"{r}.json" for r in rels)
    digests = set()
    for i, text in logs.items():
        m = re.search(r"shard (\d)/3: (\d+) of 6 inputs \(input list (\w+)\)", text)
        assert m and int(m.group(1)) == i and m.group(2) == "2", text
        digests.add(m.group(3))
        assert "transcribed 2 of 2 inputs" in text, text
        mine = Shard(i, 3).select(rels, key=str)
        for rel in mine:  # the record names the task's own input
            assert json.loads((out / f"{rel}.json").read_text())["input"].endswith(rel)
    assert len(digests) == 1  # every task saw the same input list


def test_task_requeued_mid_run_finishes_without_duplicates(slurm, tmp_path, provisioned_model):
    """Task 0 is requeued (SIGTERM, then back to the queue) while it transcribes; its re-run skips what it wrote."""
    rels = make_inputs(tmp_path / "in", 8)
    out = tmp_path / "out"
    script = write_script(tmp_path, job_config(tmp_path, provisioned_model, batch_sizes=[1]), tmp_path / "in",
                          out, 2)
    env = dict(slurm.env(), HTR_TEST_FAULTS="slow_generate=1.0")  # each image takes a second: a window to hit
    job = slurm.sbatch(script, env=env, cwd=tmp_path)
    shard0 = {f"{r}.json" for r in Shard(0, 2).select(rels, key=str)}
    log0 = tmp_path / "logs" / f"{job}_0.log"

    def some_of_shard0_done():
        st = slurm.tasks(job).get(f"{job}_0")
        assert st in ("PENDING", "RUNNING", "CONFIGURING"), (st, log0.read_text() if log0.exists() else "")
        done = shard0 & set(output_files(out))
        return done if 1 <= len(done) < len(shard0) else None

    wait_until(some_of_shard0_done, 300, "task 0 to be part-way through its shard", interval=0.1)
    slurm.run(["scontrol", "requeue", f"{job}_0"])

    def requeued():
        return "interrupted: transcribed" in log0.read_text()

    wait_until(requeued, 120, "task 0's first run to stop", interval=0.2)
    # Back in the queue: Slurm holds a requeued job back (BeginTime, CredExpire+1 s); let it start now.
    wait_until(lambda: slurm.tasks(job).get(f"{job}_0") == "PENDING", 120, "task 0 to be pending again",
               interval=0.2)
    info = slurm.job_info(f"{job}_0")
    assert int(info.get("Restarts", "0")) >= 1, info
    slurm.run(["scontrol", "update", f"JobId={job}_0", "StartTime=now"])
    states = slurm.wait_job(job, timeout=600)
    text = log0.read_text()
    assert states == {f"{job}_0": "COMPLETED", f"{job}_1": "COMPLETED"}, (states, text)
    assert output_files(out) == sorted(f"{r}.json" for r in rels)
    assert not list(out.rglob("*.htr-part"))

    first = re.search(r"interrupted: transcribed (\d+) of 4 inputs", text)
    second = re.search(r"transcribed (\d+) of 4 inputs [^\n]*; (\d+) already done \(--resume\)", text)
    assert first and second, text
    written_first, written_again, skipped = int(first.group(1)), int(second.group(1)), int(second.group(2))
    assert 1 <= written_first < 4
    assert skipped == written_first  # the re-run skipped exactly what the killed run wrote ...
    assert written_again == 4 - written_first  # ... and transcribed only the rest: each input once
    assert "transcribed 4 of 4 inputs" in (tmp_path / "logs" / f"{job}_1.log").read_text()
