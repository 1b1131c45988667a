"""Which prompt tokens each mixed step prefills: the host-side plan of chunked prefill.

A mixed step (:meth:`htrd.fastgen.FastGenerator._mixed_step`) is one forward over the running lines' decode
rows and a fixed budget of prompt tokens taken from the lines waiting to be prefilled, in FIFO order: a line's
prompt may span several steps (each chunk attends to the line's earlier positions in the KV cache), several
short prompts share one step. A line's input embeddings (its text tokens' embeddings, the vision tower's image
tokens and deepstack features) are computed when it joins and wait in a ring of staging rows on the GPU; a
chunk reads its rows from there.

This module is the bookkeeping only -- no torch: the FIFO of joining lines, their rows in the ring, and the
chunks of the next steps.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Chunk:
    """Prompt positions ``[start, end)`` of the line in *slot*, read from ring rows ``[src, src + end - start)``.
    *last*: the prompt ends here -- this step's forward chooses the line's first token."""

    slot: int
    start: int
    end: int
    src: int
    last: bool
    item: Any = None  # the line's own payload (what the caller joined it with)

    @property
    def tokens(self) -> int:
        return self.end - self.start


@dataclass
class StepPlan:
    """One mixed step's chunks, in FIFO order (their tokens back to back), and how many tokens they take."""

    chunks: list[Chunk] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(c.tokens for c in self.chunks)

    def finishing(self) -> list[Chunk]:
        return [c for c in self.chunks if c.last]


@dataclass
class _Line:
    slot: int
    length: int  # prompt tokens
    item: Any
    src: int | None = None  # first ring row, once staged
    done: int = 0  # prompt tokens planned so far


class PrefillQueue:
    """The lines that joined and are not yet wholly prefilled, in FIFO order, and their staging rows.

    *ring* rows of staging (each line's prompt takes consecutive rows; a line longer than the ring is refused
    by :meth:`push`); each step takes at most *budget* tokens and *max_lines* lines' chunks.
    """

    def __init__(self, ring: int, budget: int, max_lines: int) -> None:
        if ring < 1 or budget < 1 or max_lines < 1:
            raise ValueError("ring, budget and max_lines must be positive")
        self.ring, self.budget, self.max_lines = int(ring), int(budget), int(max_lines)
        self._lines: deque[_Line] = deque()
        self._head = 0  # the next row a staged line may start at

    # ------------------------------------------------------------------ lines
    def push(self, slot: int, length: int, item: Any = None) -> None:
        """A line of *length* prompt tokens joins (not staged yet: :meth:`stage`)."""
        if not 0 < length <= self.ring:
            raise ValueError(f"a prompt of {length} tokens does not fit the staging ring of {self.ring} rows")
        self._lines.append(_Line(slot, int(length), item))

    def drop(self, slot: int) -> bool:
        """Take the line in *slot* out (a cancelled request); its rows free once the lines before it leave."""
        for i, line in enumerate(self._lines):
            if line.slot == slot:
                del self._lines[i]
                return True
        return False

    def __len__(self) -> int:
        return len(self._lines)

    def slots(self) -> list[int]:
        return [line.slot for line in self._lines]

    def pending_tokens(self) -> int:
        """Prompt tokens of staged lines not yet planned."""
        return sum(line.length - line.done for line in self._lines if line.src is not None)

    def unstaged(self) -> list[tuple[int, int, Any]]:
        """(slot, length, item) of the lines still waiting for staging rows, in order."""
        return [(line.slot, line.length, line.item) for line in self._lines if line.src is None]

    # ------------------------------------------------------------------ staging
    def stage(self) -> list[tuple[int, int, int, Any]]:
        """Give ring rows to the waiting lines, in order, while they fit; returns (slot, first row, length,
        item) of each line staged now. Rows are reused once every line before them has been wholly planned
        (a step's chunks are read by GPU work queued before any later staging's writes)."""
        out = []
        for line in self._lines:
            if line.src is not None:
                continue
            start = self._room(line.length)
            if start is None:
                break
            line.src = start
            self._head = start + line.length
            out.append((line.slot, start, line.length, line.item))
        return out

    def _room(self, n: int) -> int | None:
        """Where *n* consecutive rows start, or None: the live rows are those of staged lines not wholly
        planned, from the oldest one's first row to ``_head`` (wrapping)."""
        live = [line for line in self._lines if line.src is not None and line.done < line.length]
        if not live:
            self._head = 0
            return 0 if n <= self.ring else None
        tail = live[0].src
        if self._head > tail:
            if self._head + n <= self.ring:
                return self._head
            return 0 if n <= tail else None
        # the head has wrapped behind the tail (or sits on it: every row between is live)
        return self._head if self._head + n <= tail else None

    # ------------------------------------------------------------------ planning
    def plan(self, steps: int) -> list[StepPlan]:
        """The chunks of the next *steps* steps (staged lines only), without taking them: :meth:`commit`
        takes the first ones. Steps after the last token planned are empty."""
        done = {id(line): line.done for line in self._lines}
        plans = []
        for _ in range(steps):
            plan, room = StepPlan(), self.budget
            for line in self._lines:
                if line.src is None or len(plan.chunks) >= self.max_lines or room <= 0:
                    break
                d = done[id(line)]
                if d >= line.length:
                    continue
                n = min(room, line.length - d)
                plan.chunks.append(Chunk(line.slot, d, d + n, line.src + d, d + n == line.length, line.item))
                done[id(line)] = d + n
                room -= n
            plans.append(plan)
        return plans

    def commit(self, plans: list[StepPlan]) -> None:
        """*plans* (the first ones :meth:`plan` returned) are launched: their tokens are taken, and the lines
        wholly prefilled leave."""
        by_slot = {line.slot: line for line in self._lines}
        for plan in plans:
            for c in plan.chunks:
                by_slot[c.slot].done = c.end
        # Planning is FIFO, so the lines done are the first ones: their rows free from the ring's tail.
        while self._lines and self._lines[0].done >= self._lines[0].length:
            self._lines.popleft()
