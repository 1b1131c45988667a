"""htrctl doctor on CPU: captured GPU hosts replayed through the NVML fake, constructed
bad hosts (the incident's two PCIe GPUs whose peer copy hangs or returns zeros, ECC
errors, compute mode prohibited, a too-small GPU), host/service/model checks against
files in tmp_path, and the CLI. The P2P cases go through the real child process and
its hard timeout; only what the copy *does* comes from the snapshot."""

from __future__ import annotations

import copy
import http.server
import json
import os
import shutil
import socketserver
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import REPO

from htrctl.config import Settings, load_settings
from htrctl.doctor import FAIL, OK, P2P_REMEDY, WARN, DoctorPaths, render_table, run_doctor
from htrctl.doctor.placement import set_gpu_select_text, write_recommendation
from htrctl.gpus import GIB
from htrctl.nvml import ENV_FAKE

HOSTS = sorted((REPO / "tests" / "data" / "gpu-hosts").glob("*.json"))

U0 = "GPU-1c0ffee0-0000-4000-8000-000000000000"
U1 = "GPU-2c0ffee0-0000-4000-8000-000000000001"


def _gpu(index, uuid, bus, *, free_gib=45.0, total_gib=48.0, **kw):
    d = {"index": index, "uuid": uuid, "name": "NVIDIA L40S", "pci_bus_id": bus,
         "memory_total": int(total_gib * GIB), "memory_free": int(free_gib * GIB),
         "memory_used": int((total_gib - free_gib) * GIB), "persistence_mode": True, "compute_mode": 0,
         "mig_mode": None, "ecc_mode": [1, 1], "ecc_uncorrected_volatile": 0, "ecc_uncorrected_aggregate": 0,
         "remapped_rows": {"correctable": 0, "uncorrectable": 0, "pending": False, "failure": False},
         "processes": [], "pcie_gen": 4, "pcie_width": 16, "nvlinks_active": 0, "numa_node": 0,
         "errors": {"mig_mode": "NVMLError_NotSupported: Not Supported"}}
    d.update(kw)
    return d


# The incident's host: two PCIe L40S under the host bridge (PHB), the driver says P2P OK.
INCIDENT = {
    "schema": "htrctl-nvml-snapshot/1",
    "description": "constructed: 2x L40S on PCIe through the host bridge, driver reports P2P OK (the incident)",
    "nvml": {
        "driver_version": "550.127.05", "cuda_driver_version": 12040, "nvml_version": "12.550.127.05",
        "gpus": [_gpu(0, U0, "00000000:41:00.0"), _gpu(1, U1, "00000000:C1:00.0")],
        "pairs": [{"a": 0, "b": 1, "common_ancestor": 30, "nvlink": False,
                   "p2p": {"read": 0, "write": 0, "nvlink": 5, "atomics": 5, "prop": 5}, "errors": {}}],
    },
}


def host(tmp_path, doc, monkeypatch, name="host.json"):
    p = tmp_path / name
    p.write_text(json.dumps(doc))
    monkeypatch.setenv(ENV_FAKE, str(p))
    return p


def variant(**probe_or_gpus):
    doc = copy.deepcopy(INCIDENT)
    if "probe" in probe_or_gpus:
        doc["probe"] = probe_or_gpus["probe"]
    for i, changes in probe_or_gpus.get("gpus", {}).items():
        doc["nvml"]["gpus"][i].update(changes)
    return doc


@pytest.fixture
def paths(tmp_path) -> DoctorPaths:
    """An empty host: no IOMMU, no units, no systemd (each test adds what it needs)."""
    root = tmp_path / "root"
    (root / "sys" / "class" / "dmi" / "id").mkdir(parents=True)
    (root / "sys" / "class" / "dmi" / "id" / "sys_vendor").write_text("Supermicro\n")
    (root / "proc").mkdir()
    (root / "proc" / "cmdline").write_text("BOOT_IMAGE=/vmlinuz root=/dev/sda1 ro quiet\n")
    (root / "proc" / "cpuinfo").write_text("processor\t: 0\nflags\t\t: fpu vme sse sse2\n")
    (root / "etc-systemd").mkdir()
    (root / "dev").mkdir()
    return DoctorPaths(sys_root=root / "sys", proc_root=root / "proc", unit_dirs=(root / "etc-systemd",),
                       systemctl=None, dev_root=root / "dev")


def settings_for(tmp_path, **gpu) -> Settings:
    s = Settings()
    s.model.dir = tmp_path / "no-model"
    s.socket.path = tmp_path / "htr.sock"
    for k, v in gpu.items():
        setattr(s.gpu, k, v)
    return s


def sized_model(tmp_path, gib: float) -> Path:
    """A model directory whose index declares *gib* GiB of weights (placement reads only that)."""
    d = tmp_path / "model"
    d.mkdir()
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": int(gib * GIB)}, "weight_map": {}}))
    return d


# --------------------------------------------------------------------------- captured hosts


