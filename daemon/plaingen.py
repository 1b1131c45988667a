"""The plain generator: HF ``generate`` over static batches (``generation.static_cache: false``).

The reference the fast path is checked against, and a fallback for debugging a
model the fast path's hand-written decode step does not fit. It implements the
same contract (:mod:`htrd.generation`) with static batches: :meth:`add` takes
lines into its slots, one :meth:`step` runs one ``generate`` for all of them
and returns them all. The stop callback reaches ``generate`` as a stopping
criterion: a line whose deadline passed stops at the next token, and the call
ends when every line has stopped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from .generation import Finished, GeneratorBase, Seq
from .model import DEFAULT_PROMPT, Preprocessor, load_model

logger = logging.getLogger(__name__)


class PlainGenerator(GeneratorBase):
    variant: str = "adapter"

    def __init__(self, model, processor, *, prompt: str = DEFAULT_PROMPT, batch_sizes: Sequence[int] = (1,),
                 max_new_tokens: int = 256, preprocessor: Preprocessor | None = None,
                 on_token: Callable[[], None] = lambda: None) -> None:
        import torch

        self.torch = torch
        self.model = model
        self.processor = processor
        self.device = next(model.parameters()).device
        self.pre = preprocessor or Preprocessor(processor, model, prompt=prompt,
                                                one_cpu_thread=self.device.type == "cuda")
        self.batch_sizes = sorted({int(b) for b in batch_sizes})
        self.slots = self.max_batch = self.batch_sizes[-1]
        self.max_new_tokens = int(max_new_tokens)
        self.eos_ids, self.pad_id = self.pre.eos_ids, self.pre.pad_id
        self.on_token = on_token  # called once per decoding step (the engine's heartbeat)
        self._waiting: list[Seq] = []
        self.steps_run = 0
        self.occupied_sum = 0
        self.kv_cache_bytes = 0

    @classmethod
    def load(cls, model_dir, *, device: str = "cpu", dtype: str = "auto", variant: str = "auto",
             merge: bool = False, **kwargs) -> PlainGenerator:
        loaded = load_model(model_dir, device=device, dtype=dtype, variant=variant, merge=merge)
        gen = cls(loaded.model, loaded.processor, **kwargs)
        gen.variant = loaded.variant
        return gen

    def free_slots(self) -> int:
        return self.slots - len(self._waiting)

    def running(self) -> list[Seq]:
        return list(self._waiting)

    def occupancy(self) -> int:
        return len(self._waiting)

    def add(self, seqs: Sequence[Seq]) -> list[Finished]:
        if len(seqs) > self.free_slots():
            raise ValueError(f"{len(seqs)} lines for {self.free_slots()} free slots")
        self._waiting.extend(seqs)
        return []

    def step(self, stop: Callable[[Seq], bool] | None = None,
             during: Callable[[], None] | None = None) -> list[Finished]:
        """ONE ``generate`` for every line taken; returns all of them. *during()* runs first (nothing here
        overlaps: ``generate`` waits for the GPU throughout)."""
        if during is not None:
            during()
        seqs, self._waiting = self._waiting, []
        if not seqs:
            return []
        torch = self.torch
        from transformers import StoppingCriteria

        t0 = time.perf_counter()
        batch = self._collate([s.prepared for s in seqs])
        P = int(batch["input_ids"].shape[1])
        max_new = min(max(s.max_new_tokens for s in seqs), self.max_new_tokens)
        min_new = min(min(s.min_new_tokens for s in seqs), max_new)
        gen = self

        class _Stop(StoppingCriteria):
            """A row stops when stop() says so (its deadline passed) -- and the heartbeat ticks."""

            def __call__(self, input_ids, scores, **kwargs):
                gen.on_token()
                flags = [stop is not None and stop(s) for s in seqs]
                return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)

        with torch.inference_mode():
            out = self.model.generate(**batch, max_new_tokens=max_new, min_new_tokens=min_new, do_sample=False,
                                      num_beams=1, pad_token_id=self.pad_id, eos_token_id=self.eos_ids,
                                      stopping_criteria=[_Stop()])
        ms = (time.perf_counter() - t0) * 1000.0
        rows = out[:, P:].tolist()
        self.steps_run += len(rows[0]) if rows else 0
        self.occupied_sum += len(seqs) * (len(rows[0]) if rows else 0)
        done = []
        for s, row in zip(seqs, rows):
            ids = []
            for t in row[: s.max_new_tokens]:
                ids.append(int(t))
                if t in self.eos_ids:
                    break
            stopped = stop is not None and stop(s) and len(ids) < s.max_new_tokens and not (ids and ids[-1] in self.eos_ids)
            done.append(Finished(s, ids, stopped=bool(stopped), group=len(seqs), decode_ms=ms))
        return done

    def warmup(self, image=None, *, max_new_tokens: int | None = None,
               progress: Callable[[str], None] = lambda s: None) -> dict:
        """One short generate for every batch size (the processor's and the model's first calls are slow)."""
        from .model import warmup_image

        t0 = time.perf_counter()
        prep = self.prepare(image if image is not None else warmup_image())
        report = {}
        for b in self.batch_sizes:
            progress(f"warming up batch size {b} (of {self.batch_sizes})")
            tb = time.perf_counter()
            self.generate([prep] * b, max_new_tokens=4, decode_text=False)
            report[b] = round((time.perf_counter() - tb) * 1000.0, 1)
        self.steps_run = self.occupied_sum = 0
        return {"warmup_s": time.perf_counter() - t0, "per_batch_ms": report, "prompt_tokens": prep.prompt_len}
