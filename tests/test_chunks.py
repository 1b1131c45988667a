"""The host-side plan of mixed steps (htrd.chunks): which prompt tokens each step takes, and the staging ring."""

from __future__ import annotations

import pytest
from htrd.chunks import PrefillQueue


def _chunks(plan):
    return [(c.slot, c.start, c.end, c.src, c.last) for c in plan.chunks]


def test_steps_take_the_budget_in_fifo_order_and_prompts_span_steps():
    q = PrefillQueue(ring=100, budget=10, max_lines=4)
    for slot, n in ((5, 25), (2, 3), (7, 4)):
        q.push(slot, n, item=f"line{slot}")
    assert [s for s, *_ in q.stage()] == [5, 2, 7] and q.pending_tokens() == 32
    plans = q.plan(5)
    assert [_chunks(p) for p in plans] == [
        [(5, 0, 10, 0, False)],
        [(5, 10, 20, 10, False)],
        [(5, 20, 25, 20, True), (2, 0, 3, 25, True), (7, 0, 2, 28, False)],  # three lines share a step
        [(7, 2, 4, 30, True)],
        [],
    ]
    assert [p.tokens for p in plans] == [10, 10, 10, 2, 0] and plans[2].chunks[1].item == "line2"
    assert q.plan(2) == plans[:2]  # planning takes nothing
    q.commit(plans[:3])
    assert q.slots() == [7] and q.pending_tokens() == 2  # the lines wholly planned left
    assert _chunks(q.plan(1)[0]) == [(7, 2, 4, 30, True)]


def test_a_step_takes_at_most_max_lines_lines():
    q = PrefillQueue(ring=100, budget=50, max_lines=2)
    for slot in range(4):
        q.push(slot, 5)
    q.stage()
    plans = q.plan(3)
    assert [[c.slot for c in p.chunks] for p in plans] == [[0, 1], [2, 3], []]


def test_lines_wait_for_ring_rows_and_reuse_those_of_lines_wholly_planned():
    q = PrefillQueue(ring=20, budget=8, max_lines=4)
    for slot in range(3):
        q.push(slot, 8)
    assert [(s, start) for s, start, *_ in q.stage()] == [(0, 0), (1, 8)]  # the third does not fit yet
    assert q.unstaged() == [(2, 8, None)] and q.pending_tokens() == 16
    assert [c.slot for p in q.plan(3) for c in p.chunks] == [0, 1]  # staged lines only
    q.commit(q.plan(1))  # line 0 wholly planned: its rows are free, the ring wraps to them
    assert [(s, start) for s, start, *_ in q.stage()] == [(2, 0)]
    q.push(3, 4)
    assert q.stage() == []  # rows 16-20 are free but the head has wrapped behind line 1 (rows 8-16)
    q.commit(q.plan(2))
    assert q.slots() == [3] and [(s, start) for s, start, *_ in q.stage()] == [(3, 0)]  # nothing live: from 0


def test_a_dropped_line_leaves_the_queue_and_a_prompt_longer_than_the_ring_is_refused():
    q = PrefillQueue(ring=16, budget=8, max_lines=4)
    q.push(0, 6)
    q.push(1, 6)
    q.stage()
    assert q.drop(0) and not q.drop(0) and q.slots() == [1]
    assert _chunks(q.plan(1)[0]) == [(1, 0, 6, 6, True)]
    with pytest.raises(ValueError, match="does not fit the staging ring of 16 rows"):
        q.push(2, 17)
    with pytest.raises(ValueError):
        PrefillQueue(ring=0, budget=8, max_lines=1)


def test_random_joins_plans_and_drops_keep_every_invariant():
    """Many random sequences of joins, staging, plans (committed in part) and drops: the rows of the lines
    staged and not yet wholly planned never overlap and stay inside the ring; every step keeps to the budget
    and the lines' limit; each line's chunks are consecutive, in FIFO order, from its first row; and a line
    not dropped is planned whole, exactly once."""
    import random

    rng = random.Random(7)
    for _ in range(400):
        ring, budget, max_lines = rng.randint(16, 400), rng.randint(1, 96), rng.randint(1, 6)
        q = PrefillQueue(ring=ring, budget=budget, max_lines=max_lines)
        planned: dict[int, int] = {}  # line id -> tokens planned so far
        lengths: dict[int, int] = {}
        rows: dict[int, int] = {}
        dropped: set[int] = set()
        slot_of: dict[int, int] = {}
        next_id = 0
        for _ in range(rng.randint(1, 80)):
            action = rng.random()
            if action < 0.35:
                n = rng.randint(1, ring // 3 + 1) if rng.random() < 0.8 else rng.randint(1, ring)
                slot = next_id  # slots stand in for line ids (never reused here)
                q.push(slot, n, item=next_id)
                lengths[next_id], planned[next_id], slot_of[next_id] = n, 0, slot
                next_id += 1
            elif action < 0.55:
                for slot, start, n, item in q.stage():
                    assert 0 <= start and start + n <= ring and n == lengths[item]
                    rows[item] = start
            elif action < 0.9:
                plans = q.plan(rng.randint(1, 4))
                take = plans[: rng.randint(0, len(plans))]
                order = []
                for plan in take:
                    assert plan.tokens <= budget and len(plan.chunks) <= max_lines
                    for c in plan.chunks:
                        assert c.start == planned[c.item] and c.src == rows[c.item] + c.start
                        assert c.last == (c.end == lengths[c.item])
                        planned[c.item] = c.end
                        order.append(c.item)
                assert order == sorted(order)  # FIFO: an earlier line is never planned after a later one
                q.commit(take)
            elif q.slots():
                slot = rng.choice(q.slots())
                assert q.drop(slot)
                dropped.add(slot)
            live = [(rows[i], rows[i] + lengths[i]) for i in lengths
                    if i in rows and i not in dropped and planned[i] < lengths[i]]
            live.sort()
            assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(live, live[1:]))
        # drain: everything still queued gets staged and planned whole
        while len(q):
            for slot, start, n, item in q.stage():
                rows[item] = start
            plans = q.plan(1)
            assert plans[0].chunks or not q.pending_tokens()
            for c in plans[0].chunks:
                assert c.start == planned[c.item]
                planned[c.item] = c.end
            q.commit(plans)
        assert all(planned[i] == lengths[i] for i in lengths if i not in dropped)
