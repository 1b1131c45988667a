"""HtrClient and the transcribe library: error mapping, retries, outputs.

Real Unix sockets throughout. Socket missing / connection refused / permission
denied use real sockets (and a real second uid via setpriv); 503 sequences and
readiness states come from a scripted uvicorn server (tests/client_standin.py),
the one thing a real daemon cannot be made to do on demand. The end-to-end
tests against the real htrd are in tests/test_transcribe.py.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

from client_standin import StandIn
from htrctl.client import HtrClient, is_retryable
from htrctl.errors import (
    DaemonBusyError,
    DaemonNotReadyError,
    DaemonUnavailableError,
    ExitCode,
    RequestError,
    UsageError,
)
from htrctl.transcribe import (
    TEMP_SUFFIX,
    TranscribeOptions,
    atomic_write,
    discover_inputs,
    run_transcribe,
)


@pytest.fixture
def sock_dir(tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    return d


@pytest.fixture
def standin(sock_dir):
    with StandIn(sock_dir / "htr.sock") as s:
        yield s


def _images(d: Path, n: int, prefix: bytes = b"IMG") -> list[Path]:
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = d / f"img-{i:03d}.png"
        p.write_bytes(prefix + b"-%d" % i)
        out.append(p)
    return out


# ------------------------------------------------------------------ connection errors (real sockets)
def test_socket_missing_names_how_to_start(sock_dir):
    with HtrClient(sock_dir / "nope.sock") as c, pytest.raises(DaemonUnavailableError) as ei:
        c.status()
    line = ei.value.one_line()
    assert "no socket at" in line and "nope.sock" in line
    assert "systemctl start htr.socket htr.service" in line and "htrctl doctor" in line
    assert ei.value.exit_code == ExitCode.UNAVAILABLE and is_retryable(ei.value)


def test_connection_refused_is_unavailable_and_retryable(sock_dir):
    path = sock_dir / "bound.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))  # bound, never listening: connect() gets ECONNREFUSED (a daemon that died)
    try:
        with HtrClient(path) as c, pytest.raises(DaemonUnavailableError) as ei:
            c.ready()
    finally:
        s.close()
    assert "refuses connections" in ei.value.message and is_retryable(ei.value)


@pytest.fixture
def open_dir():
    """A directory other uids may enter (tmp_path's parents are 0700 for root)."""
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="htr-client-test-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_permission_denied_names_the_group(open_dir):
    require_setpriv()
    with StandIn(open_dir / "htr.sock") as standin:
        os.chmod(standin.sock, 0o660)  # root:root 0660 -- uid 65534 is not in the group
        _check_permission_denied(standin)


def _check_permission_denied(standin):
    code = (
        "import sys\nfrom htrctl.client import HtrClient\nfrom htrctl.errors import DaemonPermissionError\n"
        f"c = HtrClient({str(standin.sock)!r})\n"
        "try:\n    c.status()\nexcept DaemonPermissionError as e:\n    print(e.one_line()); sys.exit(e.exit_code)\n"
    )
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == ExitCode.PERMISSION, r.stderr
    assert "permission denied on the daemon socket" in r.stdout
    assert "group 'root'" in r.stdout and "usermod -aG root" not in r.stdout  # joining root is never the fix
    assert "give it a group of its own" in r.stdout


def require_setpriv():
    from helpers import require_system

    require_system(os.geteuid() == 0 and shutil.which("setpriv") is not None, "root and setpriv (util-linux)")


# ------------------------------------------------------------------ HTTP-level mapping (stand-in)
def test_wait_ready_reports_each_state_then_returns(standin):
    standin.ready_states = ["loading", "loading", "warming", "ready"]
    seen: list[str] = []
    with HtrClient(standin.sock) as c:
        r = c.wait_ready(10, on_state=seen.append)
    assert r.state == "ready"
    assert seen == ["loading", "warming", "ready"]


def test_wait_ready_times_out_with_the_state(standin):
    standin.ready_states = ["loading"]
    with HtrClient(standin.sock) as c, pytest.raises(DaemonNotReadyError) as ei:
        c.wait_ready(0.3)
    assert "state: loading" in ei.value.message and "after waiting 0.3 s" in ei.value.message
    assert "--wait" in ei.value.remedy


def test_503s_are_retryable_not_ready_and_busy_errors_and_a_4xx_a_request_error(standin):
    standin.transcribe_script = [(503, "not_ready"), (503, "queue_full")]
    with HtrClient(standin.sock) as c:
        with pytest.raises(DaemonNotReadyError) as e1:
            c.transcribe(b"IMG")
        assert e1.value.detail["state"] == "loading" and is_retryable(e1.value)
        with pytest.raises(DaemonBusyError) as e2:
            c.transcribe(b"IMG")
        assert e2.value.detail["retry_after"] == pytest.approx(0.05) and is_retryable(e2.value)
        with pytest.raises(RequestError) as e3:
            c.transcribe(b"BAD")
        assert "422" in e3.value.message and "cannot identify image file" in e3.value.message
        assert not is_retryable(e3.value)
        ok = c.transcribe(b"IMG-1")
    assert ok.results[0].text.startswith("text of ")


# ------------------------------------------------------------------ the transcribe library
def test_discovery_globs_recursion_and_out_dir_skipped(tmp_path):
    src = tmp_path / "in"
    _images(src / "a", 2)
    _images(src / "b" / "c", 1)
    (src / "notes.txt").write_text("x")
    (src / "a" / "skip-me.png").write_bytes(b"x")
    (src / "out").mkdir()
    (src / "out" / "old.png").write_bytes(b"x")
    items, missing = discover_inputs([str(src), str(tmp_path / "ghost.png")], exclude=["skip-*"],
                                     skip_dirs=[src / "out"])
    assert [i.rel for i in items] == ["a/img-000.png", "a/img-001.png", "b/c/img-000.png"]
    assert missing == [(str(tmp_path / "ghost.png"), "no such file or directory")]
    only_c, _ = discover_inputs([str(src)], include=["b/*"])
    assert [i.rel for i in only_c] == ["b/c/img-000.png"]


def test_discovery_refuses_colliding_outputs(tmp_path):
    a, b = _images(tmp_path / "x", 1)[0], _images(tmp_path / "y", 1)[0]
    with pytest.raises(UsageError, match="would write the same output 'img-000.png'"):
        discover_inputs([str(a), str(b)])


def test_atomic_write_leaves_no_temp(tmp_path):
    target = tmp_path / "d" / "f.txt"
    atomic_write(target, b"hello")
    assert target.read_bytes() == b"hello"
    assert [p.name for p in target.parent.iterdir()] == ["f.txt"]


def test_run_writes_one_file_per_input_and_reports_bad_ones(standin, tmp_path):
    src = tmp_path / "in"
    _images(src, 5)
    (src / "broken.png").write_bytes(b"BAD not an image")
    out = tmp_path / "out"
    err = io.StringIO()
    summary = run_transcribe(
        TranscribeOptions(inputs=[str(src)], sockets=[standin.sock], fmt="json", out_dir=out, concurrency=3),
        stderr=err,
    )
    assert summary.done == 5 and summary.failed == 1 and summary.exit_code == ExitCode.PARTIAL
    assert sorted(p.name for p in out.iterdir()) == sorted([f"img-{i:03d}.png.json" for i in range(5)])
    rec = json.loads((out / "img-002.png.json").read_text())
    assert rec["input"] == str(src / "img-002.png") and rec["model_digest"] == "sha256:standin"
    assert rec["pages"][0]["text"].startswith("text of ")
    assert f"{src / 'broken.png'}: htrd refused the request (422 bad_image): cannot identify image file" in err.getvalue()
    assert "transcribed 5 of 6 inputs" in err.getvalue() and "1 failed" in err.getvalue()


def test_jsonl_stdout_one_record_per_page_and_txt(standin, tmp_path):
    src = tmp_path / "in"
    _images(src, 2)
    (src / "two.tif").write_bytes(b"TWO pages")
    buf = io.StringIO()
    s = run_transcribe(TranscribeOptions(inputs=[str(src)], sockets=[standin.sock], fmt="jsonl"),
                       stdout=buf, stderr=io.StringIO())
    recs = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert s.exit_code == 0 and len(recs) == 4
    assert sorted((Path(r["input"]).name, r["page"]) for r in recs) == [
        ("img-000.png", 0), ("img-001.png", 0), ("two.tif", 0), ("two.tif", 1)]
    assert all(set(r) >= {"input", "page", "text", "timings", "model_digest"} for r in recs)
    out = tmp_path / "out"
    run_transcribe(TranscribeOptions(inputs=[str(src / "two.tif")], sockets=[standin.sock], fmt="txt", out_dir=out),
                   stderr=io.StringIO())
    pages = (out / "two.tif.txt").read_text().split("\f\n")
    assert len(pages) == 2 and pages[1].strip().endswith("p1")


def test_retries_503_sequences_then_succeeds_each_input_once(standin, tmp_path):
    src = tmp_path / "in"
    _images(src, 6)
    standin.transcribe_script = [(503, "queue_full"), (503, "not_ready"), (503, "queue_full")]
    out = tmp_path / "out"
    s = run_transcribe(TranscribeOptions(inputs=[str(src)], sockets=[standin.sock], fmt="txt", out_dir=out,
                                         concurrency=2, retry_for=30), stderr=io.StringIO())
    assert s.exit_code == 0 and s.done == 6 and s.retries == 3
    assert len(list(out.iterdir())) == 6
    assert standin.requests == 9


def test_resume_skips_complete_outputs_and_removes_stale_temps(standin, tmp_path):
    src = tmp_path / "in"
    _images(src, 4)
    out = tmp_path / "out"
    out.mkdir()
    (out / "img-000.png.txt").write_text("done before\n")
    stale = out / f".img-001.png.txt.999.abcd{TEMP_SUFFIX}"
    stale.write_text("half")
    s = run_transcribe(TranscribeOptions(inputs=[str(src)], sockets=[standin.sock], fmt="txt", out_dir=out,
                                         resume=True), stderr=io.StringIO())
    assert (s.skipped, s.done) == (1, 3)
    assert (out / "img-000.png.txt").read_text() == "done before\n"
    assert not stale.exists()
    assert standin.requests == 3


def test_gives_up_on_a_dead_daemon_after_retry_for(sock_dir, tmp_path):
    src = tmp_path / "in"
    _images(src, 2)
    with StandIn(sock_dir / "htr.sock") as s:
        s.transcribe_script = [(503, "not_ready")] * 1000
        with pytest.raises(DaemonNotReadyError) as ei:
            run_transcribe(TranscribeOptions(inputs=[str(src)], sockets=[s.sock], fmt="txt",
                                             out_dir=tmp_path / "out", retry_for=0.5), stderr=io.StringIO())
    assert "rerun with --resume" in ei.value.remedy


def test_two_sockets_share_the_work(sock_dir, tmp_path):
    src = tmp_path / "in"
    _images(src, 20)
    with StandIn(sock_dir / "a.sock") as a, StandIn(sock_dir / "b.sock") as b:
        a.delay_s = b.delay_s = 0.02
        s = run_transcribe(TranscribeOptions(inputs=[str(src)], sockets=[a.sock, b.sock], fmt="txt",
                                             out_dir=tmp_path / "out", concurrency=2), stderr=io.StringIO())
        assert s.done == 20
        assert a.requests > 0 and b.requests > 0 and a.requests + b.requests == 20
        assert len(set(a.seen) | set(b.seen)) == 20


def test_one_replica_down_the_other_takes_all(sock_dir, tmp_path):
    src = tmp_path / "in"
    _images(src, 8)
    dead = sock_dir / "dead.sock"
    s_dead = socket.socket(socket.AF_UNIX)
    s_dead.bind(str(dead))  # refuses connections
    try:
        with StandIn(sock_dir / "b.sock") as b:
            err = io.StringIO()
            s = run_transcribe(TranscribeOptions(inputs=[str(src)], sockets=[dead, b.sock], fmt="txt",
                                                 out_dir=tmp_path / "out", retry_for=1.0), stderr=err)
            assert s.done == 8 and b.requests == 8
            assert "refuses connections" in err.getvalue()
    finally:
        s_dead.close()


def test_ctrl_c_leaves_only_complete_outputs(standin, tmp_path):
    """SIGINT to a real `htrctl transcribe` mid-run: exit 130, no temp files, every output complete."""
    import signal

    src = tmp_path / "in"
    _images(src, 40)
    out = tmp_path / "out"
    standin.delay_s = 0.05
    proc = subprocess.Popen(
        [sys.executable, "-m", "htrctl", "transcribe", "--socket", str(standin.sock), "--out", str(out),
         "-f", "json", "-j", "2", str(src)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )
    import time

    deadline = time.monotonic() + 30
    while not (out.is_dir() and len(list(out.glob("*.json"))) >= 3):
        assert time.monotonic() < deadline and proc.poll() is None, "no progress"
        threading_wait(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == ExitCode.INTERRUPTED, err
    assert "interrupted" in err and "rerun with --resume" in err
    files = list(out.iterdir())
    assert 3 <= len(files) < 40
    assert not [f for f in files if f.name.endswith(TEMP_SUFFIX)]
    for f in files:
        assert json.loads(f.read_text())["pages"][0]["text"]
    # and --resume finishes the rest, each input exactly once
    before = {f.name: f.stat().st_ino for f in files}
    r = subprocess.run([sys.executable, "-m", "htrctl", "transcribe", "--socket", str(standin.sock), "--out",
                        str(out), "-f", "json", "--resume", str(src)], capture_output=True, text=True, cwd=REPO,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert len(list(out.iterdir())) == 40
    assert {f: (out / f).stat().st_ino for f in before} == before  # the first run's outputs were not rewritten
    assert f"{len(before)} already done (--resume)" in r.stderr


def threading_wait(s: float) -> None:
    import threading

    threading.Event().wait(s)