@pytest.mark.parametrize("path", HOSTS, ids=[p.stem for p in HOSTS])
def test_doctor_on_a_captured_host_checks_every_pair_and_recommends_a_gpu(path, tmp_path, paths, monkeypatch):
    doc = json.loads(path.read_text())
    monkeypatch.setenv(ENV_FAKE, str(path))
    n = len(doc["nvml"]["gpus"])
    t0 = time.monotonic()
    rep = run_doctor(settings_for(tmp_path), p2p=True, p2p_timeout=20, paths=paths)
    took = time.monotonic() - t0
    ids = {f.id for f in rep.findings}
    assert {f"gpu.{i}" for i in range(n)} <= ids
    assert rep.by_id("driver.nvml").severity == OK
    for f in rep.findings:
        if f.section in ("topology", "p2p"):
            assert f.severity == OK, (f.id, f.message)
    if n > 1:  # the probe ran (fake copy through the real subprocess) for every ordered pair
        assert sum(1 for f in rep.findings if f.id.startswith("p2p.") and f.severity == OK) == n * (n - 1)
        assert all(f"topology.{i}-{j}" in ids for i in range(n) for j in range(i + 1, n))
    uuids = [g["uuid"] for g in doc["nvml"]["gpus"]]
    assert rep.recommendation and rep.recommendation["uuid"] in uuids
    assert rep.by_id("model.dir").severity == FAIL  # tmp_path has no model
    json.dumps(rep.to_dict())
    assert took < 15
    no_p2p = run_doctor(settings_for(tmp_path), p2p=False, paths=paths)
    assert no_p2p.duration_s < 2.0


# --------------------------------------------------------------------------- the incident's host


def test_a_hanging_p2p_copy_fails_within_the_timeout_with_the_remedy(tmp_path, paths, monkeypatch):
    host(tmp_path, variant(probe={"pairs": {"0-1": "hang"}}), monkeypatch)
    t0 = time.monotonic()
    rep = run_doctor(settings_for(tmp_path), sections=["topology", "p2p", "placement"], p2p_timeout=3.0, paths=paths)
    took = time.monotonic() - t0
    assert 3.0 <= took < 10, took  # bounded by the timeout, not by the hang
    f = rep.by_id("p2p.0-1")
    assert f.severity == FAIL
    assert "did not finish within 3 s (hung) although the driver reports P2P OK" in f.message
    assert f.remedy == P2P_REMEDY
    for words in ("pin the daemon to one GPU", "IOMMU", "ACS", "P2P OK"):
        assert words in f.remedy
    assert rep.by_id("p2p").severity == FAIL
    assert "1->0" in rep.by_id("p2p.untested").message
    # the topology says what the driver claims; the real test contradicts it
    topo = rep.by_id("topology.0-1")
    assert topo.data["link"] == "PHB" and topo.data["p2p"]["read"] == "OK"
    # one GPU is still recommended: the model never needs the broken path
    assert rep.recommendation["uuid"] in (U0, U1)
    assert rep.exit_code == 1
    text = render_table(rep)
    assert "FAIL  p2p.0-1" in text and "pin the daemon to one GPU" in text


def test_a_p2p_copy_returning_zeros_fails_that_direction_only(tmp_path, paths, monkeypatch):
    host(tmp_path, variant(probe={"pairs": {"0-1": "zeros"}}), monkeypatch)
    rep = run_doctor(settings_for(tmp_path), sections=["p2p"], p2p_timeout=20, paths=paths)
    f = rep.by_id("p2p.0-1")
    assert f.severity == FAIL and "returned only zeros although the driver reports P2P OK" in f.message
    assert f.remedy == P2P_REMEDY
    assert rep.by_id("p2p.1-0").severity == OK  # the other direction is tested and fine
    assert rep.exit_code == 1


def test_mismatch_is_not_called_zeros(tmp_path, paths, monkeypatch):
    host(tmp_path, variant(probe={"pairs": {"1-0": "mismatch"}}), monkeypatch)
    rep = run_doctor(settings_for(tmp_path), sections=["p2p"], p2p_timeout=20, paths=paths)
    f = rep.by_id("p2p.1-0")
    assert f.severity == FAIL and "different bytes than the source" in f.message


def test_a_probe_that_never_starts_is_a_bounded_failure(tmp_path, paths, monkeypatch):
    """A probe that hangs before reporting anything (CUDA init wedged) is a bounded failure."""
    host(tmp_path, variant(probe={"hang_at_start": True}), monkeypatch)
    rep = run_doctor(settings_for(tmp_path), sections=["p2p"], p2p_timeout=2.0, paths=paths)
    f = rep.by_id("p2p")
    assert f.severity == FAIL and "did not start within 2 s" in f.message and P2P_REMEDY in f.remedy
    assert f.data["timed_out"] is True
    assert 2.0 <= rep.duration_s < 8


