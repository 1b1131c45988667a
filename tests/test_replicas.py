"""Remote replicas: ``--socket ssh://user@host:port/path`` through a real sshd on loopback to real htrd.

Each ``ssh://`` socket is an OpenSSH stream-local forward that htrctl opens and
closes itself (htrctl/replicas.py); the daemons are real htrd processes on the
demo model (CPU). Needs sshd (``make test`` installs it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import sshd_harness
from daemon_harness import htrd  # noqa: F401 -- htrd: the fixture
from helpers import REPO, make_inputs, output_files, require_system, wait_until

from htrctl.errors import UsageError
from htrctl.replicas import SshSocket, parse_socket

DAEMON = {"limits": {"batch_sizes": [1, 2], "batch_window_ms": 5.0}, "generation": {"max_new_tokens": 4},
          "log": {"level": "INFO"}}


def test_socket_paths_and_ssh_urls_parse_and_bad_urls_are_usage_errors():
    assert parse_socket("/run/htr/htr.sock") == Path("/run/htr/htr.sock")
    s = parse_socket("ssh://alice@gpu1.example.org:2222/run/htr/htr.sock")
    assert s == SshSocket(host="gpu1.example.org", path="/run/htr/htr.sock", user="alice", port=2222)
    assert str(s) == "ssh://alice@gpu1.example.org:2222/run/htr/htr.sock" and s.destination == "alice@gpu1.example.org"
    v6 = parse_socket("ssh://[fe80::1]/run/htr/htr@0.sock")
    assert v6.host == "fe80::1" and v6.port is None and v6.path == "/run/htr/htr@0.sock"
    assert str(v6) == "ssh://[fe80::1]/run/htr/htr@0.sock"
    for bad in ("ssh://host", "ssh://host:port/x", "ssh:///x.sock", "ssh://a@/x"):
        with pytest.raises(UsageError):
            parse_socket(bad)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    require_system(sshd_harness.available(), "sshd and ssh")
    with sshd_harness.sshd_server(tmp_path_factory.mktemp("sshd")) as server:
        yield server


def url(sshd, sock: Path) -> str:
    return f"ssh://{sshd['user']}@127.0.0.1:{sshd['port']}{sock}"


def replicas(start, n: int, faults: str, config: dict = DAEMON) -> list:
    """*n* daemons started together by the ``htrd`` fixture *start* (their loads overlap), then waited for one
    by one."""
    ds = [start(config=config, faults=faults, wait=False) for _ in range(n)]
    for d in ds:
        d.wait_ready()
    return ds


def forward_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("htr-ssh-*")}


def transcribe(sshd, sockets: list, src: Path, out: Path, *args: str) -> subprocess.Popen:
    """``htrctl transcribe -s SOCKET... --out OUT ARGS SRC`` in the background, ssh options for the test sshd."""
    argv = [a for s in sockets for a in ("-s", str(s))] + ["--out", str(out), *args, str(src)]
    return subprocess.Popen([sys.executable, "-m", "htrctl", "transcribe", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=REPO, env={**os.environ, "HTR_SSH": sshd["ssh_opts"]})


@pytest.mark.ssh
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_remote_replicas_one_killed_mid_run(sshd, htrd, tmp_path):
    """Two htrd behind ssh forwards; one is SIGKILLed mid-run: its in-flight inputs go to the other, each once."""
    d1, d2 = replicas(htrd, 2, "slow_generate=0.3")
    rels = make_inputs(tmp_path / "in", 16)
    out = tmp_path / "out"
    before = forward_dirs()
    p = transcribe(sshd, [url(sshd, d1.socket_path), url(sshd, d2.socket_path)], tmp_path / "in", out,
                   "-f", "json", "--retry-for", "10")

    def both_working():
        assert p.poll() is None, p.communicate()
        return len(output_files(out)) >= 3 and d1.status()["counters"]["images"] >= 1 and \
            d2.status()["counters"]["images"] >= 1

    wait_until(both_working, 240, what="both replicas to have answered")
    d1.signal(signal.SIGKILL)
    _, err = p.communicate(timeout=300)
    err = err.decode()
    assert p.returncode == 0, err
    assert output_files(out) == sorted(f"{r}.json" for r in rels)
    assert "transcribed 16 of 16 inputs" in err and "retries" in err, err  # done counts writes: 16, not more
    assert d2.status()["counters"]["images"] < 16  # d1 did part of the work before it died
    assert all(json.loads((out / f"{r}.json").read_text())["input"].endswith(r) for r in rels)
    assert forward_dirs() == before  # the forwards are closed and their directory removed


@pytest.mark.ssh
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_remote_and_local_mixed_and_unreachable_host(sshd, htrd, tmp_path):
    """A remote and a local replica share the work; the remote's forward, closed mid-run, is opened again."""
    d, local = replicas(htrd, 2, "slow_generate=1.0")
    rels = make_inputs(tmp_path / "in", 12)
    out = tmp_path / "out"
    before = forward_dirs()
    p = transcribe(sshd, [url(sshd, d.socket_path), local.socket_path], tmp_path / "in", out, "-f", "txt")
    ctl = wait_until(lambda: [c for n in forward_dirs() - before
                              for c in (Path(tempfile.gettempdir()) / n).glob("*.ctl")], 60, what="the forward")
    wait_until(lambda: p.poll() is not None or len(output_files(out)) >= 1, 240, what="a first output")
    # the forward's ssh master ends (as when the link drops): the client opens it again
    closed = subprocess.run([*sshd["ssh"].split(), "-S", str(ctl[0]), "-O", "exit", "127.0.0.1"], capture_output=True)
    assert closed.returncode == 0, closed.stderr
    _, err = p.communicate(timeout=240)
    err = err.decode()
    assert p.returncode == 0, err
    assert "the ssh forward ended" in err and "the forward is open again" in err, err
    assert output_files(out) == sorted(f"{r}.txt" for r in rels)
    assert d.status()["counters"]["images"] >= 1 and local.status()["counters"]["images"] >= 1
    assert forward_dirs() == before

    # an ssh that cannot log in: one line naming the URL, exit 75 (unavailable), nothing written
    bad = f"ssh://nobody-here@127.0.0.1:{sshd['port']}{d.socket_path}"
    p = transcribe(sshd, [bad], tmp_path / "in", tmp_path / "none")
    _, err = p.communicate(timeout=120)
    assert p.returncode == 75, err.decode()
    assert f"{bad}: ssh exited with 255" in err.decode()
    assert not (tmp_path / "none").exists()


