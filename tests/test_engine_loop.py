"""The engine's inference loop, in process, on the CPU demo model (fast generator, continuous batching)."""

from __future__ import annotations

import threading
import time

import pytest

torch = pytest.importorskip("torch")

from helpers import stroke_line, wait_until


def _engine(demo_model_dir, join_wait_ms: float, *, mixed: bool = False, batch_sizes=(1, 2, 4), **generation):
    """A started engine on the demo model: 40-token lines (min_new_tokens too), no batch window; *generation*:
    more generation settings."""
    from htrd.engine import Engine
    from htrd.faults import Faults
    from htrd.metrics import Metrics
    from htrd.state import DaemonState

    from htrctl.config import Settings

    settings = Settings(model={"dir": str(demo_model_dir), "verify_on_start": "off"}, gpu={"select": "cpu"},
                        limits={"batch_sizes": list(batch_sizes), "batch_window_ms": 0},
                        generation={"max_new_tokens": 40, "min_new_tokens": 40, "join_wait_ms": join_wait_ms,
                                    "mixed_steps": mixed, **generation})
    eng = Engine(settings, device="cpu", faults=Faults(), state=DaemonState(),
                 metrics=Metrics(list(settings.limits.batch_sizes)))
    eng.load()
    eng.warm_up()
    eng.start()
    return eng


@pytest.fixture(scope="module")
def engine(demo_model_dir):
    eng = _engine(demo_model_dir, 0)
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def patient_engine(demo_model_dir):
    """generation.join_wait_ms longer than a 40-token line takes here."""
    eng = _engine(demo_model_dir, 5000)
    yield eng
    eng.stop()


def _traced(gen, calls: list, after_step=lambda: None, *, what=len, before_add=lambda: None):
    """Record each add() as (*what(seqs)* -- how many lines by default --, inside a step), run *before_add()*
    before each add and *after_step()* after each step; returns the originals to restore."""
    inside = threading.local()
    add, step = gen.add, gen.step

    def traced_add(seqs):
        calls.append((what(seqs), getattr(inside, "on", False)))
        before_add()
        return add(seqs)

    def traced_step(*a, **kw):
        inside.on = True
        try:
            out = step(*a, **kw)
        finally:
            inside.on = False
        after_step()
        return out

    gen.add, gen.step = traced_add, traced_step
    return add, step


def _ids(seqs) -> list[str]:
    return [s.tag.request_id for s in seqs]


@pytest.mark.parametrize("on_their_way", [0, 1])
def test_a_newcomer_waits_to_share_its_prefill_only_with_requests_on_their_way(patient_engine, on_their_way):
    """While a line decodes, a newcomer joins at the next step when no other request is on its way -- however
    long generation.join_wait_ms is (waiting would only add latency; it waited that long before). With one
    more request accepted and still being preprocessed (counted in flight, not queued), it waits for it, and
    both are prefilled together, inside a step of the running line."""
    eng = patient_engine
    gen = eng.gen
    calls: list[tuple[int, bool]] = []
    deadline = time.monotonic() + 120
    long_prep, short_prep = eng.prepare(stroke_line(1200, 160, 1)), eng.prepare(stroke_line(600, 100, 2))
    items: list = []
    first_at: list[int] = []  # decode steps run when the newcomer was submitted
    waiting: list = []  # what had been added when the request on its way arrived

    def arrivals():  # on the inference thread, between two steps of the long line
        if not gen.running():
            return
        if not first_at:
            first_at.append(gen.steps_run)
            items.extend(eng.submit([short_prep], deadline=deadline, max_new_tokens=3, request_id="newcomer"))
        elif on_their_way and not waiting and gen.steps_run >= first_at[0] + 8:
            waiting.append(list(calls))  # 8 steps on, the newcomer still waits for the request on its way
            items.extend(eng.submit([short_prep], deadline=deadline, max_new_tokens=3, request_id="arrived"))

    add, step = _traced(gen, calls, after_step=arrivals)
    with eng.state._lock:  # the requests as the HTTP layer counts them: the long line, the newcomer, the others
        eng.state.in_flight += 2 + on_their_way
    try:
        long = eng.submit([long_prep], deadline=deadline, max_new_tokens=40, request_id="long")
        results = [long[0].future.result(timeout=120)]
        results += [it.future.result(timeout=120) for it in items]  # all submitted while the long line ran
    finally:
        gen.add, gen.step = add, step
        with eng.state._lock:
            eng.state.in_flight -= 2 + on_their_way
    assert waiting == ([[(1, False)]] if on_their_way else [])
    assert calls == [(1, False), (1 + on_their_way, True)]
    assert [r.tokens for r in results] == [40] + [3] * (1 + on_their_way)


