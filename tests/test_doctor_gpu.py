"""On a real GPU host (pytest -m gpu): the real NVML wrapper, the real P2P test, one GPU recommended.

Run on hosts with 1, 2 and 4 GPUs; figures (run time, P2P GB/s per pair) are printed
with -s and written to $DOCTOR_GPU_REPORT_DIR when set.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO

from tests.conftest import require_system

pytestmark = pytest.mark.gpu


def _smi_uuids() -> list[str]:
    out = subprocess.run(["nvidia-smi", "--query-gpu=uuid,pci.bus_id", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    rows = [tuple(x.strip() for x in line.split(",")) for line in out.strip().splitlines()]
    return [u for u, _bus in sorted(rows, key=lambda r: r[1])]


@pytest.fixture(scope="module")
def uuids() -> list[str]:
    require_system(shutil.which("nvidia-smi") is not None, "an NVIDIA GPU and driver (nvidia-smi)")
    return _smi_uuids()


def test_real_nvml_wrapper(uuids, monkeypatch):
    from htrctl.gpus import GIB, list_gpus, select_gpu
    from htrctl.nvml import read_host

    snap = read_host()
    assert snap.driver_version and snap.cuda_driver_version
    devs = list_gpus()
    assert [d.uuid for d in devs] == uuids  # PCI bus order, like nvidia-smi
    assert all(d.memory_total > d.memory_free > 0 for d in devs)
    n = len(devs)
    assert len(snap.pairs) == n * (n - 1) // 2
    for p in snap.pairs:  # the one-element-tuple trap: every capability must be read with an int
        assert "p2p_read" not in p.errors, p.errors
        assert p.p2p.get("read") is not None
    best = select_gpu("most-free", required_bytes=1 * GIB)
    assert best.uuid in uuids
    assert select_gpu(str(n - 1)).uuid == uuids[-1]


def test_doctor_json_finds_every_gpu_runs_p2p_recommends_one(uuids, tmp_path):
    n = len(uuids)
    env = dict(os.environ)
    env.pop("HTR_NVML_FAKE", None)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "htrctl", "doctor", "--json", "--p2p-timeout", "120",
                        "-s", "driver", "-s", "topology", "-s", "p2p", "-s", "host", "-s", "placement"],
                       capture_output=True, text=True, timeout=200, env=env, cwd=REPO)
    took = time.monotonic() - t0
    doc = json.loads(r.stdout)
    f = {x["id"]: x for x in doc["findings"]}
    assert f["driver.nvml"]["severity"] == "ok", f["driver.nvml"]
    assert [f[f"gpu.{i}"]["data"]["uuid"] for i in range(n)] == uuids
    assert doc["recommendation"]["uuid"] in uuids
    pairs = [x for x in doc["findings"] if x["id"].startswith("p2p.") and x["id"] != "p2p.untested"]
    if n > 1:
        assert f["p2p"]["data"]["fake"] is False and f["p2p"]["data"]["torch"]
        assert len(pairs) == n * (n - 1)
        for p in pairs:
            assert p["severity"] in ("ok", "warn"), p  # this host's peer path works
            assert p["data"]["problem"] is None and p["data"]["d2d_gbps"] > 0
    else:
        assert f["p2p"]["message"].startswith("1 GPU(s)")
    figures = {"gpus": n, "names": sorted({f[f"gpu.{i}"]["data"]["name"] for i in range(n)}),
               "doctor_wall_s": round(took, 2), "p2p_s": doc["timings"].get("p2p"),
               "pairs": {x["id"]: {"d2d_gbps": x["data"]["d2d_gbps"], "host_gbps": x["data"]["host_gbps"],
                                   "link": None} for x in pairs},
               "links": {x["id"]: x["data"]["link"] for x in doc["findings"] if x["id"].startswith("topology.")}}
    print("\nGPU FIGURES", json.dumps(figures))
    out = os.environ.get("DOCTOR_GPU_REPORT_DIR")
    if out:
        Path(out, f"doctor-gpu-figures-{n}gpu.json").write_text(json.dumps(figures, indent=1))
    # without the P2P test the whole run stays under 2 s
    t0 = time.monotonic()
    r2 = subprocess.run([sys.executable, "-m", "htrctl", "doctor", "--json", "--no-p2p"], capture_output=True,
                        text=True, timeout=60, env=env, cwd=REPO)
    doc2 = json.loads(r2.stdout)
    assert doc2["duration_s"] < 2.0, doc2["timings"]
    assert r2.returncode == doc2["exit_code"]