@pytest.mark.ssh
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_throughput_one_two_three_remote_replicas(sshd, htrd, tmp_path):
    """Images/s with 1, 2 and 3 replicas over ssh in the same run (printed, not judged: a rate on a shared
    two-core machine is a benchmark's business -- bench_replicas.py measures it on GPUs). Judged: the work is
    spread -- with k replicas each one transcribed at least half its share of the inputs (its own
    ``/v1/status`` counter), every output written once.

    Each daemon's generate is lengthened by 1 s (slow_generate) so a replica behaves like one with
    its own accelerator: this two-core machine cannot give three CPU daemons three times the compute.
    The rate is the run's own (its summary line: from the first request to the last output).
    """
    import re

    ds = replicas(htrd, 3, "slow_generate=1.0",
                  config={**DAEMON, "limits": {"batch_sizes": [1, 2, 4], "batch_window_ms": 5.0}})
    n = 36
    make_inputs(tmp_path / "in", n)
    rates = {}
    for k in (1, 2, 3):
        out = tmp_path / f"out{k}"
        before = [d.status()["counters"]["images"] for d in ds[:k]]
        p = transcribe(sshd, [url(sshd, d.socket_path) for d in ds[:k]], tmp_path / "in", out, "-f", "txt")
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err.decode()
        assert len(output_files(out)) == n
        served = [d.status()["counters"]["images"] - b for d, b in zip(ds[:k], before)]
        assert sum(served) == n and min(served) >= n // (2 * k), served  # spread, not serialised on one
        m = re.search(rf"transcribed {n} of {n} inputs \({n} pages\) in ([0-9.]+) s", err.decode())
        assert m, err.decode()
        rates[k] = n / float(m.group(1))
    print("\nreplicas over ssh, images/s (the run's own rate): " + ", ".join(
        f"{k}: {r:.2f} ({r / rates[1]:.2f}x)" for k, r in rates.items()))


def test_requests_in_flight_follow_each_replicas_capacity():
    """Auto concurrency per replica: two of its largest batches, but no more than a batch plus its queue."""
    from htrctl.transcribe import _Replica

    r = _Replica(client=None)
    r.batch_sizes = [1, 2, 8]
    assert r.workers(0) == 16
    r.queue_capacity = 4
    assert r.workers(0) == 12
    r.batch_sizes, r.queue_capacity = [64], 256
    assert r.workers(0) == 128
    assert r.workers(3) == 3  # --concurrency wins


def test_worker_threads_spread_a_short_run_over_every_replica():
    """Fewer inputs than one replica's capacity still reach every replica: round-robin start order, each
    replica's workers capped at its share; a long run gets every replica's full capacity."""
    from htrctl.transcribe import worker_plan

    assert worker_plan([128, 128], 6) == [0, 1, 0, 1, 0, 1]
    assert worker_plan([128, 128, 128], 7) == [0, 1, 2] * 3
    assert worker_plan([2, 128], 100) == [0, 1, 0, 1] + [1] * 48  # a small replica keeps its capacity
    assert sorted(worker_plan([16, 16], 10_000)) == [0] * 16 + [1] * 16
    assert worker_plan([16], 0) == [0] and worker_plan([16, 16], 1) == [0, 1]