def test_with_mixed_steps_a_newcomer_never_waits_for_requests_on_their_way(demo_model_dir):
    """generation.join_wait_ms is for prefills between the decode steps (several lines share one). Mixed steps
    chunk every prompt into the steps whoever joins with it: a newcomer joins inside the next step although
    a request is on its way and the wait is long; every line is answered in full."""
    eng = _engine(demo_model_dir, 5000, mixed=True)
    gen = eng.gen
    calls: list[tuple[int, bool]] = []
    deadline = time.monotonic() + 120
    short_prep = eng.prepare(stroke_line(600, 100, 2))
    short: list = []

    def newcomer():
        if not short and gen.running():
            short.extend(eng.submit([short_prep], deadline=deadline, max_new_tokens=3, request_id="short"))

    add, step = _traced(gen, calls, after_step=newcomer)
    with eng.state._lock:  # the long line, the newcomer, and one more on its way (never sent)
        eng.state.in_flight += 3
    try:
        assert gen.mixed
        long = eng.submit([eng.prepare(stroke_line(1200, 160, 1))], deadline=deadline, max_new_tokens=40,
                          request_id="long")
        first = long[0].future.result(timeout=120)
        second = short[0].future.result(timeout=120)
        assert gen.mixed_steps >= 2  # each prompt prefilled inside a step
    finally:
        gen.add, gen.step = add, step
        with eng.state._lock:
            eng.state.in_flight -= 3
        eng.stop()
    assert calls == [(1, False), (1, True)]
    assert (first.tokens, second.tokens) == (40, 3)


def test_with_mixed_steps_an_image_whose_staging_fails_gets_its_error_and_the_others_their_text(demo_model_dir,
                                                                                              monkeypatch):
    """A line's prefill staged apart from the steps (mixed steps) that fails -- CUDA out of memory for its image
    -- answers that request with out_of_memory; the request beside it and the line already decoding finish."""
    from htrd.api_errors import ApiError

    eng = _engine(demo_model_dir, 0, mixed=True)
    gen = eng.gen
    real = gen._stage_group

    def stage_group(group):
        if any(seq.tag.request_id == "bad" for *_, seq in group):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB (stand-in)")
        return real(group)

    monkeypatch.setattr(gen, "_stage_group", stage_group)
    deadline = time.monotonic() + 120
    try:
        long = eng.submit([eng.prepare(stroke_line(1200, 160, 1))], deadline=deadline, max_new_tokens=40,
                          request_id="long")
        assert wait_until(lambda: gen.mixed_steps > 0, timeout=60)
        prep = eng.prepare(stroke_line(600, 100, 2))
        bad = eng.submit([prep], deadline=deadline, max_new_tokens=3, request_id="bad")
        good = eng.submit([prep], deadline=deadline, max_new_tokens=3, request_id="good")
        with pytest.raises(ApiError) as err:
            bad[0].future.result(timeout=120)
        assert err.value.type == "out_of_memory" and err.value.detail == {"batch_size": 1}
        assert good[0].future.result(timeout=120).tokens == 3 and long[0].future.result(timeout=120).tokens == 40
    finally:
        eng.stop()
    assert gen.free_slots() == gen.slots


def test_a_newcomer_joins_behind_the_launched_decode_steps(engine):
    """While a line decodes, a newcomer's prefill is launched from inside the next step -- once its decode
    steps are launched, before the host waits for them (step's *during*) -- not before that step: with the
    GPU's steps queued, the host's launching of the prefill overlaps them. The newcomer arrives between two
    steps here (the moment the loop could admit it first). Both lines are answered in full."""
    gen = engine.gen
    calls: list[tuple[int, bool]] = []  # (lines added, inside a step)
    deadline = time.monotonic() + 120
    short_prep = engine.prepare(stroke_line(600, 100, 2))
    short: list = []

    def newcomer():
        if not short and gen.running():  # between two steps of the long line
            short.extend(engine.submit([short_prep], deadline=deadline, max_new_tokens=3, request_id="short"))

    add, step = _traced(gen, calls, after_step=newcomer)
    try:
        long = engine.submit([engine.prepare(stroke_line(1200, 160, 1))], deadline=deadline, max_new_tokens=40,
                             request_id="long")
        first = long[0].future.result(timeout=120)
        second = short[0].future.result(timeout=120)
    finally:
        gen.add, gen.step = add, step
    assert calls == [(1, False), (1, True)]
    assert (first.tokens, second.tokens) == (40, 3)  # min_new_tokens: no early EOS


