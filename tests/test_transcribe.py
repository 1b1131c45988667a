"""`htrctl transcribe` / `htrctl status` end to end against a real htrd (demo model, CPU, Unix socket).

Each error message the user can meet is asserted against the real daemon (or
the real absence of one); interruptions are real: the daemon is SIGKILLed
mid-run and started again.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from daemon_harness import launch, module_daemon, start_daemon
from helpers import REPO, SAMPLES, make_inputs, run_htrctl, wait_until

from htrctl.errors import ExitCode
from htrctl.transcribe import TEMP_SUFFIX

pytestmark = pytest.mark.slow


htrctl = functools.partial(run_htrctl, text=False)  # this file's tests read bytes


def spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "htrctl", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=REPO)


@pytest.fixture(scope="module")
def model(provisioned_model) -> Path:
    """The demo model as a server has it: provisioned (with htr-manifest.json), so answers carry its digest."""
    return provisioned_model


daemon = module_daemon("transcribe-e2e")


# ------------------------------------------------------------------ the happy paths
def test_a_directory_in_gives_one_output_file_per_input_and_page(daemon, tmp_path):
    src = tmp_path / "in"
    rels = make_inputs(src, 7)
    shutil.copyfile(SAMPLES / "page-2p.tif", src / "book-0" / "two-pages.tif")
    out = tmp_path / "out"
    r = htrctl("transcribe", "-s", str(daemon.socket_path), "--out", str(out), "-f", "json", "-j", "4", str(src))
    assert r.returncode == 0, r.stderr.decode()
    expected = sorted(f"{rel}.json" for rel in [*rels, "book-0/two-pages.tif"])
    got = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert got == expected
    status = daemon.status()
    for rel in rels:
        rec = json.loads((out / f"{rel}.json").read_text())
        assert rec["input"] == str(src / rel)
        assert len(rec["pages"]) == 1 and rec["pages"][0]["tokens"] > 0
        assert rec["model_digest"] == status["manifest_digest"] and len(rec["model_digest"]) == 64
    tif = json.loads((out / "book-0/two-pages.tif.json").read_text())
    assert [p["page"] for p in tif["pages"]] == [0, 1]
    assert "transcribed 8 of 8 inputs (9 pages)" in r.stderr.decode()


def test_jsonl_streams_one_record_per_page_and_stdin(daemon, tmp_path):
    r = htrctl("transcribe", "-s", str(daemon.socket_path), str(SAMPLES))
    assert r.returncode == 0, r.stderr.decode()
    recs = [json.loads(x) for x in r.stdout.decode().splitlines()]
    assert sorted((Path(x["input"]).name, x["page"]) for x in recs) == [
        ("line-01.png", 0), ("line-02.png", 0), ("line-03.jpg", 0), ("page-2p.tif", 0), ("page-2p.tif", 1)]
    for x in recs:
        assert {"input", "page", "text", "timings", "model_digest"} <= set(x)
        assert x["timings"]["generate_ms"] > 0
    one = htrctl("transcribe", "-s", str(daemon.socket_path), "-f", "txt", "-",
                 input=(SAMPLES / "line-01.png").read_bytes())
    assert one.returncode == 0, one.stderr.decode()
    line = [x for x in recs if x["input"].endswith("line-01.png")][0]
    assert one.stdout.decode() == line["text"] + "\n"  # greedy decoding: the same text either way


def test_bad_input_is_reported_and_the_rest_continue(daemon, tmp_path):
    src = tmp_path / "in"
    make_inputs(src, 3)
    (src / "book-1" / "scan-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated, not an image")
    out = tmp_path / "out"
    r = htrctl("transcribe", "-s", str(daemon.socket_path), "--out", str(out), "-f", "txt", str(src))
    err = r.stderr.decode()
    assert r.returncode == ExitCode.PARTIAL, err
    bad = [x for x in err.splitlines() if "scan-broken.png" in x]
    assert len(bad) == 1 and "htrd refused the request (4" in bad[0], err  # the daemon's own message, per file
    assert len(list(out.rglob("*.txt"))) == 3
    assert "3 of 4 inputs" in err and "1 failed" in err


def test_status_shows_the_daemon_in_text_and_json(daemon):
    r = htrctl("status", "-s", str(daemon.socket_path), "--json")
    assert r.returncode == 0, r.stderr.decode()
    rep = json.loads(r.stdout)
    d = rep["daemon"]
    assert d["state"] == "ready" and d["pid"] == daemon.pid and d["gpu"]["device"] == "cpu"
    assert len(d["manifest_digest"]) == 64 and d["counters"]["images"] > 0
    assert rep["systemd"]["unit"] == "htr.service" and "available" in rep["systemd"]
    h = htrctl("status", "-s", str(daemon.socket_path)).stdout.decode()
    for key in ("daemon:    ready", "model:", "manifest:  sha256 " + d["manifest_digest"], "gpu:       cpu",
                "queue:", "counters:", "systemd:", f"engine:    fast generator, 0/{d['engine']['slots']} slots",
                "ms/image on", "sdpa decode attention",  # the CPU's (htrd.attention)
                f"{d['engine']['mlp_activation']} MLP activation"):  # compiled or eager there (htrd.activation)
        assert key in h, h


# ------------------------------------------------------------------ each error, asserted
def test_a_missing_socket_is_exit_75_with_how_to_start_htrd(tmp_path):
    r = htrctl("transcribe", "-s", str(tmp_path / "htr.sock"), str(SAMPLES))
    err = r.stderr.decode().strip()
    assert r.returncode == ExitCode.UNAVAILABLE
    assert err == (f"htrctl: error: htrd is not running: no socket at {tmp_path / 'htr.sock'} -- start it: "
                   "sudo systemctl start htr.socket htr.service (or htrd --config ...); check: htrctl doctor")
    s = htrctl("status", "-s", str(tmp_path / "htr.sock"))
    assert s.returncode == ExitCode.UNAVAILABLE and "daemon:    unreachable" in s.stdout.decode()


def test_permission_denied_names_the_group(daemon):
    from helpers import require_system

    require_system(os.geteuid() == 0 and shutil.which("setpriv") is not None, "root and setpriv")
    # The daemon's socket is 0660 root:root; uid/gid 65534 is neither.
    r = htrctl("transcribe", "-s", str(daemon.socket_path), str(SAMPLES / "line-01.png"),
               prefix=["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"])
    err = r.stderr.decode()
    assert r.returncode == ExitCode.PERMISSION, err
    assert f"permission denied on the daemon socket {daemon.socket_path} (group 'root'" in err
    assert "usermod -aG root" not in err  # joining root is never the fix
    assert "belongs to group 'root': give it a group of its own" in err and "log out and in again" in err


def test_not_ready_then_wait_shows_the_state(tmp_path, model):
    d = launch(tmp_path, model, faults="slow_load=10")
    try:
        wait_until(lambda: d.state() == "loading", 60, what="state loading")
        r = htrctl("transcribe", "-s", str(d.socket_path), "--wait", "0", str(SAMPLES / "line-01.png"))
        err = r.stderr.decode()
        assert r.returncode == ExitCode.UNAVAILABLE, err
        assert "htrd is not ready (state: loading)" in err and "--wait SECONDS" in err
        w = htrctl("transcribe", "-s", str(d.socket_path), "--wait", "120", "-f", "txt",
                   str(SAMPLES / "line-01.png"))
        assert w.returncode == 0, w.stderr.decode()
        assert "daemon state: loading; waiting up to 120 s" in w.stderr.decode()
        assert w.stdout.decode().strip()
    finally:
        d.stop()


# ------------------------------------------------------------------ real interruptions
def _wait_outputs(out: Path, n: int, proc: subprocess.Popen) -> None:
    def enough() -> bool:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        return out.is_dir() and len(list(out.rglob("*.txt"))) >= n

    wait_until(enough, 120, what=f"{n} outputs")


def test_resume_after_the_daemon_is_killed_mid_run(tmp_path, model):
    """SIGKILL the daemon mid-run: the client gives up (exit 75, only complete outputs); start the daemon
    again; --resume writes the rest; every output exactly once, the first run's files untouched."""
    src, out = tmp_path / "in", tmp_path / "out"
    rels = make_inputs(src, 30)
    (tmp_path / "d1").mkdir()
    d = start_daemon(tmp_path / "d1", model, faults="slow_generate=0.3")
    try:
        proc = spawn("transcribe", "-s", str(d.socket_path), "--out", str(out), "-f", "txt", "-j", "2",
                     "--retry-for", "1", str(src))
        _wait_outputs(out, 4, proc)
        d.proc.kill()  # SIGKILL: no drain, connections reset, stale socket left behind
        d.wait_exit(30)
        _, err = proc.communicate(timeout=60)
        err = err.decode()
        assert proc.returncode == ExitCode.UNAVAILABLE, err
        assert "then rerun with --resume" in err
    finally:
        d.stop()
    first = {p.relative_to(out).as_posix(): p.stat().st_ino for p in out.rglob("*") if p.is_file()}
    assert 4 <= len(first) < 30
    assert not [f for f in first if f.endswith(TEMP_SUFFIX)]
    assert all((out / f).read_text().strip() for f in first)  # complete files only
    d2 = start_daemon(tmp_path / "d1", model, config_path=d.config_path, socket_path=d.socket_path)
    try:
        r = htrctl("transcribe", "-s", str(d2.socket_path), "--out", str(out), "-f", "txt", "--resume", str(src))
        err = r.stderr.decode()
        assert r.returncode == 0, err
        assert f"{len(first)} already done (--resume)" in err
        assert f"transcribed {30 - len(first)} of 30 inputs" in err
        assert d2.status()["counters"]["images"] == 30 - len(first)  # the second daemon saw only the rest
    finally:
        d2.stop()
    final = {p.relative_to(out).as_posix(): p.stat().st_ino for p in out.rglob("*") if p.is_file()}
    assert sorted(final) == sorted(f"{rel}.txt" for rel in rels)
    assert {f: final[f] for f in first} == first  # not rewritten


