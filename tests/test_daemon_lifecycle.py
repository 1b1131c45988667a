"""htrd's lifecycle against a real process: readiness states, backpressure, deadlines, OOM, drain, exit codes."""

from __future__ import annotations

import concurrent.futures
import io
import re
import signal
import socket
import time

import pytest
from daemon_harness import htrd, launch  # noqa: F401 -- htrd is a fixture
from helpers import wait_until
from PIL import Image, ImageDraw

from htrctl import protocol as P
from htrctl.errors import ExitCode


def png(seed: int = 0) -> bytes:
    img = Image.new("RGB", (360, 48), "white")
    d = ImageDraw.Draw(img)
    for i in range(8):
        d.line([(15 + i * 40, 40), (30 + i * 40 + seed % 7, 8)], fill="black", width=4)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def gauge(d, name: str) -> float:
    m = re.search(r"^" + re.escape(name) + r" ([0-9.e+-]+)$", d.metrics(), re.M)
    return float(m.group(1)) if m else -1.0


@pytest.mark.slow
def test_readiness_states_during_a_slow_load(htrd):
    d = htrd(faults="slow_load=2.5", wait=False)
    seen: list[str] = []
    refused: list = []

    def observe():
        st = d.state()
        if st and (not seen or seen[-1] != st):
            seen.append(st)
        if st == "loading" and not refused:
            refused.append(d.post(P.PATH_TRANSCRIBE, content=png()))
            refused.append(d.get(P.PATH_READY))
            refused.append(d.status())
        assert d.returncode is None, d.stderr()
        return st == "ready"

    wait_until(observe, 120, what="ready after a slow load")
    assert "loading" in seen and seen[-1] == "ready"
    order = ["starting", "loading", "warming", "ready"]
    assert [order.index(s) for s in seen] == sorted(order.index(s) for s in seen), seen
    busy, ready, status = refused
    assert busy.status_code == 503 and busy.json()["error"]["type"] == "not_ready"
    assert busy.headers["retry-after"].isdigit()
    assert ready.status_code == 503 and ready.json()["state"] == "loading"
    assert ready.json()["error"]["detail"]["state"] == "loading"
    assert status["state"] == "loading" and "slow_load" in (status["detail"] or "")
    assert d.post(P.PATH_TRANSCRIBE, content=png()).status_code == 200


@pytest.mark.slow
def test_queue_full_then_sigterm_drains_in_flight_work(htrd):
    d = htrd(faults="slow_generate=1.5",
             config={"limits": {"batch_sizes": [1], "queue_length": 1, "batch_window_ms": 0.0}})
    pool = concurrent.futures.ThreadPoolExecutor(4)
    try:
        first = pool.submit(d.post, P.PATH_TRANSCRIBE, content=png(1))
        wait_until(lambda: gauge(d, "htrd_generate_running") == 1.0, 30, what="first request in generate")
        second = pool.submit(d.post, P.PATH_TRANSCRIBE, content=png(2))
        wait_until(lambda: d.status()["queue_depth"] == 1, 30, what="second request queued")
        t0 = time.monotonic()
        full = d.post(P.PATH_TRANSCRIBE, content=png(3))
        assert time.monotonic() - t0 < 1.0  # immediate, never an unbounded wait
        assert full.status_code == 503, full.text
        assert full.json()["error"]["type"] == "queue_full"
        assert int(full.headers["retry-after"]) >= 1
        assert d.status()["counters"]["rejected_queue_full"] == 1

        # SIGTERM while one request runs and one waits: both finish, new work is refused, exit 0.
        d.signal(signal.SIGTERM)
        wait_until(lambda: d.state() == "draining", 10, what="draining")
        late = d.post(P.PATH_TRANSCRIBE, content=png(4))
        assert late.status_code == 503 and late.json()["error"]["type"] == "not_ready"
        assert first.result(30).status_code == 200
        assert second.result(30).status_code == 200
        assert second.result().json()["results"][0]["text"]
        assert d.wait_exit(30) == 0
        assert not d.socket_path.exists()  # a clean stop leaves no stale socket file
    finally:
        pool.shutdown(wait=True)
    err = d.stderr()
    assert "draining" in err and "drained" in err


@pytest.mark.slow
def test_deadline_gives_504_and_daemon_stays_ready(htrd):
    d = htrd(faults="slow_generate=3", config={"limits": {"request_deadline_s": 0.5}})
    t0 = time.monotonic()
    r = d.post(P.PATH_TRANSCRIBE, content=png())
    elapsed = time.monotonic() - t0
    assert r.status_code == 504, r.text
    assert r.json()["error"]["type"] == "deadline_exceeded"
    assert "request_deadline_s" in r.json()["error"]["message"]
    assert elapsed < 2.5  # answered at the deadline, not when the slow generate finished
    assert d.get(P.PATH_READY).status_code == 200
    assert d.status()["counters"]["deadline_exceeded"] >= 1


