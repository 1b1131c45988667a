"""The benchmark harness end to end on the CPU: the 8B generator's --tiny model, the naive worker, a real htrd.

What the GPU run relies on: the model generator writes a loadable directory (base, processor,
adapter), the naive and fast paths agree on greedy tokens, the daemon (fast path) forces the
requested length (generation.min_new_tokens), and the report has every row.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import REPO

pytest.importorskip("torch")
pytest.importorskip("peft")

NEW = 8


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_bench_cpu_smoke_on_the_tiny_8b_layout(tmp_path):
    model = tmp_path / "tiny8b"
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO / "bench" / "bench_generate.py"), "--cpu", "--make-model", "--model-dir", str(model),
           "--clients", "1,3", "--per-client", "2", "--single-requests", "3", "--naive-requests", "1",
           "--batch-sizes", "1,2,4", "--new-tokens", str(NEW), "--no-restart", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # the generated directory has the incident's layout
    assert (model / "config.json").is_file() and (model / "final_model" / "adapter_config.json").is_file()
    acfg = json.loads((model / "final_model" / "adapter_config.json").read_text())
    assert acfg["r"] == 16 and acfg["base_model_name_or_path"] == "Qwen/Qwen3-VL-8B-Instruct"
    assert set(acfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}

    data = json.loads(out.read_text())
    naive, daemon = data["naive"], data["daemon"]
    assert naive["prompt_tokens"] > 190  # a 1200x160 line at Qwen3-VL's real pixel bounds: 190 image tokens
    assert naive["tokens_equal_prefix"] == naive["tokens_compared"] == NEW
    assert len(naive["naive_tokens"]) == NEW  # EOS suppressed until NEW tokens
    assert daemon["first_response"]["results"][0]["tokens"] == NEW
    assert [ld["requests"] for ld in daemon["loads"]] == [2, 6]
    assert all(ld["n_errors"] == 0 for ld in daemon["loads"])
    assert daemon["status"]["state"] == "ready"
    assert daemon["exit_code"] == 0  # SIGTERM drained cleanly
    table = proc.stdout
    for row in ("(a) naive: p50 one request", "(b) htrd: start -> READY (cold)", "(b) htrd: 3 clients lines/s",
                "ratio (b)/(a) one-request latency", "greedy tokens equal to naive"):
        assert row in table, row


def test_the_steady_part_starts_once_every_client_has_its_first_answer():
    """bench_serving's steady window: from the last client's first answer to the last request taken, lines
    answered inside it (not the ramp's, not the drain's); a load whose last request is taken before every
    client has had an answer has none."""
    sys.path.insert(0, str(REPO / "bench"))
    from bench_serving import steady_window

    finished = [2.0, 2.1, 2.5, 3.0, 4.0, 5.0, 6.0, 7.5, 8.0]  # released at 0; answers from 2 s on (the ramp)
    assert steady_window(0.0, [2.0, 2.1, 2.5], 6.5, finished) == (2.5, 6.5, 4 / 4.0)  # 3.0, 4.0, 5.0, 6.0
    assert steady_window(0.0, [2.0, 7.0], 6.5, finished) == (0.0, 6.5, None)
    assert steady_window(1.0, [], 6.5, finished) == (1.0, 6.5, None)


def test_clients_are_released_together_once_every_one_is_set_up():
    """bench_generate.run_clients: no client sends before the slowest has built its HTTP client (256 httpx
    clients take seconds to build; released meanwhile, the first requests trickled out -- a "slow start" that
    was the benchmark's). The slow client finishes its set-up once another has sent (a release that does not
    wait for it), else after a second (one that does)."""
    import threading
    import time

    sys.path.insert(0, str(REPO / "bench"))
    from bench_generate import run_clients

    lock = threading.Lock()
    sent = threading.Event()
    set_up: list[float] = []
    first_request: list[float] = []
    order = iter(range(8))

    def client(start) -> None:
        with lock:
            slowest = next(order) == 0
        if slowest:
            sent.wait(timeout=1.0)
        with lock:
            set_up.append(time.perf_counter())
        start.wait()
        with lock:
            first_request.append(time.perf_counter())
        sent.set()

    run_clients(8, client)
    assert len(set_up) == len(first_request) == 8
    assert min(first_request) >= max(set_up)


def test_where_the_requests_are_averages_the_steady_part_and_partitions_the_clients():
    """bench_serving's WhereSampler: averaged over the samples inside the steady part (every client busy), the
    clients' requests split into decoding, queued, elsewhere in htrd (in flight, neither) and at the clients
    (not in flight); a steady part of fewer than 3 samples averages the whole load instead."""
    sys.path.insert(0, str(REPO / "bench"))
    from bench_serving import WhereSampler

    w = WhereSampler(Path("/nonexistent.sock"), clients=8)
    # (time, in flight, queued, decoding): the first and last are outside the steady part [1, 3]
    w.samples = [(0.5, 2, 0, 1), (1.0, 7, 1, 4), (2.0, 8, 0, 6), (3.0, 6, 2, 3), (4.0, 1, 0, 1)]
    got = w.averages(1.0, 3.0)
    assert got == {"samples": 3, "over": "steady part", "decoding": 4.3, "queued": 1.0, "elsewhere_in_htrd": 1.7,
                   "at_clients": 1.0}
    assert w.averages(1.5, 2.5)["over"] == "whole load" and w.averages(1.5, 2.5)["samples"] == 5
    w.samples = []
    assert w.averages(0.0, 9.0) is None


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_serving_bench_cpu_smoke_every_engine_both_modes(tmp_path):
    """bench_serving.py end to end on the CPU: a static, a continuous and a mixed-steps daemon each answer every
    request of both modes, in two rounds, with exactly the forced number of tokens, and exit cleanly."""
    sys.path.insert(0, str(REPO / "bench"))
    from bench_serving import realistic_requests

    model, out = tmp_path / "tiny8b", tmp_path / "serving.json"
    cmd = [sys.executable, str(REPO / "bench" / "bench_serving.py"), "--cpu", "--make-tiny", "--model-dir", str(model),
           "--clients", "3", "--per-client", "2", "--new-tokens", str(NEW), "--rounds", "2", "--settle", "0.3",
           "--engines", "static,continuous,mixed", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    realistic = realistic_requests(6)
    layouts = {name: e["status"]["engine"]["prefill_layout"] for name, e in data["engines"].items()}
    assert layouts == {"static": "packed", "continuous": "packed", "mixed": "mixed"}
    assert data["engines"]["mixed"]["status"]["engine"]["mixed_steps"] > 0
    for engine in ("static", "continuous", "mixed"):
        e = data["engines"][engine]
        assert e["exit_code"] == 0
        assert e["precaptured_before_load"] == 0  # --settle: idle after READY; the CPU captures no graphs
        for rnd in ("", " round 2"):  # the same requests again, on the same daemon
            fixed, real = e["fixed@3" + rnd], e["realistic@3" + rnd]
            assert fixed["requests"] == real["requests"] == 6 and fixed["n_errors"] == real["n_errors"] == 0
            assert fixed["tokens"] == 6 * NEW
            assert real["tokens"] == sum(new for _, _, new in realistic)  # every request answered, so all of them
            for r in (fixed, real):  # 2 requests a client: too short for a steady part (see the test below)
                assert sum(r["per_second"]) == 6 and 0 <= r["first_answer_s"] < r["wall_s"]
                where = r["where"]  # the 3 clients' requests, sampled from /v1/status during the load
                parts = ("decoding", "queued", "elsewhere_in_htrd", "at_clients")
                assert where["samples"] > 0 and all(where[k] >= 0 for k in parts)
                # a load this short may be sampled between two steps (nothing decoding): the arithmetic is
                # tested on made-up samples above; here, every client's request is counted once at most
                assert sum(where[k] for k in parts) <= 3 + 0.2 + 1e-9  # rounding of each part
                if where["over"] == "steady part":  # every client busy: the parts add up to the clients
                    assert abs(sum(where[k] for k in parts) - 3) <= 0.2 + 1e-9
    assert "**continuous / static**" in proc.stdout and "realistic @ 3 clients, round 2" in proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_replicas_bench_cpu_two_replicas_share_the_load(tmp_path, demo_model_dir):
    """bench_replicas.py end to end on the CPU: two htrd replicas started as htr@ starts them; replica 0 alone,
    then both at once, then htrctl transcribe with both sockets -- every line answered and counted once."""
    out = tmp_path / "replicas.json"
    clients, per_client = 2, 2
    cmd = [sys.executable, str(REPO / "bench" / "bench_replicas.py"), "--cpu", "--model-dir", str(demo_model_dir),
           "--replicas", "2", "--clients", str(clients), "--per-client", str(per_client), "--new-tokens", "4",
           "--state-dir", str(tmp_path / "state"), "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["error"] is None and data["instances"] == ["cpu0", "cpu1"]
    assert set(data["ready_s"]) == {"cpu0", "cpu1"} and all(v > 0 for v in data["ready_s"].values())
    # the unit's environment reached htrd: each replica on its own socket, its own process, on the CPU
    pids = {info["pid"] for info in data["replica_info"]}
    assert pids == {info["daemon_pid"] for info in data["replica_info"]} and len(pids) == 2
    assert all(info["gpu"]["device"] == "cpu" for info in data["replica_info"])
    single, both = data["single"], data["all"]
    assert single["requests"] == clients * per_client and single["n_errors"] == 0
    assert single["replicas"][0]["requests_served"] == clients * per_client
    assert both["requests"] == 2 * clients * per_client and both["n_errors"] == 0
    for rep in both["replicas"]:  # each replica served its own clients' lines, as its daemon counted them
        assert rep["requests"] == rep["requests_served"] == clients * per_client
        assert rep["tokens_generated"] == 4 * clients * per_client
        assert rep["avg_occupied_slots"] is not None and rep["avg_occupied_slots"] >= 1
    assert data["scaling"] == pytest.approx(both["lines_per_s"] / (2 * single["lines_per_s"]))
    t = data["transcribe"]
    assert t["exit_code"] == 0 and t["results"] == t["images"] == 2 * clients * 2
    assert sum(t["served_per_replica"]) == t["images"]
    assert data["placement"]["pass"] is None and "--cpu" in data["placement"]["skipped"]
    assert data["exit_codes"] == {"cpu0": 0, "cpu1": 0}
    assert "scaling: total / (2 x alone)" in proc.stdout and "GPU placement check skipped" in proc.stdout


def test_replicas_bench_placement_check_verdicts():
    """The nvidia-smi check: PASS when each replica's processes hold memory on its own GPU only, FAIL when one
    holds some elsewhere or /v1/status names another GPU, UNKNOWN when nvidia-smi lists none of their PIDs."""
    sys.path.insert(0, str(REPO / "bench"))
    from bench_replicas import placement_check

    a, b = "GPU-aaaaaaaa-0000-0000-0000-000000000000", "GPU-bbbbbbbb-0000-0000-0000-000000000000"
    assigned = {a: a, b: b}
    pids = {a: {10, 11}, b: {20}}
    ok = SimpleNamespace(pids=pids, seen={(10, a): 17000, (20, b): 17000, (99, a): 5})
    res = placement_check(ok, assigned, {a: a, b: b})
    assert res["pass"] is True and [r["replica"] for r in res["rows"]] == [a, b, None]
    stray = SimpleNamespace(pids=pids, seen={(10, a): 17000, (11, b): 300, (20, b): 17000})  # a child on b's GPU
    res = placement_check(stray, assigned, {a: a, b: b})
    assert res["pass"] is False and res["problems"] == [f"replica {a} (pid 11) holds 300 MiB on {b}"]
    assert placement_check(ok, assigned, {a: a, b: a})["pass"] is False
    assert placement_check(SimpleNamespace(pids=pids, seen={(10, a): 17000}), assigned, {a: a, b: b})["pass"] is False
    unknown = placement_check(SimpleNamespace(pids=pids, seen={(5, a): 17000}), assigned, {a: a, b: b})
    assert unknown["pass"] is None and "PID namespace" in unknown["note"]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_benchmark_stopped_by_sigterm_stops_the_htrd_it_started(tmp_path, demo_model_dir):
    """`timeout` (SIGTERM) on a benchmark mid-run: the htrd it started in a session of its own exits too,
    instead of holding the GPU for whatever runs next."""
    import os
    import signal

    from helpers import wait_until

    cmd = [sys.executable, str(REPO / "bench" / "bench_generate.py"), "--cpu", "--model-dir", str(demo_model_dir),
           "--skip-naive", "--no-restart", "--single-requests", "100000", "--new-tokens", "4",
           "--daemon-log", str(tmp_path / "htrd.log")]
    bench = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def htrd_children() -> list[int]:
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = open(f"/proc/{entry}/stat").read()
                    cmdline = open(f"/proc/{entry}/cmdline", "rb").read()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == bench.pid and b"htrd.app" in cmdline:
                    pids.append(int(entry))
        return pids

    try:
        log = tmp_path / "htrd.log"
        wait_until(lambda: htrd_children() and log.exists() and "ready: serving on" in log.read_text(),
                   timeout=150, what="htrd READY under the benchmark")
        (daemon,) = htrd_children()
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(60) != 0

        def gone() -> bool:
            try:
                return open(f"/proc/{daemon}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
            except OSError:
                return True

        wait_until(gone, timeout=60, what="htrd to exit with the benchmark that started it")
    finally:
        if bench.poll() is None:
            bench.kill()


def test_spy_summary_splits_one_threads_samples_by_function_and_leaf(tmp_path, capsys):
    """bench/spy_summary.py on py-spy's raw format (the stacks of two threads; one line of the file per
    distinct stack, its sample count last): shares for the named thread only; clear errors otherwise."""
    sys.path.insert(0, str(REPO / "bench"))
    import spy_summary

    raw = tmp_path / "spy.txt"
    raw.write_text(
        "thread (686): htrd-inference;Thread.run (threading.py:1010);Engine._loop (htrd/engine.py:311);"
        "FastGenerator.step (htrd/fastgen.py:440);Event.synchronize (torch/cuda/streams.py:254) 30\n"
        "thread (686): htrd-inference;Thread.run (threading.py:1010);Engine._loop (htrd/engine.py:308);"
        "FastGenerator._prefill (htrd/fastgen.py:369) 10\n"
        "thread (619): htrd-http;Thread.run (threading.py:1010);Server.run (uvicorn/server.py:86) 500\n"
        "garbage line without a count\n")
    assert spy_summary.main([str(raw), "htrd-inference", "--top", "5"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "40 samples of htrd-inference"
    assert "100.0% Engine._loop" in out and " 75.0% FastGenerator.step" in out
    assert " 75.0% Event.synchronize (torch/cuda/streams.py:254)" in out and "Server.run" not in out
    assert spy_summary.main([str(raw), "htrd-pre_"]) == 1
    assert "no samples of a thread named like 'htrd-pre_'" in capsys.readouterr().err
    assert spy_summary.main([str(tmp_path / "missing.txt"), "htrd-inference"]) == 2


@pytest.mark.timeout(300)
def test_fast_correctness_check_cpu_smoke(demo_model_dir, tmp_path):
    """check_fast_correctness.py on the CPU demo model: every path scored, and the decode steps teacher-forced on
    HF's tokens give HF's logits (the same arithmetic here: a forced token off by one step would not)."""
    out = tmp_path / "c.json"
    cmd = [sys.executable, str(REPO / "bench" / "check_fast_correctness.py"), str(demo_model_dir), "--device", "cpu",
           "--new-tokens", "3", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["pass"] and set(data["paths"]) >= {"hf_bf16_generate", "fast_alone", "fast_batched", "fast_joined"}
    forced = data["forced_logit_error"]
    assert forced["fast_forced_sdpa_decode"]["steps"] == forced["hf_bf16_generate"]["steps"] == 8 * 2
    assert forced["fast_forced_sdpa_decode"]["mean_step_max"] <= 1.01 * forced["hf_bf16_generate"]["mean_step_max"]


def test_trace_summary_attributes_gpu_idle_to_the_innermost_range_of_the_inference_thread():
    """bench/trace_summary.py on a made-up htrd timeline: over the window of the decode calls, the GPU's busy
    share, each idle gap charged to the innermost htr: range at its middle (a prefill inside a step: the
    prefill), launch gaps under 10 us apart, and the prefills' host time and GPU share."""
    sys.path.insert(0, str(REPO / "bench"))
    from trace_summary import summarise

    def rng(name, ts, dur):
        return {"cat": "user_annotation", "name": name, "ts": ts, "dur": dur}

    def kernel(ts, dur):
        return {"cat": "kernel", "name": "gemm", "ts": ts, "dur": dur}

    events = [rng("htr:_step:8", 0, 1000), rng("htr:_prefill:3", 200, 400), rng("htr:_packed_layers", 300, 100),
              rng("htr:_step:8", 1000, 1000), rng("htr:other", 5000, 10),  # outside the window: ignored
              kernel(0, 100), kernel(105, 95),  # a 5 us launch gap
              kernel(250, 50),  # idle 200-250: in the prefill
              kernel(420, 480),  # idle 300-420, middle 360: in _packed_layers
              kernel(1000, 900)]  # idle 900-1000: in the first step; 1900-2000: the second
    s = summarise(events)
    assert s["window_ms"] == 2.0 and s["steps"] == 2 and s["mean_occupancy"] == 8
    assert s["gpu_busy_pct"] == 100 * (100 + 95 + 50 + 480 + 900) / 2000
    assert s["idle_by_range_ms"] == {"htr:_step": 0.2, "htr:_packed_layers": 0.12, "htr:_prefill": 0.05,
                                     "tiny (<10 us)": 0.005}
    assert s["prefills"] == {3: {"count": 1, "host_ms": 0.4, "gpu_busy_pct": pytest.approx(100 * (50 + 180) / 400)}}
    assert summarise([rng("htr:_step:1", 0, 10)]) == {
        "error": "no kernels or no htr:_step ranges (was the trace taken under load on a GPU?)"}
    # no launches in this trace: every kernel of the window is "other", over the 3 lines prefilled
    busy = pytest.approx((100 + 95 + 50 + 480 + 900) / 1e3 / 3)
    assert s["gpu_ms_per_line"] == {"lines": 3, "other": busy, "by_kind": {"other: GEMM": busy}}


