"""``htrctl run-job``: the job's GPU from the scheduler's grant, and the command against a real htrd (CPU)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import SAMPLES, run_htrctl

from htrctl.errors import ExitCode, GpuError
from htrctl.gpus import GpuDevice
from htrctl.jobs import granted_gpus, job_gpu_selects, resolve_granted

GIB = 1024**3


def devs(n: int) -> list[GpuDevice]:
    return [GpuDevice(i, f"GPU-{i:08d}-aaaa", "NVIDIA L40S", f"00000000:{0x10 + i:02X}:00.0", 48 * GIB, 47 * GIB)
            for i in range(n)]


def test_granted_gpus_from_the_environment():
    assert granted_gpus({"CUDA_VISIBLE_DEVICES": "2", "SLURM_JOB_GPUS": "2"}) == ["2"]
    assert granted_gpus({"SLURM_JOB_GPUS": "1,3"}) == ["1", "3"]
    assert granted_gpus({"CUDA_VISIBLE_DEVICES": "GPU-abc"}) == ["GPU-abc"]
    assert granted_gpus({"CUDA_VISIBLE_DEVICES": "", "SLURM_JOB_GPUS": "1"}) == []  # explicitly none
    assert granted_gpus({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}) == []
    assert granted_gpus({}) == []


def test_granted_gpu_indices_resolve_to_uuids_in_pci_order():
    four = devs(4)
    assert resolve_granted(["2"], four) == ["GPU-00000002-aaaa"]  # the node's index, PCI order
    assert resolve_granted(["1", "3"], four) == ["GPU-00000001-aaaa", "GPU-00000003-aaaa"]
    assert resolve_granted(["0"], devs(1)) == ["GPU-00000000-aaaa"]  # ConstrainDevices: the job sees its own
    assert resolve_granted(["GPU-x"], four) == ["GPU-x"]
    with pytest.raises(GpuError, match="does not list"):
        resolve_granted(["7"], four)


def test_a_job_serves_on_its_granted_gpus_and_never_another_jobs():
    assert job_gpu_selects("cpu", {"SLURM_JOB_ID": "1", "CUDA_VISIBLE_DEVICES": "0"}) == ["cpu"]
    assert job_gpu_selects("most-free", {"CUDA_VISIBLE_DEVICES": "1"}, list_gpus=lambda: devs(2)) == [
        "GPU-00000001-aaaa"]
    assert job_gpu_selects("most-free", {}) == ["most-free"]  # outside a scheduler: the config's policy
    with pytest.raises(GpuError, match="granted no GPU"):  # never another job's GPU
        job_gpu_selects("most-free", {"SLURM_JOB_ID": "12"})


htrctl = run_htrctl


def config(tmp: Path, model: Path, select: str = "cpu") -> Path:
    p = tmp / "htr.yaml"
    p.write_text(json.dumps({
        "model": {"dir": str(model), "verify_on_start": "quick"}, "gpu": {"select": select},
        "limits": {"batch_sizes": [1, 2], "batch_window_ms": 5.0}, "generation": {"max_new_tokens": 4},
    }))
    return p


def test_refusals_before_anything_starts(tmp_path):
    cfg = config(tmp_path, tmp_path / "no-model", select="most-free")
    r = htrctl("--config", str(cfg), "run-job", "--socket", "/x.sock", "--out", str(tmp_path / "o"), str(tmp_path))
    assert r.returncode == ExitCode.USAGE and "do not pass --socket" in r.stderr, r.stderr
    r = htrctl("--config", str(cfg), "run-job", "--out", str(tmp_path / "o"), str(tmp_path),
               env={"SLURM_JOB_ID": "5"})
    assert r.returncode == ExitCode.GPU and "granted no GPU" in r.stderr, r.stderr
    assert "starting htrd" not in r.stderr


@pytest.mark.slow
def test_model_missing_is_htrds_exit_code(tmp_path):
    r = htrctl("--config", str(config(tmp_path, tmp_path / "no-model")), "run-job", "--out", str(tmp_path / "o"),
               str(SAMPLES))
    assert r.returncode == ExitCode.MODEL, r.stderr
    assert "htrd exited with code 65 before it was ready" in r.stderr and "does not exist" in r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_run_job_transcribes_and_stops_its_daemon(tmp_path, provisioned_model):
    src = tmp_path / "in"
    src.mkdir()
    for p in SAMPLES.iterdir():
        if p.suffix in (".png", ".jpg"):
            shutil.copyfile(p, src / p.name)
    import tempfile

    tmpdir = Path(tempfile.mkdtemp(prefix="htr-jobtmp-"))  # the job's $TMPDIR (short: the socket goes in it)
    out = tmp_path / "out"
    r = htrctl("--config", str(config(tmp_path, provisioned_model)), "run-job", "--out", str(out), "-f", "txt",
               "--shard", "1/2", str(src), env={"TMPDIR": str(tmpdir)})
    assert r.returncode == 0, r.stderr
    assert "htrctl: 1 htrd ready" in r.stderr and "shard 1/2: 1 of 3 inputs" in r.stderr
    assert [p.name for p in out.iterdir()] == ["line-02.png.txt"]
    assert "(socket " + str(tmpdir) + "/htr-job-" in r.stderr  # the socket was in the job's temp dir ...
    assert list(tmpdir.glob("htr-job-*")) == []  # ... and its directory is gone: htrd stopped, nothing left
    assert "exited with" not in r.stderr  # htrd's drain ended with 0
    shutil.rmtree(tmpdir)


def test_slurm_script_renders_the_array_and_the_run_job_line(tmp_path):
    from htrctl.errors import UsageError
    from htrctl.slurm import ScriptOptions, render_script

    o = ScriptOptions(inputs=[str(tmp_path / "scans")], out_dir=tmp_path / "texts", per_task=1000,
                      partition="gpu", max_running=8, config=tmp_path / "htr.yaml", transcribe_args=["--format", "txt"],
                      htrctl=["/opt/htr/bin/htrctl"])
    text = render_script(o, 2500)
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    for want in ("#SBATCH --array=0-2%8", "#SBATCH --gres=gpu:1", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                 "#SBATCH --partition=gpu", "#SBATCH --time=04:00:00"):
        assert want in lines, text
    assert lines[-1] == (f"exec /opt/htr/bin/htrctl --config {tmp_path}/htr.yaml run-job --shard slurm --resume "
                         f"--out {tmp_path}/texts --format txt {tmp_path}/scans")
    cpu = render_script(ScriptOptions(inputs=["x"], out_dir=Path("o"), tasks=50, gpus=0), 3)
    assert "#SBATCH --array=0-2" in cpu and "--gres" not in cpu  # never more tasks than inputs
    with pytest.raises(UsageError, match="stdin"):
        render_script(ScriptOptions(inputs=["-"], out_dir=Path("o")), 1)
    with pytest.raises(UsageError, match="white space"):
        render_script(ScriptOptions(inputs=["x"], out_dir=Path("o"), extra_sbatch=["--comment=a b"]), 1)
