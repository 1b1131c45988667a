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
    assert metrics.registry.get_sample_value("htrd_gc_frozen_objects") == frozen
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

    def sample(name, gen):
        return metrics.registry.get_sample_value(name, {"generation": gen})

    for gen in ("0", "2"):
        assert sample("htrd_gc_pause_seconds_count", gen) >= 1
        assert sample("htrd_gc_pause_seconds_sum", gen) > 0
        assert metrics.registry.get_sample_value("htrd_gc_pause_seconds_bucket",
                                                 {"generation": gen, "le": "+Inf"}) == sample(
            "htrd_gc_pause_seconds_count", gen)
    assert "htrd_gc_pause_seconds_bucket" in metrics.exposition()[0].decode()


def test_the_callback_takes_no_lock_a_scrape_may_hold():
    """A collection can start in a thread that holds a metric's lock (a scrape, an observe): the callback must
    not wait for any of them (prometheus_client's locks are not re-entrant)."""
    metrics = Metrics([1])
    watch = heap.PauseWatch(metrics).install()
    try:
        with metrics.registry._lock, metrics.errors._lock:
            gc.collect()  # would deadlock if the callback used the registry or a metric
    finally:
        watch.remove()
    assert metrics.registry.get_sample_value("htrd_gc_pause_seconds_count", {"generation": "2"}) >= 1


def test_a_long_pause_is_logged_once_a_minute_once_serving(monkeypatch, caplog):
    watch = heap.PauseWatch(Metrics([1]))
    clock = iter([1.0, 1.5, 10.0, 10.25, 20.0, 20.3, 100.0, 100.2])  # 500 ms while loading, then 250, 300, 200
    monkeypatch.setattr(heap, "clock", lambda: next(clock))
    with caplog.at_level(logging.WARNING, logger="htrd.heap"):
        for i in range(4):
            if i == 1:
                watch.serving()
            watch._callback("start", {"generation": 2})
            watch._callback("stop", {"generation": 2, "collected": 0, "uncollectable": 0})
    assert watch.slow == 4
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2  # loading: counted only; the 300 ms one came 10 s after a warning: not logged
    assert "paused htrd for 250 ms" in warnings[0] and "GPU waited" in warnings[0]
    assert "paused htrd for 200 ms" in warnings[1]