def test_trace_summary_charges_each_kernel_to_the_phase_that_launched_it():
    """bench/trace_summary.py's GPU time per line: a kernel belongs to the phase whose range holds its launch
    (the runtime call of its correlation id), not to where it ran -- a prefill's kernels run while the host is
    already in the next step -- vision inside the prefill counted apart; summed per line prefilled, and within
    each phase by the kernel's kind (flash attention's name holds "cutlass" too: attention, not GEMM)."""
    sys.path.insert(0, str(REPO / "bench"))
    from trace_summary import summarise

    def rng(name, ts, dur):
        return {"cat": "user_annotation", "name": name, "ts": ts, "dur": dur}

    def launch(corr, ts):
        return {"cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": ts, "dur": 1, "args": {"correlation": corr}}

    def kernel(corr, ts, dur, name="triton_red_fused_add_rms"):
        return {"cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"correlation": corr}}

    flash = "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<96, 128, 64, 4, cutlass::bfloat16_t>>"
    events = [rng("htr:_step:4", 0, 1000), rng("htr:_prefill:2", 100, 300), rng("htr:_vision_replayed", 120, 50),
              rng("htr:_step:6", 1000, 1000),
              launch(1, 10), kernel(1, 20, 60, "nvjet_sm90_tst_192x128"),  # a decode step
              launch(2, 130), kernel(2, 140, 200, flash),  # the vision tower, inside the prefill
              launch(3, 250), kernel(3, 340, 600),  # the language model's prefill: runs on into the next step
              launch(4, 1010), kernel(4, 1100, 100, "stage1"),  # the next decode step
              kernel(9, 1300, 40, "Memcpy HtoD (Pinned -> Device)")]  # no launch recorded: other
    got = summarise(events)["gpu_ms_per_line"]
    assert got == {"lines": 2, "prefill (language model)": 0.3, "vision tower": 0.1, "decode steps": 0.08,
                   "other": 0.02,
                   "by_kind": {"decode steps: GEMM": 0.03, "decode steps: attention": 0.05, "other: copy": 0.02,
                               "prefill (language model): elementwise": 0.3, "vision tower: attention": 0.1}}


def test_preprocess_contention_runs_on_the_cpu(demo_model_dir):
    """bench/preprocess_contention.py: the preprocessing alone, the inference-like thread alone and beside a
    pool of one thread -- every figure printed, exit 0."""
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "preprocess_contention.py"), str(demo_model_dir),
                           "--threads", "1", "--iters", "5"], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "preprocessing alone:" in out and "inference-like thread alone: period p50" in out
    assert "1 preprocessing threads: inference-like period p50" in out and "images/s" in out