def test_daemon_restart_mid_run_is_retried_nothing_lost_or_doubled(tmp_path, model):
    """jsonl on stdout while the daemon is SIGKILLed and started again: the client retries with backoff
    and every input appears exactly once."""
    src = tmp_path / "in"
    rels = make_inputs(src, 40)
    (tmp_path / "d").mkdir()
    d = start_daemon(tmp_path / "d", model, faults="slow_generate=0.3")  # >= 6 s of work: the kill lands mid-run
    proc = spawn("transcribe", "-s", str(d.socket_path), "-j", "2", "--retry-for", "120", str(src))
    d2 = None
    try:
        first_line = proc.stdout.readline()  # at least one record is out: the run is under way
        assert first_line, proc.stderr.read().decode()
        assert proc.poll() is None, "the run finished before the daemon could be killed"
        d.proc.kill()
        d.wait_exit(30)
        d2 = start_daemon(tmp_path / "d", model, config_path=d.config_path, socket_path=d.socket_path)
        rest, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
        if d2 is not None:
            d2.stop()
    err = err.decode()
    assert proc.returncode == 0, err
    recs = [json.loads(x) for x in (first_line + rest).decode().splitlines()]
    inputs = [r["input"] for r in recs]
    assert sorted(inputs) == sorted(str(src / rel) for rel in rels)  # each exactly once
    assert "retrying for up to 120 s" in err and "daemon is back" in err
