"""`htrctl demo` end to end in a subprocess: the README's first command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO


def _run_demo(workdir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HTR_")}
    return subprocess.run([sys.executable, "-m", "htrctl", "demo", "--workdir", str(workdir), *extra],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=240)


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, demo_model_dir):
    """One run with --json: the report on stdout, the human lines (the same as without --json) on stderr."""
    from htrctl.demo import _link_tree

    work = tmp_path / "demo"
    # Seed the demo model build from the session cache (the build itself is tested in test_demo_model.py).
    _link_tree(demo_model_dir, work / "demo-model")
    r = _run_demo(work, "--json")
    out = r.stderr
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for step in range(1, 8):
        assert f"[{step}/7]" in out
    # the trap: the adapter names a hub id; provision refuses without a base, then resolves it locally
    assert "names the base by hub id 'Qwen/Qwen3-VL-8B-Instruct'" in out
    assert "without --base: refused at once, nothing downloaded" in out
    assert "resolved to the local copy" in out and "0 bytes downloaded" in out
    assert "[3/7] verify: ok" in out
    # doctor on a CPU host says plainly that there is no GPU
    assert "no NVIDIA driver found" in out
    # served on a private socket, every sample page transcribed through the client
    assert "device cpu" in out
    assert "transcribed 4 of 4 inputs (5 pages)" in out
    assert out.count("page-2p.tif") >= 2 and "line-01.png" in out
    assert "weights are random, so the text above is noise" in out
    assert "stopped htrd (SIGTERM): exit code 0" in out
    # nothing was fetched: the HF cache the test gave it stays empty
    hub = Path(os.environ["HF_HUB_CACHE"])
    assert not hub.exists() or not any(hub.iterdir())

    rep = json.loads(r.stdout)
    assert rep["ok"] is True
    steps = rep["steps"]
    assert list(steps) == ["build", "provision", "verify", "doctor", "serve", "transcribe", "stop"]
    assert steps["provision"]["hub_id"] == "Qwen/Qwen3-VL-8B-Instruct"
    assert "loading would download it" in steps["provision"]["without_base_error"]
    assert steps["verify"]["manifest_digest"] == steps["serve"]["status"]["manifest_digest"]
    assert steps["transcribe"]["summary"]["pages"] == 5 and steps["transcribe"]["summary"]["failed"] == 0
    assert all(p["tokens"] > 0 for rec in steps["transcribe"]["results"] for p in rec["pages"])
    assert steps["stop"]["exit_code"] == 0
    assert rep["seconds"] < 60
