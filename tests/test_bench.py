"""The benchmark harness end to end on the CPU: the 8B generator's --tiny model, the naive worker, a real htrd.

What the GPU run relies on: the model generator writes a loadable directory (base, processor,
adapter), the naive and fast paths agree on greedy tokens, the daemon (fast path) forces the
requested length (generation.min_new_tokens), and the report has every row.
"""

from __future__ import annotations

import json
import subprocess
import sys

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


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_serving_bench_cpu_smoke_both_engines_both_modes(tmp_path):
    """bench_serving.py end to end on the CPU: a static and a continuous daemon each answer every request of
    both modes with exactly the forced number of tokens, and exit cleanly."""
    sys.path.insert(0, str(REPO / "bench"))
    from bench_serving import realistic_requests

    model, out = tmp_path / "tiny8b", tmp_path / "serving.json"
    cmd = [sys.executable, str(REPO / "bench" / "bench_serving.py"), "--cpu", "--make-tiny", "--model-dir", str(model),
           "--clients", "3", "--per-client", "2", "--new-tokens", str(NEW), "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    realistic = realistic_requests(6)
    for engine in ("static", "continuous"):
        e = data["engines"][engine]
        assert e["exit_code"] == 0
        fixed, real = e["fixed@3"], e["realistic@3"]
        assert fixed["requests"] == real["requests"] == 6 and fixed["n_errors"] == real["n_errors"] == 0
        assert fixed["tokens"] == 6 * NEW
        assert real["tokens"] == sum(new for _, _, new in realistic)  # every request answered, so all of them
    assert "**continuous / static**" in proc.stdout
