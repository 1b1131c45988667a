"""provision over ssh: a real sshd on 127.0.0.1 (own port, generated keys) and real rsync.

The test's sshd runs from a config in tmp_path (``sshd -D -f``): no system
configuration is touched. Needs ``sshd`` and ``rsync`` (``make test`` installs them).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import sshd_harness
from helpers import require_system, wait_until

from htrctl.manifest import read_manifest
from htrctl.provision import provision
from htrctl.verify import verify_model_dir

pytestmark = [pytest.mark.ssh, pytest.mark.timeout(180)]

SHARD = "model-00002-of-00003.safetensors"


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    require_system(sshd_harness.available() and bool(shutil.which("rsync")), "sshd and rsync")
    with sshd_harness.sshd_server(tmp_path_factory.mktemp("sshd")) as server:
        yield server


def test_provision_to_a_remote_and_back_verifies_both_ways(sshd, demo_model_copy, tmp_path):
    host, ssh = sshd["host"], sshd["ssh"]
    remote = tmp_path / "remote" / "model"
    r = provision(str(demo_model_copy), f"{host}:{remote}", ssh=ssh, progress=False)
    assert not r.noop and r.bytes_copied >= r.total_size * 0.9  # rsync's literal data: everything moved
    report = verify_model_dir(remote)  # the "remote" is this machine: check what landed
    assert report.ok, report.to_dict()
    assert report.manifest_digest == r.manifest_digest
    assert not (remote.parent / ".model.htr-work").exists()

    # up to date: a no-op
    again = provision(str(demo_model_copy), f"{host}:{remote}", ssh=ssh, progress=False)
    assert again.noop and again.bytes_copied == 0

    # one shard changed: only that shard moves
    shard = demo_model_copy / SHARD
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    inode = (remote / "config.json").stat().st_ino
    r2 = provision(str(demo_model_copy), f"{host}:{remote}", ssh=ssh, progress=False)
    assert [a.path for a in r2.actions if a.kind == "copy"] == [SHARD]
    assert 0 < r2.bytes_copied <= shard.stat().st_size
    assert (remote / "config.json").stat().st_ino == inode  # --link-dest: unchanged files are not copied
    assert verify_model_dir(remote).ok

    # and back: remote SOURCE to a local DEST
    local = tmp_path / "back" / "model"
    r3 = provision(f"{host}:{remote}", str(local), ssh=ssh, progress=False)
    assert verify_model_dir(local).ok
    assert {e.sha256 for e in read_manifest(local)[0].files} == {e.sha256 for e in read_manifest(remote)[0].files}
    assert r3.bytes_copied > 0
    r4 = provision(f"{host}:{remote}", str(local), ssh=ssh, progress=False)
    assert r4.noop


def test_a_remote_adapter_with_a_remote_base_provisions_locally(sshd, demo_model_dir, tmp_path):
    host, ssh = sshd["host"], sshd["ssh"]
    src = tmp_path / "srv" / "adapter-only"
    shutil.copytree(demo_model_dir / "final_model", src / "final_model")
    base = tmp_path / "srv" / "base"
    shutil.copytree(demo_model_dir, base, ignore=shutil.ignore_patterns("final_model"))
    dest = tmp_path / "dest"
    provision(f"{host}:{src}", str(dest), base=f"{host}:{base}", ssh=ssh, progress=False)
    assert verify_model_dir(dest).ok and (dest / SHARD).is_file()


def _model_with_big_file(demo_model_dir: Path, root: Path, size: int) -> Path:
    shutil.copytree(demo_model_dir, root)
    header = json.dumps({"blob": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(root / "aux.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.write(os.urandom(size))
    return root


@pytest.mark.slow
@pytest.mark.parametrize(
    "direction, sig",
    [
        ("push", signal.SIGKILL),  # local side killed outright; the remote receiver keeps the partial file
        ("pull", signal.SIGTERM),  # local receiver interrupted (Ctrl-C, shutdown); it keeps the partial file
    ],
)
def test_killed_mid_transfer_then_resumed(sshd, demo_model_dir, tmp_path, direction, sig):
    host, ssh = sshd["host"], sshd["ssh"]
    size = 12 * 2**20
    src = _model_with_big_file(demo_model_dir, tmp_path / "src" / "model", size)
    dest = tmp_path / "dst" / "model"
    s, d = (str(src), f"{host}:{dest}") if direction == "push" else (f"{host}:{src}", str(dest))
    staging = dest.parent / ".model.htr-work" / "tree"
    env = dict(os.environ, HTR_SSH=ssh, HTR_RSYNC_OPTS="--bwlimit=3000")  # ~3 MB/s: the kill lands mid-file
    proc = subprocess.Popen([sys.executable, "-m", "htrctl", "-q", "provision", s, d], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def partial_written():  # rsync's temp file for aux.safetensors, a few MB in
        if proc.poll() is not None:
            raise AssertionError(f"provision ended before the kill: {proc.stderr.read().decode()}")
        return any(p.name.startswith(".aux.safetensors.") and p.stat().st_size > 3 * 2**20
                   for p in (staging.glob(".aux.safetensors.*") if staging.is_dir() else []))

    wait_until(partial_written, 60, "a partial aux.safetensors in the staging tree")
    os.killpg(proc.pid, sig)
    proc.wait(timeout=30)
    stderr = proc.stderr.read()
    proc.stderr.close()
    assert proc.returncode != 0, stderr
    assert not dest.exists()  # never looks complete
    kept = wait_until(lambda: list(staging.glob(".rsync-partial/aux.safetensors")), 30, "rsync to keep the partial")
    assert kept[0].stat().st_size > 2 * 2**20

    r = provision(s, d, ssh=ssh, progress=False)
    assert r.bytes_copied < size - 2 * 2**20  # the kept part was not sent again
    report = verify_model_dir(dest)
    assert report.ok, report.to_dict()
    assert read_manifest(dest)[0].by_path()["aux.safetensors"].size == (src / "aux.safetensors").stat().st_size


def test_remote_dry_run_changes_nothing_and_a_remote_lock_stops_a_second_run(sshd, demo_model_dir, tmp_path):
    import fcntl

    from htrctl.errors import LockedError, ProvisionError

    host, ssh = sshd["host"], sshd["ssh"]
    remote = tmp_path / "remote" / "model"
    r = provision(str(demo_model_dir), f"{host}:{remote}", ssh=ssh, dry_run=True, progress=False)
    sent = {a.path for a in r.actions if a.kind == "send"}
    assert SHARD in sent and "final_model/adapter_model.safetensors" in sent
    assert not remote.exists()
    # the remote lock is a flock on <parent>/.<name>.htr-lock held by an ssh session
    with open(remote.parent / ".model.htr-lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(LockedError):
            provision(str(demo_model_dir), f"{host}:{remote}", ssh=ssh, progress=False)
    # a foreign non-empty remote directory is never replaced
    foreign = tmp_path / "remote" / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(ProvisionError, match="refusing"):
        provision(str(demo_model_dir), f"{host}:{foreign}", ssh=ssh, progress=False)
    assert (foreign / "notes.txt").read_text() == "keep"


def test_dry_run_with_a_remote_base_fetches_nothing(sshd, demo_model_dir, tmp_path):
    host, ssh = sshd["host"], sshd["ssh"]
    src = tmp_path / "incident"
    shutil.copytree(demo_model_dir / "final_model", src / "final_model")
    base = tmp_path / "srv" / "base"
    shutil.copytree(demo_model_dir, base, ignore=shutil.ignore_patterns("final_model"))
    dest = tmp_path / "dest"
    r = provision(str(src), str(dest), base=f"{host}:{base}", ssh=ssh, dry_run=True, progress=False)
    assert {a.path for a in r.actions if a.kind == "fetch"} >= {SHARD, "config.json"}
    assert {a.path for a in r.actions if a.kind == "copy"} == {"final_model/adapter_config.json",
                                                              "final_model/adapter_model.safetensors"}
    assert not dest.exists() and not (tmp_path / ".dest.htr-work").exists()
