"""The one generator contract the engine schedules over, and what flows through it.

A generator owns the model on its device and a number of **slots** (lines
that can decode at once). The engine's inference thread is its only caller:

- :meth:`Generator.add` -- prefill *seqs* into free slots (at most
  :meth:`free_slots`); they join the running decode batch.
- :meth:`Generator.step` -- advance every running line by a few tokens; returns
  the lines that finished (EOS or their own ``max_new_tokens``) and frees their
  slots at once. *stop(seq)* is asked for each running line: True takes it out
  now (its deadline passed), returned with ``stopped=True``. *during()*, if
  given, is called once while the steps run on the device, before the host
  waits for them: the engine adds newcomers there, so launching their prefill
  overlaps the decoding (a generator that cannot overlap calls it first).
- :meth:`Generator.warmup` -- every shape it will serve, before READY.

Two implementations: :class:`htrd.fastgen.FastGenerator` (the default: static
KV cache with slots, continuous batching, CUDA-graph decoding on a GPU) and
:class:`htrd.plaingen.PlainGenerator` (HF ``generate`` on static batches: the
reference, and ``generation.static_cache: false``). :func:`generate` runs a
list of prepared images to completion through either (tests, bench, warm-up).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .model import Prepared


@dataclass(eq=False)
class Seq:
    """One line to decode: its preprocessed prompt and its own token limits. *tag* is the caller's."""

    prepared: Prepared
    max_new_tokens: int
    min_new_tokens: int = 0
    tag: Any = None


@dataclass(eq=False)
class Finished:
    """A line that left the generator: its tokens (through the first EOS, if any)."""

    seq: Seq
    token_ids: list[int]
    stopped: bool = False  # taken out by stop() before it was done
    group: int = 1  # lines prefilled together with it (its "batch" at join time)
    prefill_ms: float = 0.0
    decode_ms: float = 0.0  # from the end of its prefill to its last token
    joined_at: float = field(default_factory=time.monotonic)
    error: BaseException | None = None  # its prefill failed (no tokens); the other lines go on


@dataclass
class Generated:
    """Greedy output for one image (the result of :func:`generate`)."""

    token_ids: list[int]
    text: str
    prompt_tokens: int
    batch_size: int
    generate_ms: float = 0.0
    stopped: bool = False
    stats: dict = field(default_factory=dict)


class Generator(Protocol):
    slots: int
    batch_sizes: list[int]

    def prepare(self, image) -> Prepared: ...

    def complete(self, enc) -> Prepared: ...

    def free_slots(self) -> int: ...

    def running(self) -> list[Seq]: ...

    def add(self, seqs: Sequence[Seq]) -> list[Finished]: ...

    def step(self, stop: Callable[[Seq], bool] | None = None,
             during: Callable[[], None] | None = None) -> list[Finished]: ...

    def warmup(self, image, *, max_new_tokens: int | None = None,
               progress: Callable[[str], None] = lambda s: None) -> dict: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class GeneratorBase:
    """What both generators share: preprocessing and text through their :class:`~htrd.model.Preprocessor`,
    one prefill batch from prepared images, and :func:`generate` as a method (tests, benchmarks)."""

    pre: Any  # htrd.model.Preprocessor
    device: Any
    pad_id: int
    max_new_tokens: int

    def prepare(self, image) -> Prepared:
        return self.pre.prepare(image)

    def complete(self, enc) -> Prepared:
        """An image encoded in a preprocessing worker process (:mod:`htrd.prepool`) made ready to prefill."""
        return self.pre.complete(enc)

    def decode(self, ids: Sequence[int]) -> str:
        return self.pre.decode(ids)

    def _collate(self, items: Sequence[Prepared], width: int | None = None) -> dict:
        from .model import collate

        return collate(items, pad_id=self.pad_id, device=self.device, dtype=self.pre.dtype, width=width)

    def generate(self, items: Sequence[Prepared], *, max_new_tokens: int | None = None, min_new_tokens: int = 0,
                 decode_text: bool = True, stop: Callable[[], bool] | None = None) -> list[Generated]:
        """Run *items* to completion; see :func:`generate`."""
        return generate(self, items, max_new_tokens=int(max_new_tokens or self.max_new_tokens),
                        min_new_tokens=min_new_tokens, decode_text=decode_text, stop=stop)


def generate(gen: Generator, items: Sequence[Prepared], *, max_new_tokens: int, min_new_tokens: int = 0,
             decode_text: bool = True, stop: Callable[[], bool] | None = None) -> list[Generated]:
    """Run *items* to completion through *gen* (as many at once as it has slots); one result per item, in order.

    *stop()* is asked between steps; True ends every line still running (``stopped=True``, its tokens so far).
    """
    t0 = time.perf_counter()
    seqs = [Seq(p, max_new_tokens, min_new_tokens, tag=i) for i, p in enumerate(items)]
    pending = list(seqs)
    done: dict[int, Finished] = {}
    while pending or gen.running():
        room = gen.free_slots()
        if pending and room:
            batch, pending = pending[:room], pending[room:]
            for f in gen.add(batch):
                done[f.seq.tag] = f
        halt = stop is not None and stop()
        for f in gen.step((lambda s: True) if halt else None):
            done[f.seq.tag] = f
        if halt:
            for s in pending:
                done[s.tag] = Finished(s, [], stopped=True)
            pending = []
    ms = (time.perf_counter() - t0) * 1000.0
    out = []
    for s in seqs:
        f = done[s.tag]
        out.append(Generated(token_ids=f.token_ids, text=gen.decode(f.token_ids) if decode_text else "",
                             prompt_tokens=s.prepared.prompt_len, batch_size=f.group, generate_ms=ms,
                             stopped=f.stopped, stats={"prefill_ms": f.prefill_ms, "decode_ms": f.decode_ms}))
    return out