def test_without_torch_the_p2p_probe_is_a_warning(tmp_path, paths, monkeypatch):
    host(tmp_path, variant(probe={"torch": False}), monkeypatch)
    rep = run_doctor(settings_for(tmp_path), sections=["p2p"], paths=paths)
    f = rep.by_id("p2p")
    assert f.severity == WARN and "needs torch" in f.message


def test_no_p2p_flag_warns_about_risky_pcie_path(tmp_path, paths, monkeypatch):
    host(tmp_path, INCIDENT, monkeypatch)
    rep = run_doctor(settings_for(tmp_path), sections=["topology", "p2p"], p2p=False, paths=paths)
    t = rep.by_id("topology.0-1")
    assert t.severity == WARN and "not trustworthy" in t.message
    assert rep.by_id("p2p").data["skipped"] is True


# --------------------------------------------------------------------------- bad GPUs


def test_uncorrected_ecc_fails_and_is_not_recommended(tmp_path, paths, monkeypatch):
    host(tmp_path, variant(gpus={1: {"ecc_uncorrected_volatile": 3, "memory_free": int(47 * GIB)}}), monkeypatch)
    rep = run_doctor(settings_for(tmp_path), sections=["driver", "placement"], paths=paths)
    f = rep.by_id("gpu.1.ecc")
    assert f.severity == FAIL and "3 uncorrected ECC error(s)" in f.message and "reset" in f.remedy
    assert rep.recommendation["uuid"] == U0  # GPU 1 has more free memory but is unhealthy
    assert U1 in rep.by_id("placement.recommend").data["excluded"]


def test_a_prohibited_compute_mode_fails_and_another_gpu_is_recommended(tmp_path, paths, monkeypatch):
    host(tmp_path, variant(gpus={0: {"compute_mode": 2}}), monkeypatch)
    rep = run_doctor(settings_for(tmp_path, select=U0), sections=["driver", "placement"], paths=paths)
    f = rep.by_id("gpu.0.compute-mode")
    assert f.severity == FAIL and "Prohibited" in f.message and "-c DEFAULT" in f.remedy
    cfg = rep.by_id("placement.config")
    assert cfg.severity == FAIL and "prohibited" in cfg.message
    assert rep.recommendation["uuid"] == U1


def test_pending_row_remapping_fails_the_gpu(tmp_path, paths, monkeypatch):
    host(tmp_path, variant(gpus={0: {"remapped_rows": {"correctable": 0, "uncorrectable": 2, "pending": True,
                                                        "failure": False}}}), monkeypatch)
    rep = run_doctor(settings_for(tmp_path), sections=["driver"], paths=paths)
    assert rep.by_id("gpu.0.remapped-rows").severity == FAIL


def test_a_configured_gpu_too_small_for_the_model_fails_and_another_is_named(tmp_path, paths, monkeypatch):
    host(tmp_path, variant(gpus={0: {"memory_free": int(12 * GIB)}}), monkeypatch)
    s = settings_for(tmp_path, select="0")
    s.model.dir = sized_model(tmp_path, 17.5)
    rep = run_doctor(s, sections=["placement"], paths=paths)
    size = rep.by_id("placement.size")
    assert size.data["weights_bytes"] == int(17.5 * GIB) and size.data["required_bytes"] == int(19.5 * GIB)
    cfg = rep.by_id("placement.config")
    assert cfg.severity == FAIL
    assert "has 12.0 GiB free, the model needs 19.5 GiB" in cfg.message
    assert "htrctl doctor recommends one" in cfg.remedy
    assert rep.recommendation["uuid"] == U1
    assert rep.exit_code == 1