@pytest.mark.slow
def test_out_of_memory_fails_that_request_and_the_next_succeeds(htrd):
    d = htrd(faults="oom=2")
    r = d.post(P.PATH_TRANSCRIBE, content=png())
    assert r.status_code == 507, r.text
    err = r.json()["error"]
    assert err["type"] == "out_of_memory" and "still ready" in err["message"]
    assert d.get(P.PATH_READY).status_code == 200
    # A batch that runs out of memory is retried image by image: batch-mates are not failed with it.
    files = [("image", (f"{i}.png", png(i), "image/png")) for i in range(2)]
    r = d.post(P.PATH_TRANSCRIBE_BATCH, files=files)
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    assert all(i["error"] is None and i["results"][0]["batch_size"] == 1 for i in items), items
    assert "one by one" in d.stderr()
    ok = d.post(P.PATH_TRANSCRIBE, content=png())
    assert ok.status_code == 200 and ok.json()["results"][0]["text"]
    assert "out of memory" in d.stderr()


@pytest.mark.slow
def test_crash_fault_kills_the_process(htrd):
    d = htrd(faults="crash")
    with pytest.raises(Exception):
        d.post(P.PATH_TRANSCRIBE, content=png(), timeout=30)
    assert d.wait_exit(30) == -signal.SIGKILL


# -- exit codes (all fail before torch is imported: fast) ---------------------------------------------------------
def run_to_exit(tmp_path, model_dir, **kw) -> tuple[int, str]:
    d = launch(tmp_path, model_dir, **kw)
    code = d.wait_exit(60)
    return code, d.stderr()


def test_gpu_configured_on_a_host_without_it_exits_69(tmp_path, demo_model_dir):
    code, err = run_to_exit(tmp_path, demo_model_dir,
                            config={"gpu": {"select": "GPU-00000000-1111-2222-3333-444444444444"}})
    assert code == ExitCode.GPU, err
    assert "gpu.select" in err.lower() or "nvidia" in err.lower(), err  # what is wrong ...
    assert "gpu.select: cpu" in err  # ... and the way out
    assert "state starting -> loading" not in err  # failed before loading anything


def test_corrupt_model_dir_exits_65_naming_the_file(tmp_path, demo_model_copy):
    shard = sorted(demo_model_copy.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 3])
    code, err = run_to_exit(tmp_path, demo_model_copy)
    assert code == ExitCode.MODEL, err
    assert shard.name in err


def test_missing_adapter_exits_65(tmp_path, demo_model_copy):
    (demo_model_copy / "final_model" / "adapter_model.safetensors").unlink()
    code, err = run_to_exit(tmp_path, demo_model_copy)
    assert code == ExitCode.MODEL, err
    assert "adapter_model.safetensors" in err


def test_missing_model_dir_exits_65(tmp_path):
    code, err = run_to_exit(tmp_path, tmp_path / "no-such-model")
    assert code == ExitCode.MODEL, err
    assert "no-such-model" in err and "htrctl provision" in err


@pytest.mark.parametrize("problem", ["unknown_key", "bad_value", "bad_group", "bad_faults", "bad_yaml"])
def test_config_errors_exit_78(tmp_path, demo_model_dir, problem):
    kw: dict = {}
    if problem == "unknown_key":
        kw["config"] = {"limits": {"queue_lenght": 3}}
        words = "queue_lenght"
    elif problem == "bad_value":
        kw["config"] = {"gpu": {"select": "auto"}}
        words = "one GPU"
    elif problem == "bad_group":
        kw["config"] = {"socket": {"group": "no-such-group-htr"}}
        words = "no-such-group-htr"
    elif problem == "bad_faults":
        kw["faults"] = "explode_politely"
        words = "explode_politely"
    else:
        cfg = tmp_path / "broken.yaml"
        cfg.write_text("model: {dir: [unclosed\n")
        kw["config_path"] = cfg
        words = "YAML"
    code, err = run_to_exit(tmp_path, demo_model_dir, **kw)
    assert code == ExitCode.CONFIG, err
    assert words in err


def test_a_live_socket_is_not_stolen(tmp_path, demo_model_dir):
    path = tmp_path / "htrd.sock"
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(path))
    live.listen(1)
    try:
        code, err = run_to_exit(tmp_path, demo_model_dir, socket_path=path)
        assert code == ExitCode.CONFIG, err
        assert "in use" in err
        assert path.is_socket()  # still there, still the other process's
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.connect(str(path))
        probe.close()
    finally:
        live.close()


def test_socket_path_that_is_a_regular_file_is_refused(tmp_path, demo_model_dir):
    path = tmp_path / "htrd.sock"
    path.write_text("precious")
    code, err = run_to_exit(tmp_path, demo_model_dir, socket_path=path)
    assert code == ExitCode.CONFIG and "not a socket" in err
    assert path.read_text() == "precious"


