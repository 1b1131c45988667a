"""htrd.budget: the pixel limits derived from the host's memory, and the daemon-wide budget."""

from __future__ import annotations

import threading

import pytest
from htrd.budget import BYTES_PER_PIXEL, HOST_MEMORY_FRACTION, PixelBudget, host_memory_bytes, resolve_limits

from htrctl.config import LimitSettings

GIB = 1 << 30


def test_defaults_follow_the_hosts_memory():
    big = resolve_limits(LimitSettings(), memory_bytes=128 * GIB)
    assert big.in_flight_pixels == int(128 * GIB * HOST_MEMORY_FRACTION / BYTES_PER_PIXEL)  # 537 Mpx
    assert big.request_pixels == big.in_flight_pixels // 4
    assert big.image_pixels == 40_000_000  # limits.max_image_pixels
    assert "128.0 GiB" in big.source and "Mpx in flight" in big.describe()
    small = resolve_limits(LimitSettings(), memory_bytes=4 * GIB)
    # 16.8 Mpx in flight: one request may take it all, and no image may be larger than what a request may hold
    assert small.request_pixels == small.in_flight_pixels < 40_000_000
    assert small.image_pixels == small.request_pixels


def test_configured_limits_are_kept_and_the_request_capped_by_the_daemon():
    lim = resolve_limits(LimitSettings(max_request_pixels=5_000_000, max_pixels_in_flight=20_000_000,
                                       max_image_pixels=4_000_000), memory_bytes=1 * GIB)
    assert (lim.image_pixels, lim.request_pixels, lim.in_flight_pixels) == (4_000_000, 5_000_000, 20_000_000)
    capped = resolve_limits(LimitSettings(max_request_pixels=50_000_000, max_pixels_in_flight=20_000_000))
    assert capped.request_pixels == 20_000_000 and capped.image_pixels == 20_000_000


def _fake_host(tmp_path, mem_kib: int, cgroup_line: str, limits: dict[str, str]):
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(f"MemTotal:       {mem_kib} kB\nMemFree:        1 kB\n")
    (proc / "self" / "cgroup").write_text(cgroup_line + "\n")
    root = tmp_path / "cgroup"
    for rel, value in limits.items():
        (root / rel).mkdir(parents=True, exist_ok=True)
        (root / rel / ("memory.max" if "memory/" not in rel else "memory.limit_in_bytes")).write_text(value + "\n")
    return proc, root


def test_host_memory_is_the_smallest_of_ram_and_the_cgroup_limits(tmp_path):
    proc, root = _fake_host(tmp_path / "a", 64 * 1024 * 1024, "0::/system.slice/htr.service",
                            {"system.slice/htr.service": "max", "system.slice": str(8 * GIB), "": "max"})
    assert host_memory_bytes(proc, root) == 8 * GIB  # the parent slice's MemoryMax= applies too
    proc, root = _fake_host(tmp_path / "b", 16 * 1024 * 1024, "0::/user.slice", {"user.slice": "max"})
    assert host_memory_bytes(proc, root) == 16 * GIB
    proc, root = _fake_host(tmp_path / "c", 16 * 1024 * 1024, "4:memory:/docker/abc",
                            {"memory/docker/abc": str(2 * GIB)})
    assert host_memory_bytes(proc, root) == 2 * GIB  # cgroup v1
    assert host_memory_bytes(tmp_path / "nothing", tmp_path / "nothing") is None
    assert host_memory_bytes() > 0  # this machine


def test_budget_admits_until_full_and_never_goes_negative():
    seen = []
    b = PixelBudget(100, on_change=seen.append)
    assert b.try_acquire(60) and not b.try_acquire(41) and b.try_acquire(40)
    assert b.in_use == 100 and not b.try_acquire(1)
    b.release(60)
    assert b.in_use == 40 and b.try_acquire(60)
    assert seen == [60, 100, 40, 100]
    with pytest.raises(RuntimeError):
        b.release(101)
    with pytest.raises(ValueError):
        PixelBudget(0)


def test_budget_under_contention_holds_its_capacity():
    b = PixelBudget(1000)
    peak = []
    lock = threading.Lock()

    def worker():
        for _ in range(2000):
            if b.try_acquire(300):
                with lock:
                    peak.append(b.in_use)
                b.release(300)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert b.in_use == 0 and peak and max(peak) <= 1000