# Qwen3-VL-8B's language model: 36 layers, 8 KV heads of 128 -- 0.14 GiB of KV cache a slot at 1,024 positions.
QWEN3_VL_8B_TEXT = {"num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                    "hidden_size": 4096}


@pytest.mark.parametrize("free_gib, total_gib, slots, severity", [
    (139.0, 141.0, 256, OK),  # an H200: every configured size
    (45.0, 48.0, 128, OK),  # the incident's L40S: 128 of 256 -- still many
    (22.0, 24.0, 8, WARN),  # a 24 GB card: the model fits, few lines at once
])
def test_doctor_says_how_many_slots_the_gpu_holds(tmp_path, paths, monkeypatch, free_gib, total_gib, slots,
                                                   severity):
    """htrd serves as many slots (lines decoding at once) as the GPU holds beside the weights, up to the
    largest of limits.batch_sizes; doctor predicts that number for the configured GPU the way htrd sizes it
    (htrctl.modeldir.slots_that_fit), and a GPU needs room for the smallest size only."""
    host(tmp_path, variant(gpus={0: {"memory_free": int(free_gib * GIB), "memory_total": int(total_gib * GIB)}}),
         monkeypatch)
    s = settings_for(tmp_path, select="0")
    s.model.dir = sized_model(tmp_path, 17.5)
    (s.model.dir / "config.json").write_text(json.dumps({"text_config": QWEN3_VL_8B_TEXT}))
    rep = run_doctor(s, sections=["placement"], paths=paths)
    per_slot = 2 * 36 * 8 * 128 * 2 * 1024
    size = rep.by_id("placement.size")
    assert size.data["kv_cache_bytes"] == per_slot  # the smallest size: one slot
    assert size.data["required_bytes"] == int(17.5 * GIB) + per_slot + 2 * GIB
    assert rep.by_id("placement.config").severity == OK
    f = rep.by_id("placement.slots")
    assert (f.severity, f.data["slots"], f.data["kv_cache_bytes"]) == (severity, slots, slots * per_slot)
    assert f"{slots} slots" in f.message
    assert (f.remedy is not None) == (severity == WARN)


def test_no_gpu_can_hold_the_model(tmp_path, paths, monkeypatch):
    host(tmp_path, INCIDENT, monkeypatch)
    s = settings_for(tmp_path)
    s.model.dir = sized_model(tmp_path, 60)
    rep = run_doctor(s, sections=["placement"], paths=paths)
    f = rep.by_id("placement.recommend")
    assert f.severity == FAIL and "no single GPU can hold the model" in f.message
    assert "never split the model" in f.remedy
    assert rep.recommendation is None


def test_model_size_from_safetensors_headers(demo_model_dir, tmp_path, paths, monkeypatch):
    from htrctl.modeldir import model_footprint, safetensors_payload

    host(tmp_path, INCIDENT, monkeypatch)
    fp = model_footprint(demo_model_dir, "adapter")
    shards = list(demo_model_dir.glob("*.safetensors"))
    assert fp["parts"]["base"] > 0 and fp["parts"]["adapter"] > 0
    # payload = file minus the 8-byte length and the header
    for p in shards:
        assert 0 < safetensors_payload(p) < p.stat().st_size
    s = settings_for(tmp_path)
    s.model.dir = demo_model_dir
    rep = run_doctor(s, sections=["placement"], paths=paths)
    assert rep.by_id("placement.size").data["weights_bytes"] == fp["weights_bytes"]


# --------------------------------------------------------------------------- no driver / wedged driver


def test_no_driver_is_a_clear_finding(tmp_path, paths, monkeypatch):
    host(tmp_path, {"init_error": "NVML Shared Library Not Found"}, monkeypatch)
    rep = run_doctor(settings_for(tmp_path), paths=paths)
    f = rep.by_id("driver.nvml")
    assert f.severity == FAIL and f.message.startswith("no NVIDIA driver found")
    assert rep.by_id("placement.recommend").severity == FAIL
    assert rep.duration_s < 2.0
    cpu = run_doctor(settings_for(tmp_path, select="cpu"), sections=["driver"], paths=paths)
    assert cpu.by_id("driver.nvml").severity == WARN


def test_wedged_driver_is_bounded(tmp_path, paths, monkeypatch):
    host(tmp_path, {"behaviour": {"nvml": "hang"}}, monkeypatch)
    rep = run_doctor(settings_for(tmp_path), sections=["driver"], paths=paths, nvml_timeout=0.5)
    f = rep.by_id("driver.nvml")
    assert f.severity == FAIL and "did not answer within 0.5 s" in f.message
    assert rep.duration_s < 2


def test_a_crashing_check_becomes_a_finding(tmp_path, paths, monkeypatch):
    host(tmp_path, INCIDENT, monkeypatch)

    def boom(ctx):
        raise RuntimeError("surprise")

    monkeypatch.setattr("htrctl.doctor.host.check", boom)
    rep = run_doctor(settings_for(tmp_path), sections=["host", "driver"], paths=paths)
    f = rep.by_id("host.crashed")
    assert f.severity == FAIL and "RuntimeError: surprise" in f.message
    assert rep.by_id("driver.nvml").severity == OK  # the other sections still ran


# --------------------------------------------------------------------------- host


def _iommu(paths: DoctorPaths, group_type: str, cmdline: str) -> None:
    (paths.sys_root / "class" / "iommu" / "dmar0").mkdir(parents=True)
    for g in ("0", "1", "2"):
        (paths.sys_root / "kernel" / "iommu_groups" / g).mkdir(parents=True)
        (paths.sys_root / "kernel" / "iommu_groups" / g / "type").write_text(group_type + "\n")
    (paths.proc_root / "cmdline").write_text(cmdline + "\n")


def test_iommu_translated_with_two_gpus_warns(tmp_path, paths, monkeypatch):
    host(tmp_path, INCIDENT, monkeypatch)
    _iommu(paths, "DMA-FQ", "root=/dev/sda1 intel_iommu=on")
    f = run_doctor(settings_for(tmp_path), sections=["host"], paths=paths).by_id("host.iommu")
    assert f.severity == WARN and "translated" in f.message and "iommu=pt" in f.remedy
    assert f.data["group_types"] == {"DMA-FQ": 3} and f.data["cmdline_flags"] == ["intel_iommu=on"]


def test_iommu_passthrough_is_ok(tmp_path, paths, monkeypatch):
    host(tmp_path, INCIDENT, monkeypatch)
    _iommu(paths, "identity", "root=/dev/sda1 intel_iommu=on iommu=pt")
    f = run_doctor(settings_for(tmp_path), sections=["host"], paths=paths).by_id("host.iommu")
    assert f.severity == OK and "passthrough" in f.message


def test_no_iommu_on_bare_metal_is_ok(tmp_path, paths, monkeypatch):
    host(tmp_path, INCIDENT, monkeypatch)
    rep = run_doctor(settings_for(tmp_path), sections=["host"], paths=paths)
    assert rep.by_id("host.iommu").severity == OK and rep.by_id("host.iommu").message == "IOMMU off"
    assert rep.by_id("host.vm").severity == OK and rep.by_id("host.vm").data["vm"] is False


def test_a_virtual_machine_is_detected_and_warned_about(tmp_path, paths, monkeypatch):
    host(tmp_path, INCIDENT, monkeypatch)
    (paths.sys_root / "class" / "dmi" / "id" / "sys_vendor").write_text("QEMU\n")
    (paths.proc_root / "cpuinfo").write_text("flags\t\t: fpu vme hypervisor\n")
    f = run_doctor(settings_for(tmp_path), sections=["host"], paths=paths).by_id("host.vm")
    assert f.severity == WARN and "QEMU" in f.message and f.data["hypervisor_flag"] is True


def test_cuda_device_order_and_visible_device_indices_are_warned_about(tmp_path, paths, monkeypatch):
    host(tmp_path, INCIDENT, monkeypatch)
    env = {"CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "FASTEST_FIRST"}
    rep = run_doctor(settings_for(tmp_path), sections=["host"], paths=paths, env=env)
    assert rep.by_id("host.cuda-env.order").severity == WARN
    vis = rep.by_id("host.cuda-env.visible")
    assert vis.severity == WARN and "indices without CUDA_DEVICE_ORDER=PCI_BUS_ID" in vis.message


def _unit(paths: DoctorPaths, text: str, dropins: dict[str, str] | None = None) -> None:
    d = paths.unit_dirs[0]
    (d / "htr.service").write_text("[Unit]\nDescription=htr\n\n[Service]\n" + text)
    for name, body in (dropins or {}).items():
        (d / "htr.service.d").mkdir(exist_ok=True)
        (d / "htr.service.d" / name).write_text(body)


def test_service_exposing_two_gpus_fails(tmp_path, paths, monkeypatch):
    host(tmp_path, INCIDENT, monkeypatch)
    _unit(paths, "Environment=CUDA_VISIBLE_DEVICES=0,1 CUDA_DEVICE_ORDER=PCI_BUS_ID\n")
    f = run_doctor(settings_for(tmp_path), sections=["host"], paths=paths).by_id("host.service-cuda-env.visible")
    assert f.severity == FAIL and "exposes 2 GPUs" in f.message


# --------------------------------------------------------------------------- model


def test_offline_read_from_the_unit_and_dropins_not_from_doctor(tmp_path, paths, monkeypatch):
    host(tmp_path, INCIDENT, monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # doctor's own env must not count
    _unit(paths, 'Environment="HF_HUB_OFFLINE=0" TRANSFORMERS_OFFLINE=1\nUser=htr\n')
    f = run_doctor(settings_for(tmp_path), sections=["model"], paths=paths).by_id("model.offline")
    assert f.severity == FAIL and "HF_HUB_OFFLINE=0" in f.message
    _unit(paths, 'Environment="HF_HUB_OFFLINE=0"\n', {"50-offline.conf": "[Service]\nEnvironment=HF_HUB_OFFLINE=1\n"})
    f = run_doctor(settings_for(tmp_path), sections=["model"], paths=paths).by_id("model.offline")
    assert f.severity == OK and "50-offline.conf" in f.message
    envfile = tmp_path / "htr.env"
    envfile.write_text("# env\nHF_HUB_OFFLINE=false\n")
    _unit(paths, f"Environment=HF_HUB_OFFLINE=1\nEnvironmentFile=-{envfile}\n")
    assert run_doctor(settings_for(tmp_path), sections=["model"], paths=paths).by_id("model.offline").severity == FAIL


def test_the_projects_unit_passes_offline(tmp_path, paths, monkeypatch):
    unit = REPO / "systemd" / "htr.service"
    if not unit.is_file():
        pytest.skip("systemd/htr.service not written yet (systemd helper)")
    host(tmp_path, INCIDENT, monkeypatch)
    (paths.unit_dirs[0] / "htr.service").write_text(unit.read_text())
    rep = run_doctor(settings_for(tmp_path), sections=["model", "host"], paths=paths)
    assert rep.by_id("model.offline").severity == OK


def test_model_checks_pass_on_the_demo_model(demo_model_copy, tmp_path, paths, monkeypatch):
    host(tmp_path, INCIDENT, monkeypatch)
    s = settings_for(tmp_path)
    s.model.dir = demo_model_copy
    rep = run_doctor(s, sections=["model"], paths=paths)
    base = rep.by_id("model.adapter-base")
    assert base.severity == OK and "is local" in base.message
    v = rep.by_id("model.verify")
    assert v.severity in (OK, WARN) and "unavailable" not in v.message, v.message
    # the incident's first cause: the adapter without its base
    for p in demo_model_copy.glob("*.safetensors*"):
        p.unlink()
    rep = run_doctor(s, sections=["model"], paths=paths)
    base = rep.by_id("model.adapter-base")
    assert base.severity == FAIL and "would download" in base.message and "htrctl provision" in base.remedy
    assert rep.by_id("model.verify").severity == FAIL


# --------------------------------------------------------------------------- service


class _Daemon(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def _serve(sock: Path, ready=(200, {"state": "ready"}), status=None):
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            code, body = ready if self.path == "/v1/ready" else (200, status or {})
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass

        def address_string(self):
            return "uds"

    srv = _Daemon(str(sock), H)
    os.chmod(sock, 0o660)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def test_service_socket_readiness_and_match(tmp_path, paths, monkeypatch):
    import grp

    host(tmp_path, INCIDENT, monkeypatch)
    s = settings_for(tmp_path, select=U1)
    s.socket.group = grp.getgrgid(os.getgid()).gr_name
    model = sized_model(tmp_path, 1)
    (model / "htr-manifest.json").write_text('{"x": 1}')
    s.model.dir = model
    import hashlib

    digest = hashlib.sha256(b'{"x": 1}').hexdigest()
    srv = _serve(s.socket.path, status={"model_dir": str(model), "manifest_digest": digest,
                                        "gpu": {"device": "cuda:0", "uuid": U1}})
    try:
        rep = run_doctor(s, sections=["service"], paths=paths)
        assert rep.by_id("service.socket").severity == OK
        assert rep.by_id("service.ready").severity == OK
        assert rep.by_id("service.match").severity == OK
        s.gpu.select = U0  # the config changed, the daemon was not restarted
        rep = run_doctor(s, sections=["service"], paths=paths)
        m = rep.by_id("service.match")
        assert m.severity == FAIL and f"runs on {U1}, gpu.select is {U0}" in m.message
        os.chmod(s.socket.path, 0o666)
        f = run_doctor(s, sections=["service"], paths=paths).by_id("service.socket")
        assert f.severity == FAIL and "every user" in f.message
    finally:
        srv.shutdown()
        srv.server_close()


def test_service_loading_and_missing_socket(tmp_path, paths, monkeypatch):
    host(tmp_path, INCIDENT, monkeypatch)
    s = settings_for(tmp_path)
    s.socket.group = None
    rep = run_doctor(s, sections=["daemon"], paths=paths)  # the module's name works as well
    assert rep.sections == ["service"]
    assert rep.by_id("service.units").severity == WARN
    assert rep.by_id("service.socket").severity == WARN  # nothing installed: not set up yet
    _unit(paths, "ExecStart=/usr/bin/htrd\n")
    assert run_doctor(s, sections=["service"], paths=paths).by_id("service.socket").severity == FAIL
    srv = _serve(s.socket.path, ready=(503, {"state": "loading"}), status={})
    try:
        f = run_doctor(s, sections=["service"], paths=paths).by_id("service.ready")
        assert f.severity == WARN and "loading" in f.message
    finally:
        srv.shutdown()
        srv.server_close()


# --------------------------------------------------------------------------- --write-config


def test_set_gpu_select_text_keeps_everything_else():
    text = "# my config\nmodel:\n  dir: /srv/m  # here\ngpu:\n  select: most-free   # policy\n  min_free_headroom_gib: 3\nlog:\n  level: INFO\n"
    out = set_gpu_select_text(text, U1)
    assert out == text.replace("select: most-free   # policy", f"select: {U1}   # policy")
    out = set_gpu_select_text("model:\n  dir: /m\ngpu:\n    min_free_headroom_gib: 1\n", U0)
    assert f"gpu:\n    select: {U0}" in out and "min_free_headroom_gib: 1" in out
    out = set_gpu_select_text("model:\n  dir: /m", U0)
    assert out.startswith("model:\n  dir: /m\ngpu:\n  select: " + U0)


def test_write_recommendation_is_validated_and_atomic(tmp_path):
    cfg = tmp_path / "htr.yaml"
    cfg.write_text("# keep me\ngpu:\n  select: first\nlimits:\n  queue_length: 8\n  batch_sizes: [1, 2]\n")
    os.chmod(cfg, 0o640)
    write_recommendation(cfg, U1)
    s = load_settings(cfg, env={})
    assert s.gpu.select == U1 and s.limits.queue_length == 8
    assert cfg.read_text().startswith("# keep me\n")
    assert oct(cfg.stat().st_mode & 0o777) == "0o640"
    assert [p.name for p in tmp_path.iterdir()] == ["htr.yaml"]  # no temp file left


# --------------------------------------------------------------------------- CLI


def _cli(*args, env_extra=None, timeout=60):
    env = {k: v for k, v in os.environ.items()}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "htrctl", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)


def test_cli_json_write_config_and_exit_codes(tmp_path, monkeypatch):
    p = host(tmp_path, INCIDENT, monkeypatch)
    cfg = tmp_path / "htr.yaml"
    cfg.write_text(f"model:\n  dir: {tmp_path / 'model'}\n# comment kept\ngpu:\n  select: most-free\n")
    sized_model(tmp_path, 4)
    r = _cli("--config", str(cfg), "doctor", "--json", "--no-p2p", "--section", "placement", "--write-config",
             env_extra={ENV_FAKE: str(p)})
    doc = json.loads(r.stdout)
    assert doc["recommendation"]["uuid"] in (U0, U1)
    assert doc["config_written"] == str(cfg)
    assert r.returncode == doc["exit_code"] == 0, r.stderr
    assert load_settings(cfg, env={}).gpu.select == doc["recommendation"]["uuid"]
    assert "# comment kept" in cfg.read_text()
    # warnings only -> 5 ; a failure -> 1 ; readable table on stdout
    r = _cli("--config", str(cfg), "doctor", "--section", "topology", "--no-p2p", env_extra={ENV_FAKE: str(p)})
    assert r.returncode == 5 and "WARN  topology.0-1" in r.stdout
    bad = variant(probe={"pairs": {"0-1": "zeros"}})
    pb = tmp_path / "bad.json"
    pb.write_text(json.dumps(bad))
    r = _cli("--config", str(cfg), "doctor", "--section", "p2p", env_extra={ENV_FAKE: str(pb)})
    assert r.returncode == 1 and "FAIL  p2p.0-1" in r.stdout
    r = _cli("doctor", "--section", "nonsense", env_extra={ENV_FAKE: str(p)})
    assert r.returncode == 2 and "choose from" in r.stderr


def test_vm_with_a_passing_p2p_test_is_ok(tmp_path, paths, monkeypatch):
    host(tmp_path, INCIDENT, monkeypatch)
    (paths.sys_root / "class" / "dmi" / "id" / "sys_vendor").write_text("QEMU\n")
    rep = run_doctor(settings_for(tmp_path), sections=["p2p", "host"], paths=paths, p2p_timeout=20)
    f = rep.by_id("host.vm")
    assert f.severity == OK and "the P2P test passed" in f.message
    host(tmp_path, variant(probe={"pairs": {"0-1": "zeros"}}), monkeypatch, name="bad.json")
    rep = run_doctor(settings_for(tmp_path), sections=["p2p", "host"], paths=paths, p2p_timeout=20)
    assert rep.by_id("host.vm").severity == WARN


# --------------------------------------------------------------------------- nvidia-uvm, torch.compile's needs


def _uvm(paths: DoctorPaths, *, loaded: bool, node: bool) -> None:
    (paths.proc_root / "devices").write_text("Character devices:\n195 nvidia\n" + ("508 nvidia-uvm\n" if loaded else "")
                                            + "\nBlock devices:\n  8 sd\n")
    if node:
        (paths.dev_root / "nvidia-uvm").write_bytes(b"")


def test_nvidia_uvm_loaded_with_its_node(tmp_path, paths, monkeypatch):
    host(tmp_path, INCIDENT, monkeypatch)
    _uvm(paths, loaded=True, node=True)
    f = run_doctor(settings_for(tmp_path), sections=["host"], paths=paths).by_id("host.nvidia-uvm")
    assert f.severity == OK and "major 508" in f.message


def test_nvidia_uvm_missing_warns_before_install_and_fails_with_the_service_but_no_prepare_unit(
        tmp_path, paths, monkeypatch):
    host(tmp_path, INCIDENT, monkeypatch)
    _uvm(paths, loaded=False, node=False)
    f = run_doctor(settings_for(tmp_path), sections=["host"], paths=paths).by_id("host.nvidia-uvm")
    assert f.severity == WARN and "not loaded" in f.message and "htr-gpu-prepare.service" in f.remedy
    _unit(paths, "User=htr\n")  # a service without the oneshot: htrd will exit 69
    f = run_doctor(settings_for(tmp_path), sections=["host"], paths=paths).by_id("host.nvidia-uvm")
    assert f.severity == FAIL and "exits 69" in f.message
    (paths.unit_dirs[0] / "htr-gpu-prepare.service").write_text("[Service]\nType=oneshot\n")
    f = run_doctor(settings_for(tmp_path), sections=["host"], paths=paths).by_id("host.nvidia-uvm")
    assert f.severity == WARN and "loads it before htrd starts" in f.message
    _uvm(paths, loaded=True, node=False)
    f = run_doctor(settings_for(tmp_path), sections=["host"], paths=paths).by_id("host.nvidia-uvm")
    assert "loaded but" in f.message and "does not exist" in f.message


def test_nvidia_uvm_is_not_judged_for_the_cpu(tmp_path, paths, monkeypatch):
    host(tmp_path, INCIDENT, monkeypatch)
    rep = run_doctor(settings_for(tmp_path, select="cpu"), sections=["host"], paths=paths)
    assert rep.by_id("host.nvidia-uvm") is None


def _compiling(tmp_path, **gen) -> Settings:
    s = settings_for(tmp_path)
    s.generation.static_cache = True
    s.generation.compile = True
    for k, v in gen.items():
        setattr(s.generation, k, v)
    return s


def _include(tmp_path, with_header: bool) -> Path:
    inc = tmp_path / ("inc-ok" if with_header else "inc-none")
    inc.mkdir()
    if with_header:
        (inc / "Python.h").write_text("/* */\n")
    return inc


def test_compile_needs_a_compiler_headers_and_a_writable_cache(tmp_path, paths, monkeypatch):
    host(tmp_path, INCIDENT, monkeypatch)
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    cc = bin_ / "gcc"
    cc.write_text("#!/bin/sh\n")
    cc.chmod(0o755)
    cache = tmp_path / "cache"
    paths.python_include = _include(tmp_path, True)
    rep = run_doctor(_compiling(tmp_path, compile_cache_dir=cache), sections=["host"], paths=paths,
                     env={"PATH": str(bin_)})
    assert rep.by_id("host.compile.cc").severity == OK and str(cc) in rep.by_id("host.compile.cc").message
    assert rep.by_id("host.compile.headers").severity == OK
    for name in ("inductor", "triton"):
        f = rep.by_id(f"host.compile.cache-{name}")
        assert f.severity == OK and f.data["path"] == str(cache / name), f.message
    # no compiler on the PATH, no headers
    paths.python_include = _include(tmp_path, False)
    rep = run_doctor(_compiling(tmp_path, compile_cache_dir=cache), sections=["host"], paths=paths,
                     env={"PATH": str(tmp_path / "empty")})
    cc_f, hdr = rep.by_id("host.compile.cc"), rep.by_id("host.compile.headers")
    assert cc_f.severity == FAIL and "gcc" in cc_f.remedy
    assert hdr.severity == FAIL and "python3-dev" in hdr.remedy
    # compile off (or the eager path): nothing to build, nothing judged
    rep = run_doctor(_compiling(tmp_path, compile=False), sections=["host"], paths=paths, env={"PATH": ""})
    assert not [f for f in rep.findings if f.id.startswith("host.compile")]


def test_compile_cache_under_noexecpaths_of_the_unit_fails(tmp_path, paths, monkeypatch):
    host(tmp_path, INCIDENT, monkeypatch)
    paths.python_include = _include(tmp_path, True)
    _unit(paths, "User=root\nEnvironment=TORCHINDUCTOR_CACHE_DIR=%S/htr/torchinductor TRITON_CACHE_DIR=%S/htr/triton\n"
          "NoExecPaths=/var/lib/htr\n")
    rep = run_doctor(_compiling(tmp_path), sections=["host"], paths=paths)
    for name, sub in (("inductor", "torchinductor"), ("triton", "triton")):
        f = rep.by_id(f"host.compile.cache-{name}")
        assert f.severity == FAIL and "NoExecPaths=/var/lib/htr" in f.message, f.message
        assert f.data["path"] == f"/var/lib/htr/{sub}"  # %S resolved as systemd does for a system unit


def test_compile_cache_on_a_noexec_mount_fails(tmp_path):
    """A real noexec tmpfs, mounted in a private mount namespace of a child process."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare to mount a noexec tmpfs")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    inc = _include(tmp_path, True)
    code = (
        "import json; from htrctl.config import Settings; from htrctl.doctor import DoctorPaths, run_doctor\n"
        "s = Settings(); s.generation.static_cache = True\n"
        f"s.generation.compile_cache_dir = {str(mnt / 'cache')!r}\n"
        "s.gpu.select = '0'\n"
        f"p = DoctorPaths(unit_dirs=(), systemctl=None, python_include=__import__('pathlib').Path({str(inc)!r}))\n"
        "f = run_doctor(s, sections=['host'], paths=p, env={}).by_id('host.compile.cache-triton')\n"
        "print(json.dumps(f.to_dict()))\n"
    )
    env = {**os.environ, ENV_FAKE: str(host_file(tmp_path))}
    res = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                          f"mount -t tmpfs -o noexec tmpfs {mnt} && exec {sys.executable} -c \"$0\"", code],
                         check=False, capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    f = json.loads(res.stdout.strip().splitlines()[-1])
    assert f["severity"] == FAIL and "noexec mount" in f["message"], f


def host_file(tmp_path) -> Path:
    p = tmp_path / "incident.json"
    p.write_text(json.dumps(INCIDENT))
    return p