def test_the_socket_flag_overrides_the_configured_path(tmp_path, demo_model_dir):
    """--socket wins over socket.path (checked through the error, which names the path it tried)."""
    other = tmp_path / "elsewhere" / "x.sock"
    code, err = run_to_exit(tmp_path, demo_model_dir, args=["--socket", str(other)])
    assert code == ExitCode.CONFIG and str(other.parent) in err


@pytest.mark.slow
def test_socket_activation_uses_the_inherited_fd(tmp_path, demo_model_dir):
    """LISTEN_FDS/LISTEN_PID (systemd socket activation): htrd serves on fd 3 and binds nothing itself."""
    import os
    import subprocess
    import sys

    from daemon_harness import Daemon, write_config

    activated = tmp_path / "act.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(activated))
    listener.listen(16)
    configured = tmp_path / "configured.sock"
    cfg = write_config(tmp_path, demo_model_dir, socket_path=configured)
    err_path = tmp_path / "htrd.stderr"
    env = dict(os.environ, PYTHONUNBUFFERED="1", LISTEN_FDS="1")

    def fd3() -> None:
        os.dup2(listener.fileno(), 3)

    with open(err_path, "wb") as err:
        # LISTEN_PID must be htrd's own pid: the shell exports its $$ and execs htrd in its place.
        proc = subprocess.Popen(
            ["sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh", sys.executable, "-m", "htrd", "--config", str(cfg)],
            stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=env, pass_fds=(3,), preexec_fn=fd3,
        )
    listener.close()  # htrd holds the only listening copy now
    d = Daemon(proc, activated, cfg, err_path)
    try:
        d.wait_ready()
        assert d.post(P.PATH_TRANSCRIBE, content=png()).status_code == 200
        assert not configured.exists()  # socket.path was not bound: systemd owns the socket
        assert "inherited from systemd" in d.stderr()
    finally:
        assert d.stop() == 0, d.stderr()[-3000:]


def test_sigterm_while_loading_exits_0_at_once(htrd):
    d = htrd(faults="slow_load=60", wait=False)
    wait_until(lambda: d.state() == "loading", 60, what="loading")
    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    assert d.wait_exit(20) == 0, d.stderr()[-3000:]
    assert time.monotonic() - t0 < 10  # did not wait for the load to finish


def test_merged_variant_required_but_absent_exits_65(tmp_path, demo_model_dir):
    code, err = run_to_exit(tmp_path, demo_model_dir, config={"model": {"variant": "merged"}})
    assert code == ExitCode.MODEL, err
    assert "merged" in err and "htrctl provision --merge" in err


def _metric(d, name: str, labels: str) -> float:
    m = re.search(r"^" + re.escape(name + "{" + labels + "}") + r" ([0-9.e+-]+)$", d.metrics(), re.M)
    return float(m.group(1)) if m else 0.0


@pytest.mark.slow
def test_an_expired_line_leaves_the_running_batch_and_its_error_is_counted_once(htrd):
    """Deadlines stop work: a line forced to decode 2,000 tokens (many seconds on the CPU) is taken out of
    the running batch at the next step after its deadline -- its slot is free long before it could have
    finished -- and the 504 is counted once in /metrics and once in the status counters."""
    d = htrd(config={"limits": {"request_deadline_s": 0.6, "batch_sizes": [1, 2]},
                     "generation": {"max_new_tokens": 2000, "min_new_tokens": 2000, "max_cache_len": 4096}})
    r = d.post(P.PATH_TRANSCRIBE, content=png(1))
    assert r.status_code == 504 and r.json()["error"]["type"] == "deadline_exceeded", r.text
    t_504 = time.monotonic()
    wait_until(lambda: d.status()["engine"]["slots_occupied"] == 0, 3, what="the expired line's slot freed")
    assert time.monotonic() - t_504 < 3
    # the daemon serves the next line at once, and the running line was really taken out (tokens so far)
    ok = d.post(P.PATH_TRANSCRIBE, content=png(2), params={"max_new_tokens": 3})
    assert ok.status_code == 200 and ok.json()["results"][0]["tokens"] == 3, ok.text
    assert _metric(d, "htrd_errors_total", 'type="deadline_exceeded"') == 1.0
    counters = d.status()["counters"]
    assert counters["deadline_exceeded"] == 1 and counters["errors"] == 1 and counters["requests"] == 2
    assert "deadline" in d.stderr()


@pytest.mark.slow
def test_a_bad_image_is_one_error(htrd):
    d = htrd()
    r = d.post(P.PATH_TRANSCRIBE, content=b"this is not an image")
    assert r.status_code in (415, 422), r.text
    kind = r.json()["error"]["type"]
    assert _metric(d, "htrd_errors_total", f'type="{kind}"') == 1.0
    assert d.status()["counters"]["errors"] == 1
