"""htrd.heap: the loaded heap frozen before READY, every garbage-collection pause measured."""

from __future__ import annotations

import gc
import logging

import pytest
from htrd import heap
from htrd.metrics import Metrics


@pytest.fixture
def unfrozen():
    gc.unfreeze()
    yield
    gc.unfreeze()  # the rest of the test session collects as usual


class Cycle:
    def __init__(self) -> None:
        self.me = self


def test_freeze_takes_the_loaded_objects_out_of_every_collection(unfrozen, monkeypatch):
    monkeypatch.delenv("HTRD_GC_FREEZE", raising=False)
    metrics = Metrics([1, 2])
    loaded = [Cycle() for _ in range(1000)]
    frozen = heap.freeze_loaded_heap(metrics)
    assert frozen == gc.get_freeze_count() >= 1000
    assert metrics.gc_frozen_objects._value.get() == frozen
    tracked = {id(o) for o in gc.get_objects()}  # what a collection walks
    assert not any(id(o) in tracked for o in loaded)
    later = Cycle()  # objects made after the freeze are collected as usual
    assert id(later) in {id(o) for o in gc.get_objects()}


def test_freeze_can_be_turned_off_for_measuring_it(unfrozen, monkeypatch, caplog):
    monkeypatch.setenv("HTRD_GC_FREEZE", "0")
    with caplog.at_level(logging.INFO, logger="htrd.heap"):
        assert heap.freeze_loaded_heap() == 0
    assert gc.get_freeze_count() == 0
    assert "not frozen" in caplog.text


def test_every_collection_is_timed_into_the_histogram():
    metrics = Metrics([1, 2])
    watch = heap.PauseWatch(metrics).install()
    try:
        gc.collect()
        gc.collect(0)
    finally:
        watch.remove()
    assert watch._callback not in gc.callbacks
    full = metrics.gc_pause_seconds.labels(generation="2")
    young = metrics.gc_pause_seconds.labels(generation="0")
    assert full._sum.get() > 0 and young._sum.get() > 0
    counts = {s.labels["generation"]: s.value for m in metrics.registry.collect() if m.name == "htrd_gc_pause_seconds"
              for s in m.samples if s.name.endswith("_count")}
    assert counts["2"] >= 1 and counts["0"] >= 1


def test_a_long_pause_is_logged_once_a_minute(monkeypatch, caplog):
    watch = heap.PauseWatch(Metrics([1]))
    clock = iter([10.0, 10.25, 20.0, 20.3, 100.0, 100.2])  # three collections: 250, 300 and 200 ms
    monkeypatch.setattr(heap, "clock", lambda: next(clock))
    with caplog.at_level(logging.WARNING, logger="htrd.heap"):
        for _ in range(3):
            watch._callback("start", {"generation": 2})
            watch._callback("stop", {"generation": 2, "collected": 0, "uncollectable": 0})
    assert watch.slow == 3
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2  # the second came 10 s after the first: not logged
    assert "paused htrd for 250 ms" in warnings[0] and "GPU waited" in warnings[0]
    assert "paused htrd for 200 ms" in warnings[1]
