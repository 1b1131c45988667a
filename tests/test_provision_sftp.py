"""provision over SFTP: a real sshd on 127.0.0.1 whose account is restricted to ``internal-sftp`` (no shell,
no rsync -- what Windows' OpenSSH server and locked-down accounts offer), a pull killed mid-file and
resumed, and Windows-style paths (``C:/...``, ``D:\\...``).

The sshd runs from a config in tmp_path (``sshd -D -f``); nothing of the system's is touched. Needs
``sshd`` (``make test`` installs it).
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import sshd_harness
from helpers import require_system, wait_until
from sshd_harness import SSHD

from htrctl.errors import ProvisionError
from htrctl.provision import Remote, parse_location, provision
from htrctl.provision.sftp import SftpClient
from htrctl.verify import verify_model_dir

pytestmark = [pytest.mark.ssh, pytest.mark.timeout(240)]

BIG = "scans/page-scans.tar"
BIG_SIZE = 192 * 1024 * 1024


@pytest.fixture(scope="module")
def sftp_only(tmp_path_factory):
    """sshd with ``ForceCommand internal-sftp -d <start>``: every session is SFTP, relative paths start there."""
    require_system(bool(SSHD and shutil.which("ssh-keygen")), "sshd")
    d = tmp_path_factory.mktemp("sftpd")
    start = d / "home"
    start.mkdir()
    config = (f"Subsystem sftp internal-sftp\nForceCommand internal-sftp -d {start}\n"
              "AllowTcpForwarding no\nX11Forwarding no\n")

    def ready(info) -> bool:
        try:
            with SftpClient(info["host"], shlex.split(info["ssh"])) as c:
                return c.stat(str(start)) is not None
        except ProvisionError:
            return False

    with sshd_harness.sshd_server(d, config=config, ready=ready) as server:
        yield {"ssh": server["ssh"], "host": server["host"], "start": start}


def sha(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def test_windows_paths_parse_as_remote():
    assert parse_location("user@win:C:/models/htr") == Remote("user@win", "C:/models/htr")
    assert parse_location("user@win:D:\\models\\htr") == Remote("user@win", "D:\\models\\htr")


def test_sftp_only_account_pull_killed_mid_file_resumes(sftp_only, demo_model_copy, tmp_path):
    host, ssh = sftp_only["host"], sftp_only["ssh"]
    src = demo_model_copy
    (src / BIG).parent.mkdir()
    with open(src / BIG, "wb") as f:  # non-zero data, so a wrong offset cannot hash the same
        block = hashlib.sha256(b"scan").digest() * (1 << 15)  # 1 MiB
        for i in range(BIG_SIZE // len(block)):
            f.write(block[i % 32:] + block[: i % 32])
    dest = tmp_path / "dest" / "model"
    dest.parent.mkdir()

    # rsync cannot run there: the account has no shell
    with pytest.raises(ProvisionError, match="rsync failed"):
        provision(f"{host}:{src}", str(dest), ssh=ssh, progress=False, transport="rsync")

    # auto-detected SFTP, killed while the big file is half-way
    code = ("import sys; from htrctl.provision import provision; "
            "provision(sys.argv[1], sys.argv[2], ssh=sys.argv[3], progress=False)")
    child = subprocess.Popen([sys.executable, "-c", code, f"{host}:{src}", str(dest), ssh],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    partial = dest.parent / ".model.htr-work" / "tree" / BIG
    try:
        wait_until(lambda: partial.is_file() and partial.stat().st_size >= 16 * 1024 * 1024, 120,
                   "the big file to be half-fetched", interval=0.002)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(30)
    assert child.returncode == -signal.SIGKILL, child.stderr.read().decode()[-2000:]
    have = partial.stat().st_size
    assert 0 < have < BIG_SIZE and not dest.exists()

    r = provision(f"{host}:{src}", str(dest), ssh=ssh, progress=False)
    assert r.transport == "sftp"
    assert ("resume", BIG) in {(a.kind, a.path) for a in r.actions}
    total_small = sum(p.stat().st_size for p in src.rglob("*") if p.is_file()) - BIG_SIZE
    assert BIG_SIZE - have <= r.bytes_copied <= BIG_SIZE - have + total_small  # the big file continued at its offset
    report = verify_model_dir(dest)
    assert report.ok, report.to_dict()
    assert sha(dest / BIG) == sha(src / BIG)
    assert not (dest.parent / ".model.htr-work").exists()

    again = provision(f"{host}:{src}", str(dest), ssh=ssh, progress=False)
    assert again.noop and again.bytes_copied == 0


def test_windows_style_paths_reach_the_sftp_server_as_written(sftp_only, demo_model_dir, tmp_path):
    """``C:/models/htr`` and a quoted ``D:\\models\\htr`` go to the server as written (forward slashes); the
    test server resolves them under its start directory, where directories named ``C:`` and ``D:`` stand in
    for the drives."""
    host, ssh, start = sftp_only["host"], sftp_only["ssh"], sftp_only["start"]
    for drive in ("C:", "D:"):
        shutil.copytree(demo_model_dir, start / drive / "models" / "htr", dirs_exist_ok=True)
    for i, spec in enumerate(("C:/models/htr", "D:\\models\\htr")):
        dest = tmp_path / f"m{i}"
        r = provision(f"{host}:{spec}", str(dest), ssh=ssh, progress=False, transport="sftp")
        assert r.transport == "sftp" and r.files == 13
        assert verify_model_dir(dest).ok
        assert sha(dest / "final_model" / "adapter_model.safetensors") == \
            sha(demo_model_dir / "final_model" / "adapter_model.safetensors")
    dry = provision(f"{host}:C:/models/htr", str(tmp_path / "m0"), ssh=ssh, progress=False, transport="sftp",
                    dry_run=True)
    assert {a.kind for a in dry.actions} == {"link"} and len(dry.actions) == 13  # m0 holds them all already
    dry = provision(f"{host}:C:/models/htr", str(tmp_path / "dry"), ssh=ssh, progress=False, transport="sftp",
                    dry_run=True)
    assert {a.kind for a in dry.actions} == {"fetch"} and len(dry.actions) == 13 and not (tmp_path / "dry").exists()
    with pytest.raises(ProvisionError, match="no such file"):
        provision(f"{host}:E:/models/htr", str(tmp_path / "none"), ssh=ssh, progress=False, transport="sftp")
    assert not os.path.exists(tmp_path / "none")


def test_sftp_pull_is_checked_against_the_sources_manifest(sftp_only, demo_model_dir, tmp_path):
    host, ssh = sftp_only["host"], sftp_only["ssh"]
    src = tmp_path / "src" / "model"
    provision(str(demo_model_dir), str(src), progress=False)  # a provisioned source: it has htr-manifest.json
    ok = provision(f"{host}:{src}", str(tmp_path / "a"), ssh=ssh, progress=False, transport="sftp")
    assert ok.files == 13 and verify_model_dir(tmp_path / "a").ok
    shard = src / "model-00002-of-00003.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1  # same size, other bytes: only the sha256 can tell
    shard.write_bytes(bytes(data))
    with pytest.raises(ProvisionError, match="sha256 differs from the source's own manifest"):
        provision(f"{host}:{src}", str(tmp_path / "b"), ssh=ssh, progress=False, transport="sftp")
    assert not (tmp_path / "b").exists()