def test_a_burst_joins_running_lines_one_prefill_chunk_per_step_boundary_in_order(demo_model_dir):
    """While a line decodes, a burst that could fill many free slots joins one generation.prefill_chunk of lines
    at a step boundary (each boundary's prefill stalls the running line, so the stall stays bounded; a boundary
    takes more only to replace lines that left at the one before, and here at most 2 leave at once), in FIFO
    order, over the next boundaries; every line is answered in full. Nothing running: the burst is taken at once
    (no one to stall)."""
    eng = _engine(demo_model_dir, 0, batch_sizes=(1, 2, 4, 8), prefill_chunk=2)
    gen = eng.gen
    joined: list[tuple[list[str], bool]] = []  # (request ids added, inside a step)
    deadline = time.monotonic() + 120
    short_prep = eng.prepare(stroke_line(600, 100, 2))
    burst: list = []

    def arrivals():
        if not burst and gen.running():  # between two steps of the long line: 5 lines at once
            for k in range(5):
                burst.extend(eng.submit([short_prep], deadline=deadline, max_new_tokens=3, request_id=f"b{k}"))

    add, step = _traced(gen, joined, after_step=arrivals, what=_ids)
    try:
        long = eng.submit([eng.prepare(stroke_line(1200, 160, 1))], deadline=deadline, max_new_tokens=40,
                          request_id="long")
        assert long[0].future.result(timeout=120).tokens == 40
        assert [it.future.result(timeout=120).tokens for it in burst] == [3] * 5
        assert wait_until(lambda: not gen.running(), 30, "the lines to leave")
        during = len(joined)
        # nothing running: a burst is one add (prefilled in chunks back to back), not one chunk per boundary
        idle = eng.submit([short_prep] * 5, deadline=deadline, max_new_tokens=3, request_id="idle")
        assert [it.future.result(timeout=120).tokens for it in idle] == [3] * 5
    finally:
        gen.add, gen.step = add, step
        eng.stop()
    assert joined[0] == (["long"], False)
    assert all(len(ids) <= 2 and on_step for ids, on_step in joined[1:during])
    assert [i for ids, _ in joined[1:during] for i in ids] == [f"b{k}" for k in range(5)]
    assert joined[during:] == [(["idle"] * 5, False)]


def test_the_lines_that_left_at_a_boundary_are_all_replaced_at_the_next(demo_model_dir):
    """Under a deep queue the slots fill: a step boundary takes one prefill chunk of newcomers (a burst into free
    slots) plus as many as the lines that left at the boundary before -- here 6 lines leave at once and the 4
    still queued join together, more than generation.prefill_chunk (2). With one chunk a boundary, 50-token
    lines filled at most ~200 of 256 slots on an H200 (engine._take)."""
    eng = _engine(demo_model_dir, 0, batch_sizes=(1, 2, 4, 8), prefill_chunk=2)
    gen = eng.gen
    prep = eng.prepare(stroke_line(600, 100, 2))
    deadline = time.monotonic() + 120
    joined: list[tuple[list[str], bool]] = []  # (request ids added, inside a step)
    queued: list = []

    def queue_more():
        if not queued:  # while the first wave is prefilled: 6 more wait in the queue
            for k in range(6):
                queued.extend(eng.submit([prep], deadline=deadline, max_new_tokens=3, request_id=f"q{k}"))

    add, step = _traced(gen, joined, what=_ids, before_add=queue_more)
    try:
        # 6 lines of 8 slots, taken at once (nothing runs): they leave together after the first call's steps
        first = eng.submit([prep] * 6, deadline=deadline, max_new_tokens=3, request_id="wave")
        assert [it.future.result(timeout=120).tokens for it in first] == [3] * 6
        assert [it.future.result(timeout=120).tokens for it in queued] == [3] * 6
        assert wait_until(lambda: not gen.running(), 30, "the lines to leave")
    finally:
        gen.add, gen.step = add, step
        eng.stop()
    assert joined[0] == (["wave"] * 6, False)
    # the first boundary: nobody left before it -> one chunk (2); the next: the 6 lines left -> up to 8, the
    # other 4 together
    assert joined[1:] == [(["q0", "q1"], True), (["q2", "q3", "q4", "q5"], True)]


