"""Faults, injected into real processes, each with the error the client sees, the recovery, and an
``htrctl transcribe`` run over the same inputs that ends with every output present exactly once.

Serving faults run as one chain on one socket path (starting htrd costs 15-40 s on this machine, so each
restart the chain needs is also the next fault's daemon); the test plays systemd's part (it restarts the
daemon where ``Restart=on-failure`` would):

1. generate hangs (``hang_generate``): the watchdog ends the process with 86; the restart is
2. a slow load (``slow_load``): clients get 503 not_ready (state loading) with Retry-After, and wait;
3. the socket file is deleted under the running daemon: it notices and binds the path again;
4. the daemon restarts under client load (SIGTERM while 64 client connections are busy): it drains,
   exits 0, and the restart carries
5. CUDA out-of-memory (``oom=2``): those two requests get 507 out_of_memory, the daemon stays ready,
   ``--resume`` completes them;
6. the daemon is SIGKILLed mid-request: the client sees the connection lost and retries through the restart.

Provisioning faults: the disk fills (a 700 KiB tmpfs, remounted larger to recover), a sync is SIGKILLed
mid-copy (it resumes), a shard is corrupted after provisioning (htrd exits 65 naming the file;
re-provisioning repairs it).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from daemon_harness import launch, start_daemon
from helpers import REPO, make_inputs, wait_until

from htrctl.errors import ExitCode

from . import hostile as H
from .conftest import outputs_exactly_once

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

BASE = {
    "limits": {"batch_sizes": [1, 2, 4], "queue_length": 128, "request_deadline_s": 90.0, "drain_timeout_s": 30.0},
    "generation": {"max_new_tokens": 8},
    "watchdog": {"generate_timeout_s": 60.0},
    "log": {"level": "INFO"},
}


def spawn_transcribe(sock: Path, src: Path, out: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "htrctl", "transcribe", "-s", str(sock), "--out", str(out),
                             "-f", "txt", *args, str(src)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err.decode(errors="replace")


def n_outputs(out: Path) -> int:
    return len(list(out.rglob("*.txt"))) if out.is_dir() else 0


def first_line(text: str, *needles: str) -> str:
    for ln in text.splitlines():
        if any(n in ln for n in needles):
            return ln.strip()[:300]
    return ""


def _in_thread(fn) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 -- inspected by the test
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


@pytest.fixture(scope="class")
def chain(tmp_path_factory, provisioned_model):
    """Shared by the ordered steps of TestServingFaults: the socket, config and current daemon."""
    root = tmp_path_factory.mktemp("faults")
    state = {"root": root, "model": provisioned_model, "daemon": None, "sock": root / "htr.sock"}
    yield state
    d = state.get("daemon")
    if d is not None:
        d.stop(timeout=30)


def _restart(chain: dict, faults: str | None, *, wait: bool = True, config: dict | None = None):
    sub = chain["root"] / f"d{time.monotonic_ns()}"
    sub.mkdir()
    cfg = BASE if config is None else config
    d = (start_daemon if wait else launch)(sub, chain["model"], config=cfg, faults=faults,
                                          socket_path=chain["sock"])
    chain["daemon"] = d
    return d


class TestServingFaults:
    def test_generate_hangs_then_the_restart_loads_slowly(self, chain, record):
        from htrctl.client import HtrClient

        src, out = chain["root"] / "in1", chain["root"] / "out1"
        rels = make_inputs(src, 16)
        hang_cfg = {**BASE, "limits": {**BASE["limits"], "batch_sizes": [1]}, "watchdog": {"generate_timeout_s": 5.0}}
        d1 = _restart(chain, "hang_generate", config=hang_cfg)
        client = HtrClient(chain["sock"], timeout=120)
        t, box = _in_thread(lambda: client.transcribe(H.encode(H.line_image())))
        run = spawn_transcribe(chain["sock"], src, out, "-j", "2", "--retry-for", "300")
        t0 = time.monotonic()
        code = d1.wait_exit(90)
        hang_to_exit = time.monotonic() - t0
        assert code == ExitCode.WATCHDOG, d1.stderr()[-3000:]
        assert "watchdog: a generate call has been running" in d1.stderr()
        t.join(30)
        client.close()
        seen = box.get("error")
        assert seen is not None and "connection to htrd lost" in str(seen), box
        assert n_outputs(out) == 0
        # the restart (systemd's Restart=on-failure) loads slowly
        d2 = _restart(chain, "slow_load=6,slow_generate=0.1", wait=False)
        wait_until(lambda: d2.state() == "loading", 120, what="the restarted daemon in state loading")
        r = d2.get("/v1/ready")
        assert r.status_code == 503 and r.json()["state"] == "loading" and r.headers["Retry-After"]
        p = d2.post("/v1/transcribe", content=H.encode(H.line_image()))
        assert p.status_code == 503 and p.json()["error"]["type"] == "not_ready" and p.headers["Retry-After"]
        t1 = time.monotonic()
        d2.wait_ready()
        load_s = time.monotonic() - t1
        rc, err = finish(run)
        assert rc == 0, err
        done = outputs_exactly_once(out, rels)
        assert "retrying for up to 300 s" in err and "daemon is back" in err, err
        record("faults", "generate hangs", injected="HTR_TEST_FAULTS=hang_generate, watchdog.generate_timeout_s=5",
               client_saw=str(seen).split(" -- ")[0][:200],
               observed=f"watchdog: htrd exited {code} (WATCHDOG) {hang_to_exit:.1f}s after the run began; "
                        "its connections were reset",
               recovery="restarted (Restart=on-failure); the transcribe run retried with backoff and finished",
               outputs=f"{done['outputs']}/{done['inputs']} exactly once")
        record("faults", "load is slow", injected="HTR_TEST_FAULTS=slow_load=6 (the restart)",
               client_saw=f"GET /v1/ready 503 state=loading, POST 503 not_ready: {p.json()['error']['message'][:90]} "
                          f"(Retry-After {p.headers['Retry-After']})",
               observed=f"ready {load_s:.1f}s after the first probe; nothing refused for good",
               recovery="clients waited (retryable 503) and carried on once ready",
               outputs=f"{done['outputs']}/{done['inputs']} exactly once (same run)")

    def test_socket_file_deleted_under_the_running_daemon(self, chain, record):
        d = chain["daemon"]
        assert d is not None and d.state() == "ready"
        sock = chain["sock"]
        keep = d.client()
        assert keep.get("/v1/ready").status_code == 200  # a kept-alive connection, opened before
        before = os.lstat(sock).st_ino
        os.unlink(sock)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(sock))
            saw = "connected: the path was bound again before the probe"
        except OSError as exc:
            assert exc.errno == errno.ENOENT, exc
            saw = f"connect: {exc.strerror} (ENOENT)"
        finally:
            probe.close()
        src, out = chain["root"] / "in2", chain["root"] / "out2"
        rels = make_inputs(src, 12)
        run = spawn_transcribe(sock, src, out, "-j", "4", "--wait", "60", "--retry-for", "120")
        assert keep.get("/v1/status").status_code == 200  # the open connection is unaffected
        t0 = time.monotonic()
        wait_until(lambda: os.path.exists(sock) and os.lstat(sock).st_ino != before, 15, what="the socket re-bound")
        rebind_s = time.monotonic() - t0
        assert oct(os.lstat(sock).st_mode & 0o777) == "0o660"
        rc, err = finish(run)
        assert rc == 0, err
        done = outputs_exactly_once(out, rels)
        assert "bound it again" in d.stderr()
        assert d.state() == "ready"
        record("faults", "socket file deleted under the running daemon", injected="rm /path/htr.sock",
               client_saw=saw,
               observed=f"htrd noticed and bound the path again within {rebind_s + 0.0:.1f}s (mode 0660); open "
                        "connections kept working",
               recovery="clients that found no socket waited (--wait) and were served",
               outputs=f"{done['outputs']}/{done['inputs']} exactly once")

    def test_restart_under_client_load_then_cuda_oom(self, chain, record):
        d = chain["daemon"]
        assert d is not None and d.state() == "ready"
        src, out = chain["root"] / "in3", chain["root"] / "out3"
        rels = make_inputs(src, 160)  # more than the 64 in flight: the drain finishes those, the rest wait
        run = spawn_transcribe(chain["sock"], src, out, "-j", "64", "--retry-for", "300")
        wait_until(lambda: n_outputs(out) >= 4, 120, what="4 outputs")
        at_term = n_outputs(out)
        d.signal(signal.SIGTERM)
        code = d.wait_exit(60)
        assert code == 0, d.stderr()[-3000:]
        assert at_term < len(rels)
        drained = first_line(d.stderr(), "drained", "abandoned")
        d3 = _restart(chain, "oom=2,slow_generate=0.2")
        rc, err = finish(run)
        assert rc == ExitCode.PARTIAL, err  # the image(s) the two injected OOMs failed; everything else done
        failed = int(re.search(r"; (\d+) failed", err).group(1))
        assert failed == err.count("(507 out_of_memory)") >= 1, err
        oom_line = first_line(err, "out_of_memory")
        retry_line = first_line(err, "retrying for up to")
        assert retry_line, err
        assert d3.state() == "ready"
        assert n_outputs(out) == len(rels) - failed
        st = d3.status()
        assert st["counters"]["errors"] >= failed
        again = subprocess.run([sys.executable, "-m", "htrctl", "transcribe", "-s", str(chain["sock"]), "--out",
                                str(out), "-f", "txt", "--resume", str(src)], capture_output=True, timeout=300,
                               cwd=REPO)
        assert again.returncode == 0, again.stderr.decode()
        assert f"{len(rels) - failed} already done (--resume)" in again.stderr.decode()
        done = outputs_exactly_once(out, rels)
        record("faults", "daemon restarts under client load",
               injected=f"SIGTERM with 64 client connections busy ({at_term} of {len(rels)} done)",
               client_saw=retry_line.replace(str(chain["sock"]), "<socket>")[:200],
               observed=f"drained and exited 0 ({drained.split(': ', 1)[-1][:80]}); restarted",
               recovery="the run retried through the restart", outputs=f"{done['outputs']}/{done['inputs']} "
               f"exactly once ({failed} OOM failure(s) completed by --resume, below)")
        record("faults", "CUDA out of memory (injected)", injected="HTR_TEST_FAULTS=oom=2",
               client_saw="htrd " + oom_line.split(": htrd ", 1)[-1][:200],
               observed=f"2 generate calls raised OOM; {failed} image(s) got 507 out_of_memory (an OOM'd batch is "
                        f"retried image by image, so batch-mates may survive); the daemon stayed ready",
               recovery=f"htrctl transcribe --resume transcribed the {failed} and skipped the rest",
               outputs=f"{done['outputs']}/{done['inputs']} exactly once")

    def test_sigkill_mid_request(self, chain, record):
        from htrctl.client import HtrClient

        d = chain["daemon"]
        assert d is not None and d.state() == "ready"
        src, out = chain["root"] / "in4", chain["root"] / "out4"
        rels = make_inputs(src, 24)
        run = spawn_transcribe(chain["sock"], src, out, "-j", "4", "--retry-for", "300")
        wait_until(lambda: n_outputs(out) >= 2, 120, what="2 outputs")
        client = HtrClient(chain["sock"], timeout=120)
        t, box = _in_thread(lambda: client.transcribe(H.encode(H.line_image())))
        # the run holds at most 4 requests: a 5th in flight is ours (each generate takes >= 0.2 s here)
        wait_until(lambda: d.status()["in_flight"] >= 5, 30, interval=0.01, what="our request in flight")
        at_kill = n_outputs(out)
        d.proc.kill()
        assert d.wait_exit(30) == -signal.SIGKILL
        t.join(30)
        client.close()
        seen = box.get("error")
        assert seen is not None and "connection to htrd lost" in str(seen), box
        assert at_kill < len(rels)
        _restart(chain, None)
        rc, err = finish(run)
        assert rc == 0, err
        done = outputs_exactly_once(out, rels)
        record("faults", "daemon SIGKILLed mid-request", injected=f"kill -9 with requests in flight ({at_kill} of "
               f"{len(rels)} done)",
               client_saw=str(seen).split(" -- ")[0][:200],
               observed="stale socket left behind; the restart removed it and bound again",
               recovery="the run retried (connection lost / refused are retryable) and finished",
               outputs=f"{done['outputs']}/{done['inputs']} exactly once")


# ----------------------------------------------------------------------------------------- provisioning
def _provision_cli(src: Path, dest: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "htrctl", "provision", str(src), str(dest)], capture_output=True,
                          timeout=timeout, cwd=REPO, text=True)


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                       capture_output=True, timeout=30)
    return r.returncode == 0


def test_disk_fills_during_provisioning(demo_model_dir, tmp_path, record):
    from htrctl.verify import verify_model_dir

    mnt = tmp_path / "small-fs"
    if _tmpfs(mnt, "700k"):
        how = "a 700 KiB tmpfs (mount -t tmpfs), remounted at 8 MiB to recover"
        try:
            r = _provision_cli(demo_model_dir, mnt / "model")
            assert r.returncode == ExitCode.PROVISION, r.stdout + r.stderr
            msg = r.stderr.strip()
            assert "No space left on device while provisioning" in msg and "rerun the same command" in msg, msg
            assert "Traceback" not in msg
            assert not (mnt / "model").exists()  # DEST never looks complete
            subprocess.run(["mount", "-o", "remount,size=8m", str(mnt)], check=True, timeout=30)
            r2 = _provision_cli(demo_model_dir, mnt / "model")
            assert r2.returncode == 0, r2.stderr
            report = verify_model_dir(mnt / "model", quick=False)
            assert report.ok, report.to_dict()
            resumed = first_line(r2.stdout + r2.stderr, "resume")
        finally:
            subprocess.run(["umount", "-l", str(mnt)], timeout=30)
    else:  # not root: the same failure through RLIMIT_FSIZE in the provisioning process (EFBIG)
        how = "RLIMIT_FSIZE=300 KiB on the provisioning process (not root: no tmpfs)"
        import resource

        def limit():
            resource.setrlimit(resource.RLIMIT_FSIZE, (300 * 1024, 300 * 1024))
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

        dest = tmp_path / "model"
        r = subprocess.run([sys.executable, "-m", "htrctl", "provision", str(demo_model_dir), str(dest)],
                           capture_output=True, text=True, timeout=120, cwd=REPO, preexec_fn=limit)
        assert r.returncode == ExitCode.PROVISION, r.stderr
        msg = r.stderr.strip()
        assert not dest.exists()
        r2 = _provision_cli(demo_model_dir, dest)
        assert r2.returncode == 0, r2.stderr
        assert verify_model_dir(dest, quick=False).ok
        resumed = first_line(r2.stdout + r2.stderr, "resume")
    record("faults", "disk fills during provisioning", injected=how, client_saw=msg.replace(str(mnt), "<dest>")[:300],
           observed="exit 73 (PROVISION), one line, DEST not created; staged files kept",
           recovery="more space, the same command again: it resumed; verify (full sha256) passes",
           outputs=resumed.replace(str(mnt), "<dest>")[:160] or "provisioned")


def test_sync_interrupted_resumes(demo_model_dir, tmp_path, record):
    from htrctl.verify import verify_model_dir

    src = tmp_path / "src"
    shutil.copytree(demo_model_dir, src)
    with open(src / "padding.dat", "wb") as f:  # a large file, so the copy lasts long enough to be cut
        f.truncate(192 * 1024 * 1024)
    dest = tmp_path / "dest"
    proc = subprocess.Popen([sys.executable, "-m", "htrctl", "provision", str(src), str(dest)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO)
    work = tmp_path / ".dest.htr-work"

    def copying() -> bool:
        assert proc.poll() is None, f"provision finished before it could be interrupted: {proc.stderr.read()}"
        part = [p for p in (work / "tree").rglob("padding.dat*")] if (work / "tree").is_dir() else []
        return any(p.stat().st_size > 8 * 1024 * 1024 for p in part)

    wait_until(copying, 120, interval=0.01, what="the copy under way")
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert not dest.exists()  # never looks complete
    staged = sum(p.stat().st_size for p in (work / "tree").rglob("*") if p.is_file())
    from htrctl.provision import provision

    result = provision(str(src), str(dest), progress=False)
    total = result.total_size
    assert result.bytes_copied < total, (result.bytes_copied, total)
    resumed = [a for a in result.actions if a.kind == "resume"]
    report = verify_model_dir(dest, quick=False)
    assert report.ok, report.to_dict()
    record("faults", "sync interrupted", injected=f"SIGKILL of `htrctl provision` mid-copy ({staged >> 20} MiB of "
           f"{total >> 20} MiB staged)", client_saw="provision killed; DEST not created",
           observed=f"the staging tree and journal survived ({len(resumed)} file(s) resumed)",
           recovery=f"the same command again copied {result.bytes_copied >> 20} MiB of {total >> 20} MiB; "
                    "verify (full sha256) passes", outputs="DEST complete")


@pytest.mark.parametrize("damage", ["truncated", "modified"])
def test_corrupted_shard_after_provisioning(provisioned_model, demo_model_dir, tmp_path, record, damage):
    from htrctl.verify import verify_model_dir

    model = tmp_path / "model"
    shutil.copytree(provisioned_model, model)
    shard = model / "model-00002-of-00003.safetensors"
    data = bytearray(shard.read_bytes())
    if damage == "truncated":
        shard.write_bytes(bytes(data[: len(data) - 4096]))
        cfg, mode = None, "quick"
    else:
        data[-100] ^= 0xFF  # tensor bytes: headers and size stay valid; only the sha256 tells
        shard.write_bytes(bytes(data))
        cfg, mode = {"model": {"verify_on_start": "full"}}, "full"
    (tmp_path / "d").mkdir()
    d = launch(tmp_path / "d", model, config=cfg)
    code = d.wait_exit(120)
    err = d.stderr()
    assert code == ExitCode.MODEL, err[-2000:]
    line = first_line(err, "model-00002-of-00003.safetensors")
    assert line and ("truncated" in line or "sha256" in line), err[-2000:]
    assert "import torch" not in err
    # recovery: provisioning again from the source repairs it
    from htrctl.provision import provision

    result = provision(str(demo_model_dir), str(model), progress=False)
    assert verify_model_dir(model, quick=False).ok
    record("faults", f"shard corrupted after provisioning ({damage})",
           injected=f"{'cut 4 KiB off' if damage == 'truncated' else 'flipped one tensor byte of'} "
                    "model-00002-of-00003.safetensors",
           client_saw=line.split("ERROR htrd: ", 1)[-1].replace(str(model), "<model>")[:300],
           observed=f"htrd refused to start: exit {code} (MODEL; verify_on_start: {mode}), before loading anything",
           recovery=f"htrctl provision SOURCE DEST again: {result.bytes_copied} bytes copied; verify passes",
           outputs="n/a (the daemon never served a wrong model)")
