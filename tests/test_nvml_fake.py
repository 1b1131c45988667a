"""The NVML wrapper's fake backend and the one-GPU selection policy, on captured hosts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from htrctl.errors import ExitCode, GpuError
from htrctl.gpus import GIB, list_gpus, select_gpu
from htrctl.nvml import ENV_FAKE, read_host

HOSTS = Path(__file__).parent / "data" / "gpu-hosts"
CAPTURED = sorted(HOSTS.glob("*.json"))


def _write(tmp_path: Path, doc: dict, name: str = "host.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(doc))
    return p


def _gpu(index: int, uuid: str, bus: str, free_gib: float, total_gib: float = 48.0, **kw) -> dict:
    d = {"index": index, "uuid": uuid, "name": "NVIDIA L40S", "pci_bus_id": bus,
         "memory_total": int(total_gib * GIB), "memory_free": int(free_gib * GIB), "compute_mode": 0}
    d.update(kw)
    return d


U0 = "GPU-00000000-1111-2222-3333-444444444444"
U1 = "GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"


def test_captured_gpu_host_snapshots_are_present():
    assert len(CAPTURED) >= 1, "tests/data/gpu-hosts/ must hold captured snapshots"


@pytest.mark.parametrize("path", CAPTURED, ids=[p.stem for p in CAPTURED])
def test_a_captured_host_replays_its_gpus_and_pairs(path, monkeypatch):
    doc = json.loads(path.read_text())
    monkeypatch.setenv(ENV_FAKE, str(path))
    snap = read_host()
    assert len(snap.gpus) == len(doc["nvml"]["gpus"]) >= 1
    n = len(snap.gpus)
    assert len(snap.pairs) == n * (n - 1) // 2
    assert snap.driver_version and snap.source == str(path)
    devs = list_gpus()
    assert [d.index for d in devs] == list(range(n))
    assert all(d.uuid.startswith("GPU-") and d.memory_total > 0 for d in devs)
    # bus order is monotonic
    assert [d.pci_bus_id for d in devs] == sorted(d.pci_bus_id for d in devs)
    best = select_gpu("most-free", required_bytes=1 * GIB)
    assert best is not None and best.memory_free == max(d.memory_free for d in devs)
    assert select_gpu(devs[-1].uuid) == devs[-1]
    assert select_gpu(str(n - 1)) == devs[-1]
    assert select_gpu("cpu") is None


def test_gpus_are_numbered_in_pci_bus_order_not_nvml_order(tmp_path, monkeypatch):
    doc = {"nvml": {"driver_version": "580", "gpus": [
        _gpu(0, U0, "00000000:81:00.0", 40), _gpu(1, U1, "00000000:0A:00.0", 10)]}}
    monkeypatch.setenv(ENV_FAKE, str(_write(tmp_path, doc)))
    devs = list_gpus()
    assert [d.uuid for d in devs] == [U1, U0]
    assert select_gpu("0").uuid == U1
    assert select_gpu("first", required_bytes=20 * GIB).uuid == U0  # first that fits
    assert select_gpu("most-free").uuid == U0


def test_select_errors_name_what_exists(tmp_path, monkeypatch):
    doc = {"nvml": {"driver_version": "580", "gpus": [
        _gpu(0, U0, "00000000:0A:00.0", 10), _gpu(1, U1, "00000000:81:00.0", 12, compute_mode=2)]}}
    monkeypatch.setenv(ENV_FAKE, str(_write(tmp_path, doc)))
    with pytest.raises(GpuError) as e:
        select_gpu("5")
    assert "does not exist" in e.value.message and U0 in e.value.remedy and e.value.exit_code == ExitCode.GPU
    with pytest.raises(GpuError) as e:
        select_gpu(U0, required_bytes=18 * GIB)
    assert "10.0 GiB free" in e.value.message and "18.0 GiB" in e.value.message
    with pytest.raises(GpuError) as e:
        select_gpu(U1)
    assert "prohibited" in e.value.message
    # most-free skips the prohibited GPU although it has more memory free
    assert select_gpu("most-free").uuid == U0
    with pytest.raises(GpuError) as e:
        select_gpu("most-free", required_bytes=16 * GIB)
    assert "no GPU has 16.0 GiB free" in e.value.message
    with pytest.raises(GpuError):
        select_gpu("GPU-ffffffff-1111-2222-3333-444444444444")


def test_without_a_driver_listing_gpus_fails_with_69_and_cpu_still_works(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_FAKE, str(_write(tmp_path, {"init_error": "NVML Shared Library Not Found"})))
    with pytest.raises(GpuError) as e:
        list_gpus()
    assert "no NVIDIA driver found" in e.value.message and e.value.exit_code == 69
    assert select_gpu("cpu") is None  # cpu never touches the driver


def test_real_nvml_without_driver_is_a_clear_error(monkeypatch):
    """On this (GPU-less) machine the real backend must say 'no NVIDIA driver found', not crash."""
    monkeypatch.delenv(ENV_FAKE, raising=False)
    try:
        snap = read_host(timeout=10)
    except GpuError as exc:
        assert "no NVIDIA driver found" in exc.message or "did not answer" in exc.message
    else:  # a real GPU host: the snapshot is well formed
        assert snap.driver_version


def test_wedged_driver_times_out(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_FAKE, str(_write(tmp_path, {"behaviour": {"nvml": "hang"}})))
    with pytest.raises(GpuError) as e:
        read_host(timeout=0.3)
    assert "did not answer within 0.3 s" in e.value.message


def test_unreadable_fake_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_FAKE, str(tmp_path / "missing.json"))
    with pytest.raises(GpuError) as e:
        read_host()
    assert ENV_FAKE in e.value.message


def test_real_backend_guards_and_int_caps_index(monkeypatch):
    """htrctl.nvml's *real* code path against a pynvml stand-in with upstream's quirks."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("pynvml", HOSTS.parent / "pynvml_stub" / "pynvml.py")
    stub = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stub)
    assert stub.NVML_P2P_CAPS_INDEX_READ == (0,)  # the trap
    monkeypatch.setitem(sys.modules, "pynvml", stub)
    monkeypatch.delenv(ENV_FAKE, raising=False)
    snap = read_host(timeout=5)
    assert [g.pci_bus_id for g in snap.gpus] == ["00000000:41:00.0", "00000000:81:00.0"]
    pair = snap.pairs[0]
    assert pair.p2p == {"read": 0, "write": 0, "nvlink": 5, "atomics": 5, "prop": 5} and not pair.errors
    assert pair.link == "PHB" and pair.nvlink is False
    g0 = snap.gpus[0]
    assert g0.mig_mode is None and "NotSupported" in g0.errors["mig_mode"]  # guarded, not raised
    assert g0.nvlinks_active == 0
    assert [g.minor_number for g in snap.gpus] == [0, 1]  # /dev/nvidiaN, checked by htrd before CUDA starts
    assert snap.nvml_version == "12.550"  # bytes decoded
    assert [p.pid for p in snap.gpus[1].processes] == [123]
