"""Issue 15, "first contact": the small things a new administrator meets first, one test (or a few) per row.

Rows 1-3 have their own files: test_wheel_install.py (the wheel deploys itself),
systemd/test_service_render.py (`service install --root/--unit-dir` write only files),
test_output_errors.py (every OS error is one line); row 9's uvicorn hook: test_uvicorn_hook.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from htrctl.cli import hoist_global_options, main

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ row 6: CLI conventions
def test_root_options_may_follow_the_command(tmp_path, capsys):
    cfg = tmp_path / "htr.yaml"
    cfg.write_text("gpu:\n  select: cpu\n")
    assert main(["config", "show", "--json", "--config", str(cfg)]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["gpu"]["select"] == "cpu"
    assert main(["config", "check", "-c", str(cfg), "-q"]) == 0
    assert capsys.readouterr().out == f"{cfg}: ok\n"


def test_hoisting_leaves_values_and_the_end_of_options_alone():
    assert hoist_global_options(["transcribe", "-q", "-s", "x.sock", "d"]) == ["-q", "transcribe", "-s", "x.sock", "d"]
    assert hoist_global_options(["-c", "a", "config", "check", "--config", "b"]) == ["-c", "a", "--config", "b",
                                                                                    "config", "check"]
    assert hoist_global_options(["transcribe", "--", "-q"]) == ["transcribe", "--", "-q"]
    assert hoist_global_options(["provision", "--ssh", "ssh -v", "a", "b"]) == ["provision", "--ssh", "ssh -v", "a", "b"]


# ------------------------------------------------------------------ row 9: bench, Makefile
def test_makefile_installs_python3_venv():
    """`python3 -m venv` needs python3-venv on Debian/Ubuntu (ensurepip is split out)."""
    mk = (REPO / "Makefile").read_text()
    pkgs = re.search(r"^DEB_PACKAGES := (.*)$", mk, re.M).group(1).split()
    assert "python3-venv" in pkgs
    assert re.search(r"^test: system-deps venv", mk, re.M), "the Debian packages come before the venv"


@pytest.mark.slow
def test_bench_verify_keeps_an_existing_dir(tmp_path):
    work = tmp_path / "mine"
    work.mkdir()
    (work / "keep.txt").write_text("the user's")
    r = subprocess.run([sys.executable, str(REPO / "bench" / "bench_verify.py"), "--scale", "0.00002", "--repeat", "1",
                        "--dir", str(work)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "verify / sha256sum" in r.stdout
    assert sorted(p.name for p in work.iterdir()) == ["keep.txt"]  # its own work directory is gone, --dir is not
