"""The engine's inference loop, in process, on the CPU demo model (fast generator, continuous batching)."""

from __future__ import annotations

import threading
import time

import pytest

torch = pytest.importorskip("torch")

from helpers import stroke_line


@pytest.fixture(scope="module")
def engine(demo_model_dir):
    from htrd.engine import Engine
    from htrd.faults import Faults
    from htrd.metrics import Metrics
    from htrd.state import DaemonState

    from htrctl.config import Settings

    settings = Settings(model={"dir": str(demo_model_dir), "verify_on_start": "off"}, gpu={"select": "cpu"},
                        limits={"batch_sizes": [1, 2, 4], "batch_window_ms": 0},
                        generation={"max_new_tokens": 40, "min_new_tokens": 40, "join_wait_ms": 0})
    eng = Engine(settings, device="cpu", faults=Faults(), state=DaemonState(),
                 metrics=Metrics(list(settings.limits.batch_sizes)))
    eng.load()
    eng.warm_up()
    eng.start()
    yield eng
    eng.stop()


def test_a_newcomer_joins_behind_the_launched_decode_steps(engine):
    """While a line decodes, a newcomer's prefill is launched from inside the next step -- once its decode
    steps are launched, before the host waits for them (step's *during*) -- not before that step: with the
    GPU's steps queued, the host's launching of the prefill overlaps them. The newcomer arrives between two
    steps here (the moment the loop could admit it first). Both lines are answered in full."""
    gen = engine.gen
    inside = threading.local()
    calls: list[tuple[int, bool]] = []  # (lines added, inside a step)
    add, step = gen.add, gen.step
    deadline = time.monotonic() + 120
    short_prep = engine.prepare(stroke_line(600, 100, 2))
    short: list = []

    def traced_add(seqs):
        calls.append((len(seqs), getattr(inside, "on", False)))
        return add(seqs)

    def traced_step(*a, **kw):
        inside.on = True
        try:
            out = step(*a, **kw)
        finally:
            inside.on = False
        if not short and gen.running():  # between two steps of the long line
            short.extend(engine.submit([short_prep], deadline=deadline, max_new_tokens=3, request_id="short"))
        return out

    gen.add, gen.step = traced_add, traced_step
    try:
        long = engine.submit([engine.prepare(stroke_line(1200, 160, 1))], deadline=deadline, max_new_tokens=40,
                             request_id="long")
        first = long[0].future.result(timeout=120)
        second = short[0].future.result(timeout=120)
    finally:
        gen.add, gen.step = add, step
    assert calls == [(1, False), (1, True)]
    assert (first.tokens, second.tokens) == (40, 3)  # min_new_tokens: no early EOS
