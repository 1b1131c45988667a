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
from daemon_harness import module_daemon
from helpers import REPO, SAMPLES, line_copies, run_htrctl, wait_until

from htrctl.cli import hoist_global_options, main


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
    cfg.write_text("gpu:\n  select: cpu\nsocket:\n  group: null\n")
    assert main(["config", "show", "--json", "--config", str(cfg)]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["gpu"]["select"] == "cpu"
    assert main(["config", "check", "-c", str(cfg), "-q"]) == 0
    assert capsys.readouterr().out == f"{cfg}: ok\n"


def test_permission_remedy_never_says_join_root(tmp_path):
    import grp
    import os

    from htrctl.client import permission_error

    sock = tmp_path / "htr.sock"
    sock.write_text("")
    os.chown(sock, -1, 0)
    e = permission_error(sock)
    assert "group 'root'" in e.message and "usermod -aG root" not in e.remedy
    assert "socket.group: htr" in e.remedy and "usermod -aG htr" in e.remedy
    other = next((g for g in grp.getgrall() if g.gr_name not in ("root", "wheel", "sudo", "adm") and g.gr_gid > 0), None)
    if other is not None and os.geteuid() == 0:
        os.chown(sock, -1, other.gr_gid)
        assert f"sudo usermod -aG {other.gr_name} $USER" in permission_error(sock).remedy


def test_json_gets_a_json_error_on_stdout_with_a_stable_type(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("gpu:\n  select: all\n")
    assert main(["doctor", "--json", "-s", "host", "--config", str(bad)]) == 78
    out, err = capsys.readouterr()
    doc = json.loads(out)  # was: nothing on stdout
    assert doc["error"]["type"] == "config" and doc["error"]["exit_code"] == 78
    assert "gpu.select" in doc["error"]["message"] and err.startswith("htrctl: error: ")
    # one document only, also when the command already wrote its own (status --json with its error inside)
    assert main(["status", "--json", "-s", str(tmp_path / "none.sock")]) == 75
    rep = json.loads(capsys.readouterr().out)
    assert rep["error"]["type"] == "daemon_unavailable"


def test_error_kinds_are_snake_case_names_not_class_names():
    from htrctl import errors

    kinds = {cls.__name__: cls("x").kind for cls in vars(errors).values()
             if isinstance(cls, type) and issubclass(cls, errors.HtrError) and cls is not errors.MissingExtraError}
    assert kinds["ConfigError"] == "config" and kinds["DaemonPermissionError"] == "daemon_permission"
    assert kinds["HtrError"] == "htr" and kinds["FileAccessError"] == "file_access"
    assert all(re.fullmatch(r"[a-z]+(_[a-z]+)*", k) for k in kinds.values()), kinds


def test_a_missing_socket_group_is_found_before_htrd_exits_78(tmp_path, capsys):
    cfg = tmp_path / "htr.yaml"
    cfg.write_text("socket:\n  group: no-such-group-htr\n")
    assert main(["config", "check", str(cfg)]) == 78
    err = capsys.readouterr().err
    assert "socket.group: group 'no-such-group-htr' does not exist" in err and "groupadd --system" in err
    assert main(["doctor", "--json", "-s", "service", "--config", str(cfg)]) in (1, 5)
    found = {f["id"]: f for f in json.loads(capsys.readouterr().out)["findings"]}
    assert found["service.socket_group"]["severity"] in ("warn", "fail")
    assert "null" in found["service.socket_group"]["remedy"]
    cfg.write_text("socket:\n  group: null\n")
    assert main(["config", "check", str(cfg)]) == 0


def test_help_has_no_type_noise_and_completion_exists():
    r = subprocess.run([sys.executable, "-m", "htrctl", "doctor", "--help"], capture_output=True, text=True, cwd=REPO,
                       env={"COLUMNS": "100", "PATH": "/usr/bin:/bin"}, timeout=60)
    assert r.returncode == 0 and "--json" in r.stdout and "<bool>" not in r.stdout
    r = subprocess.run([sys.executable, "-m", "htrctl", "provision", "--help"], capture_output=True, text=True,
                       cwd=REPO, timeout=60)
    assert "SOURCE" in r.stdout and "{source}" not in r.stdout
    r = subprocess.run([sys.executable, "-m", "htrctl", "--show-completion", "bash"], capture_output=True, text=True,
                       cwd=REPO, timeout=60)
    assert r.returncode == 0 and "_HTRCTL_COMPLETE" in r.stdout.upper()


def test_doctor_colours_fail_and_warn_on_a_terminal_only(tmp_path):
    import os
    import pty

    cfg = tmp_path / "htr.yaml"
    cfg.write_text("socket:\n  group: no-such-group-htr\n")
    argv = [sys.executable, "-m", "htrctl", "doctor", "-s", "service", "--config", str(cfg)]
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "TERM")}
    plain = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    assert "\033[" not in plain.stdout and ("WARN" in plain.stdout or "FAIL" in plain.stdout)
    main_fd, tty_fd = pty.openpty()
    try:
        p = subprocess.run(argv, stdout=tty_fd, stderr=subprocess.PIPE, cwd=REPO, env=env, timeout=60)
        os.close(tty_fd)
        out = b""
        while True:
            try:
                chunk = os.read(main_fd, 65536)
            except OSError:  # EIO: the other side is closed and drained
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(main_fd)
    assert p.returncode in (1, 5)
    assert b"\033[33;1mWARN\033[0m" in out or b"\033[31;1mFAIL\033[0m" in out, out[:2000]