def test_quiet_engine_precaptures_prefill_graphs_until_none_is_left(engine, monkeypatch, caplog):
    """Nothing queued or running for PRECAPTURE_QUIET_S: the inference thread calls the generator's
    precapture_next, back to back, until it says nothing is left -- then never again. A request arriving
    meanwhile is served (and makes it quiet again from its end); an error there is logged, ends the quiet work
    and leaves the engine serving."""
    import htrd.engine as en

    monkeypatch.setattr(en, "PRECAPTURE_QUIET_S", 0.3)
    gen = engine.gen
    calls: list[float] = []
    left = [3]

    def precapture_next():
        calls.append(time.monotonic())
        left[0] -= 1
        return left[0] > 0

    monkeypatch.setattr(gen, "precapture_next", precapture_next, raising=False)
    deadline = time.monotonic() + 120
    line = engine.prepare(stroke_line(600, 100, 3))
    engine._precapturing = True
    done = engine.submit([line], deadline=deadline, max_new_tokens=3, request_id="a")[0].future.result(timeout=120)
    end = time.monotonic()
    assert done.tokens == 3
    wait_until(lambda: not engine._precapturing, 30, "the quiet work to end")  # then it is never called again
    assert len(calls) == 3 and calls[0] >= end + 0.25  # quiet first; back to back until nothing was left

    def broken():
        raise RuntimeError("capture failed")

    monkeypatch.setattr(gen, "precapture_next", broken, raising=False)
    engine._precapturing = True
    wait_until(lambda: not engine._precapturing, 30, "the failed quiet work to end")
    assert "preparing prefill graphs while quiet failed" in caplog.text
    again = engine.submit([line], deadline=deadline, max_new_tokens=3, request_id="b")[0].future.result(timeout=120)
    assert again.tokens == 3


def test_compiling_the_ops_beside_the_load_is_never_fatal(demo_model_dir, tmp_path, monkeypatch, caplog):
    """htrd compiles the fast path's ops in a thread while the weights load (on a GPU; Engine._precompile):
    a directory whose config it cannot read starts no thread (the load reports the directory), and a
    compilation that fails is logged in the thread -- the warm-up compiles them instead."""
    import logging

    import htrd.fastgen as fg
    from htrd.engine import Engine
    from htrd.faults import Faults
    from htrd.metrics import Metrics
    from htrd.state import DaemonState

    from htrctl.config import Settings

    def engine(model_dir):
        settings = Settings(model={"dir": str(model_dir), "verify_on_start": "off"}, gpu={"select": "cpu"},
                            generation={"compile_cache_dir": str(tmp_path / "cc")})
        return Engine(settings, device="cpu", faults=Faults(), state=DaemonState(), metrics=Metrics([1]))

    assert engine(tmp_path / "missing")._precompile() == []
    seen = []

    def fails(text_config, *, device, dtype_name):
        seen.append((text_config["hidden_size"], device, dtype_name))
        raise RuntimeError("inductor: no C compiler")

    monkeypatch.setattr(fg, "precompile_ops", fails)
    with caplog.at_level(logging.WARNING, logger="htrd.engine"):
        (thread,) = engine(demo_model_dir)._precompile()
        thread.join(timeout=30)
    assert not thread.is_alive() and seen and seen[0][1:] == ("cpu", "float32")
    assert "compiling the fast path's ops beside the load failed (RuntimeError: inductor: no C compiler)" in caplog.text


def test_a_default_dtype_left_by_a_compilation_beside_the_load_is_reset(demo_model_dir, monkeypatch, caplog):
    """torch's default dtype is process-wide: transformers sets the model's dtype as the default while it builds
    the model, and torch.compile (htrd-precompile, beside the load on a GPU) restores at its end the default it
    saw at its start -- a compilation straddling transformers' window leaves bfloat16 behind (an H200 with cold
    compile caches: the Triton decode kernel's start-up check failed on it, htrd exited 1). The load ends with
    float32 again, and says so."""
    import logging

    import htrd.model
    import torch

    real = htrd.model.load_model

    def load_leaving_bf16(*args, **kwargs):
        loaded = real(*args, **kwargs)
        torch.set_default_dtype(torch.bfloat16)  # what the straddling compilation restores
        return loaded

    monkeypatch.setattr(htrd.model, "load_model", load_leaving_bf16)
    try:
        with caplog.at_level(logging.WARNING, logger="htrd.engine"):
            eng = _engine(demo_model_dir, 0)
        assert torch.get_default_dtype() == torch.float32
        assert "torch's default dtype was bfloat16 after the load" in caplog.text
        (item,) = eng.submit([eng.prepare(stroke_line(600, 100, 3))], deadline=time.monotonic() + 60, max_new_tokens=4,
                             request_id="t")
        assert item.future.result(timeout=60)
        eng.stop()
    finally:
        torch.set_default_dtype(torch.float32)
