"""Issue 15, "first contact": the small things a new administrator meets first, one test (or a few) per row.

Rows 1-3 have their own files: test_wheel_install.py (the wheel deploys itself),
systemd/test_service_render.py (`service install --root/--unit-dir` write only files),
test_output_errors.py (every OS error is one line); row 9's uvicorn hook: test_uvicorn_hook.py.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from htrctl.cli import hoist_global_options, main

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ row 5: the model digest, verify
SHARD = "model-00002-of-00003.safetensors"


@pytest.fixture
def provisioned_copy(provisioned_model, tmp_path) -> Path:
    dest = tmp_path / "model"
    shutil.copytree(provisioned_model, dest)
    return dest


def test_same_files_give_the_same_digest_whenever_and_wherever_provisioned(demo_model_dir, provisioned_model,
                                                                             tmp_path):
    from htrctl.manifest import read_manifest
    from htrctl.provision import provision

    elsewhere = tmp_path / "other-source"
    shutil.copytree(demo_model_dir, elsewhere)
    again = provision(str(elsewhere), str(tmp_path / "again"), progress=False)
    first, digest = read_manifest(provisioned_model)
    second, _ = read_manifest(tmp_path / "again")
    assert first.sources != second.sources  # another source, another time: other manifest bytes
    assert (provisioned_model / "htr-manifest.json").read_bytes() != (tmp_path / "again/htr-manifest.json").read_bytes()
    assert again.manifest_digest == digest
    # what sha256sum over the files gives, by hand
    listing = "".join(f"{hashlib.sha256((provisioned_model / f.path).read_bytes()).hexdigest()}  {f.path}\n"
                      for f in sorted(first.files, key=lambda f: f.path))
    assert digest == hashlib.sha256(listing.encode()).hexdigest()


def test_a_directory_without_a_manifest_is_not_verified(demo_model_copy, capsys):
    assert main(["verify", str(demo_model_copy)]) == 1
    out = capsys.readouterr().out
    assert "NOT VERIFIED (no manifest)" in out and ": ok" not in out
    assert main(["verify", str(demo_model_copy), "--json"]) == 1
    rep = json.loads(capsys.readouterr().out)
    assert rep["ok"] is True and rep["verified"] is False


def test_verify_checks_the_manifests_own_identity(provisioned_copy):
    from htrctl.verify import verify_model_dir

    mpath = provisioned_copy / "htr-manifest.json"
    m = json.loads(mpath.read_text())
    m["adapter"]["sha256"] = "0" * 64
    m["base"]["model_type"] = "llama"
    m["adapter"]["r"] = 64
    mpath.write_text(json.dumps(m))
    r = verify_model_dir(provisioned_copy, quick=True)
    problems = [f.problem for f in r.findings if f.code == "manifest_inconsistent"]
    assert len(problems) == 3 and not r.ok, r.to_dict()
    assert any("adapter.sha256" in p for p in problems) and any("base.model_type 'llama'" in p for p in problems)
    assert any("adapter.r 64" in p for p in problems)


def test_a_truncated_shard_is_blamed_not_the_adapter_pair(provisioned_copy):
    from htrctl.verify import verify_model_dir

    p = provisioned_copy / SHARD
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size - 100)
    r = verify_model_dir(provisioned_copy, quick=True)
    found = {f.code for f in r.findings}
    assert "truncated" in found and "adapter_mismatch" not in found, r.to_dict()
    assert {f.path for f in r.findings} == {SHARD}


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