def test_hoisting_leaves_values_and_the_end_of_options_alone():
    assert hoist_global_options(["transcribe", "-q", "-s", "x.sock", "d"]) == ["-q", "transcribe", "-s", "x.sock", "d"]
    assert hoist_global_options(["-c", "a", "config", "check", "--config", "b"]) == ["-c", "a", "--config", "b",
                                                                                    "config", "check"]
    assert hoist_global_options(["transcribe", "--", "-q"]) == ["transcribe", "--", "-q"]
    assert hoist_global_options(["provision", "--ssh", "ssh -v", "a", "b"]) == ["provision", "--ssh", "ssh -v", "a", "b"]


# ------------------------------------------------------------------ row 7: provision feedback
def _need_rsync_ssh():
    from helpers import require_system

    require_system(shutil.which("rsync") is not None and shutil.which("ssh") is not None, "rsync and ssh")


def test_a_failed_remote_provision_names_sshs_cause(tmp_path):
    """Was: rsync's last line ("rsync error: unexplained error (code 255) at io.c...")."""
    _need_rsync_ssh()
    r = subprocess.run([sys.executable, "-m", "htrctl", "provision", "127.0.0.1:/srv/none/model", str(tmp_path / "m"),
                        "--ssh", "ssh -p 1 -o BatchMode=yes -o ConnectTimeout=5"], capture_output=True, text=True,
                       cwd=REPO, timeout=120)
    assert r.returncode == 73, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "ssh: connect to host 127.0.0.1 port 1: Connection refused" in lines[0], r.stderr
    assert "rsync error" not in lines[0]


def test_rsync_cause_prefers_the_remote_shells_words():
    from htrctl.provision import rsync_cause

    err = ("Permission denied (publickey).\r\nrsync: connection unexpectedly closed (0 bytes received so far) "
           "[Receiver]\nrsync error: unexplained error (code 255) at io.c(232) [Receiver=3.2.7]\n")
    assert rsync_cause(err, 255) == "Permission denied (publickey)."
    err = ('rsync: [sender] change_dir "/srv/none" failed: No such file or directory (2)\n'
           "rsync error: some files/attrs were not transferred (code 23) at main.c(1338) [Receiver=3.2.7]\n")
    assert rsync_cause(err, 23).startswith('rsync: [sender] change_dir "/srv/none" failed')
    assert rsync_cause("", 12) == "exit 12"


