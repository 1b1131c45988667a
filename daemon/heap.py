"""Python's garbage collector in a serving process: the loaded heap frozen, every pause measured.

A loaded htrd holds 0.64-0.75 million Python objects before it serves a line (torch, transformers, the
model's modules, inductor's and Triton's state; 0.44 million with the CPU demo model). CPython's full
collection walks all of them, holding the GIL: ~0.4 s on this project's CI machine, 0.58 s in one pause under
256 clients on an H200, and a trace there showed the inference thread stalled 0.34-0.50 s inside a prefill,
no torch op running, the GPU idle. Under load the requests' objects trigger one every ten seconds or so (3 over
100 ms in a 30 s load of 256 clients).

:func:`freeze_loaded_heap` runs once the model is loaded and warmed up, before READY: one collection, then
``gc.freeze()`` moves every surviving object to the permanent generation, which no later collection walks
(what vLLM and SGLang do after capturing their graphs). Objects made afterwards are collected as usual. The
preprocessing workers (``htrd.prepool``) freeze theirs too, once their processor is loaded and warm.
:class:`PauseWatch` times every collection (``gc.callbacks``): the ``htrd_gc_pause_seconds`` histogram, and,
once serving, a warning when one paused the daemon for long (the GPU waited).

``HTRD_GC_FREEZE=0`` in htrd's environment leaves the heap unfrozen: a diagnostic, for measuring what the
freeze gains (``bench/bench_serving.py --engines continuous,gcscan``).
"""

from __future__ import annotations

import bisect
import gc
import logging
import os
import time

logger = logging.getLogger(__name__)

SLOW_PAUSE_S = 0.1  # a collection this long is logged: the inference thread (and the GPU) waited for it
WARN_EVERY_S = 60.0  # at most one such warning a minute
clock = time.perf_counter  # the pauses' clock
PAUSE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)  # htrd_gc_pause_seconds (upper bounds)
GENERATIONS = (0, 1, 2)


def freeze_loaded_heap(metrics=None, *, level: int = logging.INFO) -> int:
    """Collect once, then freeze every surviving object (see the module docstring); returns how many objects
    were frozen (0 where ``HTRD_GC_FREEZE=0``). Logged at *level* (the preprocessing workers: DEBUG)."""
    if os.environ.get("HTRD_GC_FREEZE", "1").strip() == "0":
        logger.log(level, "the loaded heap is not frozen (HTRD_GC_FREEZE=0): full collections walk all of it")
        return 0
    t0 = time.perf_counter()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    logger.log(level, "froze the loaded heap: %d objects that no collection walks again (%.0f ms)", frozen,
                (time.perf_counter() - t0) * 1000.0)
    if metrics is not None:
        metrics.gc_frozen_objects.set(frozen)
    return frozen


class PauseWatch:
    """Times every garbage collection (``gc.callbacks``) and serves the pauses as the ``htrd_gc_pause_seconds``
    histogram, by generation: a Prometheus collector of its own on *metrics*' registry, read at each scrape.

    The callback runs inside a collection, in whichever thread triggered it -- possibly one holding a lock of
    prometheus_client's (a scrape, an ``observe``): it touches only this object's plain counters, never a
    metric's lock. A collection of SLOW_PAUSE_S or more, once serving (:meth:`serving`), is logged -- at most
    once a minute; the load's own collections (before the freeze) are counted only."""

    def __init__(self, metrics=None) -> None:
        self.metrics = metrics
        self._started: float | None = None
        self._warned_at = -WARN_EVERY_S
        self._serving = False
        # per generation: the pauses in each bucket (not cumulative; the last: over the largest), their sum
        self._buckets = {g: [0] * (len(PAUSE_BUCKETS) + 1) for g in GENERATIONS}
        self._sum = dict.fromkeys(GENERATIONS, 0.0)
        self.slow = 0  # collections of SLOW_PAUSE_S or more

    def install(self) -> PauseWatch:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)
        if self.metrics is not None:
            self.metrics.registry.register(self)
        return self

    def remove(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def serving(self) -> None:
        """From now on a slow collection is worth a warning (the GPU waits for it)."""
        self._serving = True

    def _callback(self, phase: str, info: dict) -> None:
        # Cheap, lock-free, never raises (see the class docstring).
        now = clock()
        if phase == "start":
            self._started = now
            return
        if self._started is None:
            return
        pause, self._started = now - self._started, None
        gen = info.get("generation", 2) if info.get("generation") in GENERATIONS else 2
        self._buckets[gen][bisect.bisect_left(PAUSE_BUCKETS, pause)] += 1
        self._sum[gen] += pause
        if pause >= SLOW_PAUSE_S:
            self.slow += 1
            if self._serving and now - self._warned_at >= WARN_EVERY_S:
                self._warned_at = now
                logger.warning("Python's garbage collector paused htrd for %.0f ms (generation %d; %d objects "
                               "frozen); the inference thread and the GPU waited meanwhile", pause * 1000.0, gen,
                               gc.get_freeze_count())

    def collect(self):
        """The Prometheus collector's side: the pauses so far as one histogram family."""
        from prometheus_client.core import HistogramMetricFamily

        family = HistogramMetricFamily("htrd_gc_pause_seconds", "pauses of Python's garbage collector (the GIL "
                                       "held: no other thread of htrd runs meanwhile)", labels=["generation"])
        for gen in GENERATIONS:
            counts, total, cum = list(self._buckets[gen]), self._sum[gen], 0
            buckets = []
            for le, n in zip([*map(str, PAUSE_BUCKETS), "+Inf"], counts):
                cum += n
                buckets.append((le, cum))
            family.add_metric([str(gen)], buckets, sum_value=total)
        yield family