def test_rsync_progress_stays_off_a_stderr_that_is_not_a_terminal(tmp_path, capfd):
    _need_rsync_ssh()
    from htrctl.provision.transport import run_rsync

    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(b"x" * (4 << 20))
    run_rsync([str(src) + "/", str(tmp_path / "dst") + "/"], ssh=None, progress=True)
    assert (tmp_path / "dst" / "big").stat().st_size == 4 << 20
    err = capfd.readouterr().err
    assert "\r" not in err and "%" not in err, err


def test_ctrl_c_says_where_the_work_is_kept_and_that_a_rerun_resumes(tmp_path):
    """SIGINT while rsync waits on the remote: exit 130, one line naming the staging tree, no lock file, no
    rsync left running."""
    import os
    import signal

    _need_rsync_ssh()
    fake_ssh = tmp_path / "fake-ssh"
    fake_ssh.write_text(f"#!/bin/sh\necho $$ > {tmp_path}/ssh.pid\nexec sleep 600\n")
    fake_ssh.chmod(0o755)
    dest = tmp_path / "srv" / "model"
    proc = subprocess.Popen([sys.executable, "-m", "htrctl", "provision", "gpu-host:/data/model", str(dest), "--ssh",
                             str(fake_ssh)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        wait_until(lambda: (tmp_path / "ssh.pid").exists() or proc.poll() is not None, 60, what="rsync started")
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        try:
            os.kill(int((tmp_path / "ssh.pid").read_text()), signal.SIGKILL)
        except (OSError, ValueError):
            pass
    assert proc.returncode == 130, err
    work = dest.parent / ".model.htr-work"
    assert err.strip().splitlines() == [
        f"htrctl: error: interrupted: {dest} is as it was; what was copied so far is kept in {work} -- run the same "
        "command again: it resumes there (complete files are not copied again)"]
    assert work.is_dir() and not dest.exists()
    assert sorted(p.name for p in dest.parent.iterdir()) == [".model.htr-work"]  # no .model.htr-lock left


# ------------------------------------------------------------------ row 8: config from the environment
def test_env_accepts_null_and_octal_and_refuses_unknown_variables_with_78(caplog):
    from htrctl.config import load_settings
    from htrctl.errors import ConfigError

    s = load_settings(None, env={"HTR_SOCKET__GROUP": "null", "HTR_SOCKET__MODE": "660",
                                 "HTR_GENERATION__COMPILE_CACHE_DIR": "null"})
    assert s.socket.group is None and s.socket.mode == 0o660 and s.generation.compile_cache_dir is None
    assert load_settings(None, env={"HTR_SOCKET__MODE": "0640"}).socket.mode == 0o640
    with pytest.raises(ConfigError, match=r"\$HTR_GPU_SELECT is not a setting .*\$HTR_GPU__SELECT") as e:
        load_settings(None, env={"HTR_GPU_SELECT": "cpu"})
    assert e.value.exit_code == 78
    with pytest.raises(ConfigError, match=r"\$HTR_GPU__SELEKT: gpu.selekt: unknown setting"):
        load_settings(None, env={"HTR_GPU__SELEKT": "cpu"})
    with caplog.at_level("WARNING"):
        load_settings(None, env={"HTR_SOMETHING": "1", "HTR_DEBUG": "1", "HTR_SSH": "ssh -p 2"})
    assert [r.getMessage() for r in caplog.records] == [
        "$HTR_SOMETHING is not a setting htrctl knows; ignored (settings are HTR_SECTION__FIELD)"]


def test_env_mistake_on_the_command_line_is_one_line_exit_78():
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("HTR_")}
    r = subprocess.run([sys.executable, "-m", "htrctl", "config", "show"], capture_output=True, text=True,
                       env={**env, "HTR_SOCKET_GROUP": "video"}, cwd=REPO, timeout=60)
    assert r.returncode == 78
    assert r.stderr.strip().splitlines() == [
        "htrctl: error: $HTR_SOCKET_GROUP is not a setting (sections and fields are separated by two underscores: "
        "$HTR_SOCKET__GROUP) -- rename it to HTR_SOCKET__GROUP, or unset it"]


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


# ------------------------------------------------------------------ row 4: transcribe defaults (real htrd)


htrctl = run_htrctl
daemon = module_daemon("first-contact")


@pytest.mark.slow
def test_txt_on_stdout_is_the_text_in_input_order_with_form_feeds(daemon, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    names = []
    for i in range(6):
        sample = ["line-01.png", "line-02.png", "line-03.jpg"][i % 3]
        names.append(f"{i:02d}-{sample}")
        shutil.copyfile(SAMPLES / sample, src / names[-1])
    shutil.copyfile(SAMPLES / "page-2p.tif", src / "03b-pages.tif")
    recs = [json.loads(x) for x in htrctl("transcribe", "-s", str(daemon.socket_path), str(src)).stdout.splitlines()]
    by_input = {}
    for r in recs:
        by_input.setdefault(Path(r["input"]).name, []).append((r["page"], r["text"]))
    pages = [t + "\n" for name in sorted(by_input) for _, t in sorted(by_input[name])]
    r = htrctl("transcribe", "-s", str(daemon.socket_path), "-f", "txt", "-j", "4", str(src))
    assert r.returncode == 0, r.stderr
    assert r.stdout == "\f\n".join(pages)  # no "path#page<TAB>", pages and inputs in order, form feeds between
    assert "\t" not in r.stdout and len(pages) == 8


@pytest.mark.slow
def test_default_include_takes_only_what_htrd_decodes(daemon, tmp_path):
    from htrctl.transcribe import DEFAULT_INCLUDE

    assert "*.bmp" not in DEFAULT_INCLUDE
    src = tmp_path / "in"
    src.mkdir()
    shutil.copyfile(SAMPLES / "line-01.png", src / "a.png")
    from PIL import Image

    Image.open(SAMPLES / "line-01.png").save(src / "b.bmp")
    r = htrctl("transcribe", "-s", str(daemon.socket_path), str(src))
    assert r.returncode == 0, r.stderr  # was 4: the .bmp taken, then refused by htrd (415)
    assert [Path(json.loads(x)["input"]).name for x in r.stdout.splitlines()] == ["a.png"]


@pytest.mark.slow
def test_progress_lines_when_stderr_is_not_a_terminal(daemon, tmp_path):
    src = line_copies(tmp_path / "in", 12)
    r = htrctl("transcribe", "-s", str(daemon.socket_path), "-f", "txt", str(src))
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if re.fullmatch(r"htrctl: \d+ of 12 done .*images/s.*", ln)]
    assert len(lines) >= 5, r.stderr  # one every 10 % (at least)
    q = htrctl("transcribe", "-q", "-s", str(daemon.socket_path), "-f", "txt", str(src))
    assert q.stderr == "", q.stderr


@pytest.mark.slow
def test_a_loading_daemon_is_waited_for_by_default(tmp_path, provisioned_model):
    from daemon_harness import launch

    d = launch(tmp_path, provisioned_model, faults="slow_load=5")
    try:
        wait_until(lambda: d.state() == "loading", 120, what="state loading")
        r = htrctl("transcribe", "-s", str(d.socket_path), "-f", "txt", str(SAMPLES / "line-01.png"))
        assert r.returncode == 0, r.stderr
        assert "daemon state: loading; waiting up to 120 s" in r.stderr and r.stdout.strip()
    finally:
        d.stop()
    # a daemon that is not running at all: at once, as before
    r = htrctl("transcribe", "-s", str(tmp_path / "none.sock"), str(SAMPLES / "line-01.png"), timeout=30)
    assert r.returncode == 75 and "htrd is not running" in r.stderr
