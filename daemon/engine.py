"""The model, resident on one device, and the single inference thread that batches requests.

- **Load**: the merged variant ``<dir>/merged/`` when present and allowed by
  ``model.variant``, else the base from ``<dir>`` plus the LoRA adapter with
  ``PeftModel.from_pretrained(base, <dir>/final_model)``. Offline
  (``HF_HUB_OFFLINE=1`` is set before transformers is imported),
  ``local_files_only=True``, ``use_safetensors=True``, no remote code, one
  explicit device (never ``device_map="auto"``); every parameter and buffer is
  asserted to sit on that device.
- **Batching**: request handlers decode and preprocess images in worker threads
  (:meth:`Engine.prepare`), then :meth:`Engine.submit` them to a bounded queue.
  One inference thread takes up to ``max(limits.batch_sizes)`` queued images
  after a short collection window (``limits.batch_window_ms``), left-pads them
  into one batch and runs ONE greedy ``generate`` for all of them.
- **Failures**: a full queue is an immediate ``queue_full`` (503 + Retry-After);
  an image whose deadline passes gets ``deadline_exceeded`` (504); a batch that
  hits CUDA out-of-memory is retried image by image, an image that still does
  not fit gets ``out_of_memory`` (507), and the daemon stays ready.
- **Watchdog**: :attr:`Engine.generate_started_at` tells the supervisor how long
  the current ``generate`` has been running.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import signal
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from htrctl.errors import GpuError, ModelError, ModelMissingError
from htrctl.protocol import PageResult, Timings

from .api_errors import ApiError
from .faults import Faults
from .metrics import Metrics
from .state import ServiceState

logger = logging.getLogger(__name__)

ADAPTER_DIRNAME = "final_model"
MERGED_DIRNAME = "merged"
WARMUP_MAX_NEW_TOKENS = 4
# Longest extra wait for requests admitted but not yet queued (see Engine._loop).
HOLD_FOR_ARRIVING_S = 0.05


@dataclass
class Prepared:
    """One page, preprocessed for the model (tensors on the CPU, batch dimension 1)."""

    tensors: dict[str, Any] | None
    length: int
    preprocess_ms: float = 0.0
    fast: Any = None  # htrd.fastgen.Prepared on the fast path


@dataclass
class WorkItem:
    prepared: Prepared
    deadline: float  # time.monotonic()
    max_new_tokens: int
    request_id: str
    page: int = 0
    enqueued_at: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)


def resolve_dtype_name(setting: str, device: str) -> str:
    if setting == "auto":
        return "float32" if device == "cpu" else "bfloat16"
    return setting


class Engine:
    """Owns the model, the processor, the queue and the inference thread."""

    def __init__(self, settings, *, device: str, faults: Faults, state: ServiceState, metrics: Metrics) -> None:
        self.settings = settings
        self.device = device  # "cpu" or "cuda:0" (after CUDA_VISIBLE_DEVICES pinning)
        self.faults = faults
        self.state = state
        self.metrics = metrics
        self.model_dir = Path(settings.model.dir)
        self.dtype_name = resolve_dtype_name(settings.model.dtype, device)
        self.variant: str | None = None
        self.model = None
        self.processor = None
        self.prompt_text: str | None = None
        self.batch_sizes = list(settings.limits.batch_sizes)
        self.max_batch = max(self.batch_sizes)
        self.capacity = settings.limits.queue_length
        self.window_s = settings.limits.batch_window_ms / 1000.0
        self._queue: deque[WorkItem] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._processor_lock = threading.Lock()
        self._processors: list = []  # idle processor copies (see _take_processor)
        self._serving = False  # faults apply to serving generates only, never to warm-up
        self._busy = False  # a batch is being run
        self._running: list[WorkItem] = []  # the items of that batch
        # Watchdog: monotonic start of the running generate (None when none) and loop heartbeat.
        self.generate_started_at: float | None = None
        self.heartbeat = time.monotonic()
        self.last_batch_s = 0.0
        self.load_s: float | None = None
        self.warmup_s: float | None = None
        self.thread_error: BaseException | None = None
        self.fast = None  # htrd.fastgen.FastGenerator when generation.static_cache is on
        self._eos_ids: set[int] = set()
        self._pad_id = 0
        self._gen_config = None

    # -- loading -------------------------------------------------------------------------------------
    def load(self, progress: Callable[[str], None] = lambda s: None) -> None:
        """Load processor and model onto the device; raises ModelError/GpuError."""
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        t0 = time.monotonic()
        if self.faults.slow_load_s:
            progress(f"loading (test fault slow_load={self.faults.slow_load_s:g}s)")
            threading.Event().wait(self.faults.slow_load_s)
        source, adapter = self._pick_variant()  # a missing variant fails before the slow imports
        progress("importing torch and transformers")
        import torch
        import transformers
        from transformers import AutoModelForImageTextToText, AutoProcessor

        transformers.utils.logging.disable_progress_bar()

        dtype = getattr(torch, self.dtype_name)
        if self.device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise GpuError(
                    f"torch cannot use the GPU pinned with CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}",
                    remedy="check the NVIDIA driver and that torch is a CUDA build (htrctl doctor); or set gpu.select: cpu",
                )
            if torch.cuda.device_count() != 1:
                raise GpuError(f"expected exactly one visible GPU after pinning, torch sees {torch.cuda.device_count()}")
            torch.cuda.set_device(0)
        progress(f"loading processor from {self.model_dir}")
        try:
            self.processor = AutoProcessor.from_pretrained(str(self.model_dir), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load the processor/tokenizer from {self.model_dir}: {_first_line(exc)}",
                             remedy="run `htrctl verify` and re-provision the directory") from exc
        progress(f"loading {self.variant} weights from {source} ({self.dtype_name}, {self.device})")
        load_kwargs: dict[str, Any] = dict(local_files_only=True, use_safetensors=True, dtype=dtype)
        if self.device != "cpu":
            load_kwargs["device_map"] = {"": self.device}  # one explicit device, weights loaded straight onto it
        try:
            model = AutoModelForImageTextToText.from_pretrained(str(source), **load_kwargs)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(f"cannot load the model weights from {source}: {_first_line(exc)}",
                             remedy="run `htrctl verify` and re-provision the directory") from exc
        if adapter is not None:
            progress(f"applying the LoRA adapter from {adapter}")
            from peft import PeftModel

            try:
                model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False, local_files_only=True)
            except (OSError, ValueError, KeyError, RuntimeError) as exc:
                raise ModelError(f"cannot load the LoRA adapter from {adapter}: {_first_line(exc)}",
                                 remedy="run `htrctl verify`; the adapter must match the base model") from exc
        if self.device == "cpu":
            model = model.to("cpu")
        model.eval()
        self._assert_one_device(model, torch)
        if self.settings.generation.static_cache:
            # The fast path (htrd.fastgen): LoRA folded into the weights, static KV cache, CUDA-graph decode.
            from . import fastgen

            progress("building the fast generator (merged LoRA, static KV cache)")
            self.fast = fastgen.FastGenerator.from_loaded(model, self.processor, self.settings)
            model = self.fast.model
            self._assert_one_device(model, torch)
            if self.variant == "adapter":
                self.variant = "adapter (merged at load)"
        self.model = model
        self._finish_load(t0)

    def _finish_load(self, t0: float) -> None:
        from transformers import GenerationConfig

        model = self.model
        tok = self.processor.tokenizer
        tok.padding_side = "left"
        gen = GenerationConfig.from_model_config(model.config) if model.generation_config is None else model.generation_config
        gen = GenerationConfig(**gen.to_dict())
        gen.do_sample = False
        gen.num_beams = 1
        gen.temperature = None
        gen.top_p = None
        gen.top_k = None
        if self.settings.generation.min_new_tokens:
            gen.min_new_tokens = self.settings.generation.min_new_tokens  # benchmarks only
        if gen.pad_token_id is None:
            gen.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self._gen_config = gen
        eos = gen.eos_token_id
        self._eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        if tok.eos_token_id is not None:
            self._eos_ids.add(tok.eos_token_id)
        self._pad_id = int(gen.pad_token_id)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.settings.generation.prompt}]}]
        self.prompt_text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        self.load_s = time.monotonic() - t0
        self.metrics.load_seconds.set(self.load_s)
        logger.info("model loaded in %.2fs: variant=%s dtype=%s device=%s params=%d path=%s", self.load_s,
                    self.variant, self.dtype_name, self.device, sum(p.numel() for p in model.parameters()),
                    "fast (static cache)" if self.fast is not None else "generate")

    def _pick_variant(self) -> tuple[Path, Path | None]:
        d = self.model_dir
        want = self.settings.model.variant
        merged = d / MERGED_DIRNAME
        has_merged = (merged / "config.json").is_file()
        if want == "merged" and not has_merged:
            raise ModelMissingError(f"model.variant is 'merged' but {merged}/config.json does not exist",
                                    remedy="run `htrctl provision --merge`, or set model.variant: auto")
        if want in ("merged", "auto") and has_merged:
            self.variant = "merged"
            return merged, None
        adapter = d / ADAPTER_DIRNAME
        if not (adapter / "adapter_config.json").is_file():
            raise ModelMissingError(f"{adapter}/adapter_config.json does not exist (the LoRA adapter)",
                                    remedy="provision the complete model directory with `htrctl provision`")
        self.variant = "adapter"
        return d, adapter

    def _assert_one_device(self, model, torch) -> None:
        target = torch.device(self.device)
        devmap = getattr(model, "hf_device_map", None) or getattr(getattr(model, "base_model", None), "hf_device_map", None)
        if devmap and len(set(map(str, devmap.values()))) > 1:
            raise GpuError(f"the model was split over several devices: {sorted(set(map(str, devmap.values())))}",
                           remedy="the model must live on one GPU; this is a bug in htrd")
        stray = [(n, str(t.device)) for n, t in list(model.named_parameters()) + list(model.named_buffers())
                 if t.device != target]
        if stray:
            raise GpuError(f"{len(stray)} tensors are not on {self.device}, e.g. {stray[:3]}",
                           remedy="the model must live on one device; this is a bug in htrd")

    # -- preprocessing (worker threads, never the inference thread) -----------------------------------------
    def prepare(self, image) -> Prepared:
        t0 = time.perf_counter()
        if self.fast is not None:
            fp = self.fast.prepare(image)  # thread-safe: one processor copy per concurrent caller
            return Prepared(None, fp.prompt_len, (time.perf_counter() - t0) * 1000.0, fast=fp)
        proc = self._take_processor()
        try:
            enc = proc(text=[self.prompt_text], images=[image], return_tensors="pt")
        finally:
            with self._processor_lock:
                self._processors.append(proc)
        tensors = dict(enc.items())
        return Prepared(tensors, int(tensors["input_ids"].shape[1]), (time.perf_counter() - t0) * 1000.0)

    def _take_processor(self):
        """An idle copy of the processor: a fast tokenizer must not serve two threads at once, and one
        lock would serialise the image preprocessing of a whole batch. Copies are made on demand."""
        with self._processor_lock:
            if self._processors:
                return self._processors.pop()
        return copy.deepcopy(self.processor)

    # -- warm-up ---------------------------------------------------------------------------------------------
    def warm_up(self, progress: Callable[[str], None] = lambda s: None) -> None:
        """One generate for every configured batch size, before READY."""
        from PIL import Image, ImageDraw

        t0 = time.monotonic()
        img = Image.new("RGB", (1200, 160), "white")
        draw = ImageDraw.Draw(img)
        for x in range(40, 1160, 60):
            draw.line([(x, 120), (x + 30, 40)], fill="black", width=5)
        import io

        from .images import decode_image

        buf = io.BytesIO()
        img.save(buf, format="PNG")  # through the request path: PNG decoding is slow on its first use
        img = decode_image(buf.getvalue(), max_pixels=self.settings.limits.max_image_pixels, max_pages=1)[0].image
        prepared = self.prepare(img)
        for n in self.batch_sizes:
            progress(f"warming up batch size {n} (of {self.batch_sizes})")
            new_tokens = self.settings.generation.max_new_tokens if self.fast is not None else WARMUP_MAX_NEW_TOKENS
            items = [WorkItem(prepared, math.inf, new_tokens, "warmup") for _ in range(n)]
            self._generate(items)
        self.warmup_s = time.monotonic() - t0
        self.metrics.warmup_seconds.set(self.warmup_s)
        logger.info("warmed up batch sizes %s in %.2fs", self.batch_sizes, self.warmup_s)

    # -- queue -----------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._serving = True
        self._thread = threading.Thread(target=self._loop_guarded, name="htrd-inference", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    @property
    def thread_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def queue_depth(self) -> int:
        with self._cond:
            return len(self._queue)

    def idle(self) -> bool:
        with self._cond:
            return not self._queue and not self._busy

    def retry_after_s(self) -> int:
        with self._cond:
            depth = len(self._queue)
        per_batch = max(self.last_batch_s, 0.5)
        return max(1, math.ceil(per_batch * (depth / self.max_batch + 1)))

    def abandon(self, message: str) -> int:
        """Fail every queued and running image with 503 not_ready (drain gave up); returns how many."""
        with self._cond:
            items = list(self._queue) + list(self._running)
            self._queue.clear()
            self.metrics.queue_depth.set(0)
        err = ApiError("not_ready", message, retry_after=5)
        n = 0
        for item in items:
            if not item.future.done():
                try:
                    item.future.set_exception(err)
                    n += 1
                except InvalidStateError:  # finished meanwhile
                    pass
        return n

    def submit(self, prepared: list[Prepared], *, deadline: float, max_new_tokens: int, request_id: str,
               pages: list[int] | None = None) -> list[WorkItem]:
        """Queue the pages of one request at once, or refuse all of them (queue_full)."""
        items = [WorkItem(p, deadline, max_new_tokens, request_id, page=(pages[i] if pages else i))
                 for i, p in enumerate(prepared)]
        with self._cond:
            if self._stopping:
                raise ApiError("not_ready", "htrd is shutting down", retry_after=5)
            if len(self._queue) + len(items) > self.capacity:
                self.state.count(rejected_queue_full=1)
                raise ApiError(
                    "queue_full",
                    f"the queue is full ({len(self._queue)} of {self.capacity} images waiting, this request has "
                    f"{len(items)}); retry later",
                    detail={"queue_depth": len(self._queue), "queue_capacity": self.capacity},
                    retry_after=self.retry_after_s_locked(),
                )
            self._queue.extend(items)
            self.metrics.queue_depth.set(len(self._queue))
            self._cond.notify_all()
        return items

    def retry_after_s_locked(self) -> int:
        per_batch = max(self.last_batch_s, 0.5)
        return max(1, math.ceil(per_batch * (len(self._queue) / self.max_batch + 1)))

    # -- the inference thread ----------------------------------------------------------------------------------
    def _loop_guarded(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 -- recorded; the supervisor turns it into an exit
            self.thread_error = exc
            logger.exception("the inference thread died")

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self.heartbeat = time.monotonic()
                    self._cond.wait(0.25)
                if self._stopping and not self._queue:
                    return
                # Wait only for requests already admitted and still being decoded/preprocessed in
                # worker threads: a lone request starts at once (nothing could join it), while with
                # many concurrent clients the batch does not split into a few early arrivals and the
                # rest (a whole extra decode). Bounded by the window plus HOLD_FOR_ARRIVING_S.
                limit = self.window_s + (HOLD_FOR_ARRIVING_S if self.window_s > 0 else 0.0)
                window_end = time.monotonic() + limit
                while len(self._queue) < self.max_batch and not self._stopping:
                    left = window_end - time.monotonic()
                    if left <= 0 or self.state.in_flight <= len(self._queue):
                        break
                    self._cond.wait(min(left, 0.002))
                taken = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
                self.metrics.queue_depth.set(len(self._queue))
                self._busy = True
                self._running = taken
            try:
                self.heartbeat = time.monotonic()
                live = []
                now = time.monotonic()
                for item in taken:
                    if not item.future.set_running_or_notify_cancel():
                        continue  # the client gave up (deadline) while it was queued
                    if item.deadline <= now:
                        self._fail(item, _deadline_error(item))
                        continue
                    live.append(item)
                if live:
                    self._serve_batch(live)
            finally:
                with self._cond:
                    self._busy = False
                    self._running = []
                self.heartbeat = time.monotonic()

    def _fail(self, item: WorkItem, err: ApiError) -> None:
        self.metrics.errors.labels(err.type).inc()
        if err.type == "deadline_exceeded":
            self.state.count(deadline_exceeded=1)
        if not item.future.done():
            try:
                item.future.set_exception(err)
            except InvalidStateError:  # abandoned by a drain meanwhile
                pass

    def _serve_batch(self, items: list[WorkItem]) -> None:
        import torch

        try:
            results = self._generate(items)
        except torch.cuda.OutOfMemoryError as exc:
            logger.error("CUDA out of memory in a batch of %d images (requests %s): %s", len(items),
                         ",".join(sorted({i.request_id for i in items})), _first_line(exc))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(items) > 1:
                # One large image must not fail its batch-mates: retry each image alone.
                logger.warning("retrying the %d images of that batch one by one", len(items))
                now = time.monotonic()
                for item in items:
                    if item.deadline <= now:
                        self._fail(item, _deadline_error(item))
                    else:
                        self._serve_batch([item])
                return
            err = ApiError("out_of_memory",
                           f"CUDA out of memory while transcribing a batch of {len(items)} images; the daemon is still "
                           "ready -- retry, send smaller images, or lower limits.batch_sizes",
                           detail={"batch_size": len(items)})
            for item in items:
                self._fail(item, err)
            return
        except Exception as exc:  # noqa: BLE001 -- one batch fails, the daemon keeps serving
            logger.exception("generate failed for a batch of %d images", len(items))
            err = ApiError("internal", f"transcription failed: {_first_line(exc)}")
            for item in items:
                self._fail(item, err)
            return
        now = time.monotonic()
        for item, result in zip(items, results):
            if now > item.deadline:
                self._fail(item, _deadline_error(item))
            elif not item.future.done():
                try:
                    item.future.set_result(result)
                except InvalidStateError:  # abandoned by a drain meanwhile
                    pass

    def _generate(self, items: list[WorkItem]) -> list[PageResult]:
        """ONE generate call for *items*; returns one PageResult per item."""
        n = len(items)
        # From here the watchdog measures this call (the copy to the device included: a hung
        # peer-to-peer copy blocks there as well as in generate).
        t0 = time.monotonic()
        self.generate_started_at = t0
        if self._serving:
            self.metrics.generating.set(n)
        try:
            return self._generate_timed(items, n, t0)
        finally:
            self.generate_started_at = None
            self.metrics.generating.set(0)

    def _generate_timed(self, items: list[WorkItem], n: int, t0: float) -> list[PageResult]:
        import torch
        from transformers import StoppingCriteria

        if self.fast is not None:
            return self._generate_fast(items, n, t0, torch)
        # Eager generate gains nothing from padding to a bucket (the fast path, htrd.fastgen, pads to its
        # captured batch sizes itself); the bucket is only logged.
        bucket = next((b for b in self.batch_sizes if b >= n), n)
        batch = _collate([i.prepared.tensors for i in items], self._pad_id)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        prompt_len = int(batch["input_ids"].shape[1])
        max_new = max(i.max_new_tokens for i in items)
        deadlines = [i.deadline for i in items]
        engine = self

        class _Progress(StoppingCriteria):
            """Records progress for the watchdog; stops when every request's deadline has passed."""

            def __call__(self, input_ids, scores, **kwargs):
                engine.heartbeat = time.monotonic()
                expired = all(engine.heartbeat > d for d in deadlines)
                return torch.full((input_ids.shape[0],), expired, dtype=torch.bool, device=input_ids.device)

        kwargs: dict[str, Any] = {}
        if self._serving:
            self._inject_faults(torch)
        with torch.inference_mode():
            gen_config = copy.deepcopy(self._gen_config)
            gen_config.max_new_tokens = max_new
            out = self.model.generate(**batch, generation_config=gen_config, stopping_criteria=[_Progress()], **kwargs)
        gen_s = time.monotonic() - t0
        self.last_batch_s = gen_s
        new = out[:, prompt_len:].tolist()
        results = []
        total_tokens = 0
        tok = self.processor.tokenizer
        for item, row in zip(items, new):
            ids = []
            for t in row[: item.max_new_tokens]:
                if t in self._eos_ids:
                    break
                ids.append(t)
            total_tokens += len(ids)
            text = tok.decode(ids, skip_special_tokens=True).strip()
            timings = _timings(item, t0, gen_s)
            results.append(PageResult(page=item.page, text=text, tokens=len(ids), batch_size=n, timings=timings))
        self._record(n, total_tokens, gen_s)
        if self._serving:
            logger.debug("batch of %d (bucket %d): %d tokens in %.3fs", n, bucket, total_tokens, gen_s)
        return results

    def _generate_fast(self, items: list[WorkItem], n: int, t0: float, torch) -> list[PageResult]:
        max_new = max(i.max_new_tokens for i in items)
        if self._serving:
            self._inject_faults(torch)
        generated = self.fast.generate([i.prepared.fast for i in items], max_new_tokens=max_new,
                                       min_new_tokens=min(self.settings.generation.min_new_tokens, max_new))
        gen_s = time.monotonic() - t0
        self.last_batch_s = gen_s
        results = []
        total = 0
        for item, g in zip(items, generated):
            ids = [t for t in g.token_ids if t not in self._eos_ids][: item.max_new_tokens]
            text = g.text if len(ids) == len([t for t in g.token_ids if t not in self._eos_ids]) else self.fast.decode(ids)
            total += len(ids)
            timings = _timings(item, t0, gen_s)
            results.append(PageResult(page=item.page, text=text, tokens=len(ids), batch_size=n, timings=timings))
        self._record(n, total, gen_s)
        return results

    def _record(self, n: int, total_tokens: int, gen_s: float) -> None:
        if not self._serving:
            return
        self.metrics.batch_size.observe(n)
        self.metrics.generate_seconds.observe(gen_s)
        self.metrics.generated_tokens.inc(total_tokens)
        self.metrics.images.inc(n)
        if gen_s > 0:
            self.metrics.tokens_per_second.set(total_tokens / gen_s)
        self.state.count(batches=1, images=n, generated_tokens=total_tokens)

    def _inject_faults(self, torch) -> None:
        f = self.faults
        if not f.active:
            return
        if f.crash:
            logger.critical("TEST FAULT crash: killing the process with SIGKILL")
            os.kill(os.getpid(), signal.SIGKILL)
        if f.hang_generate:
            logger.warning("TEST FAULT hang_generate: this generate call never returns")
            threading.Event().wait()
        if f.slow_generate_s:
            threading.Event().wait(f.slow_generate_s)
        if f.take_oom():
            raise torch.cuda.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 20.00 GiB (injected by HTR_TEST_FAULTS=oom)")

    # -- status -----------------------------------------------------------------------------------------------
    def memory(self) -> dict[str, int | None]:
        if not self.device.startswith("cuda"):
            return {}
        import sys

        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_initialized():
            return {}
        return {
            "allocated": int(torch.cuda.memory_allocated(0)),
            "reserved": int(torch.cuda.memory_reserved(0)),
            "total": int(torch.cuda.get_device_properties(0).total_memory),
        }


def _collate(rows: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Batch single-image encodings: per-token tensors left-padded, image tensors concatenated."""
    import torch

    lengths = [int(r["input_ids"].shape[1]) for r in rows]
    width = max(lengths)
    out: dict[str, Any] = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        per_token = all(v.dim() == 2 and v.shape[0] == 1 and v.shape[1] == n for v, n in zip(values, lengths))
        if per_token:
            fill = pad_id if key == "input_ids" else 0
            padded = [torch.nn.functional.pad(v, (width - v.shape[1], 0), value=fill) for v in values]
            out[key] = torch.cat(padded, dim=0)
        else:
            out[key] = torch.cat(values, dim=0)
    return out


def _deadline_error(item: WorkItem) -> ApiError:
    return ApiError("deadline_exceeded", "the request was not done within limits.request_deadline_s; retry later "
                    "or raise the limit", detail={"request_id": item.request_id})


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def _timings(item: WorkItem, t0: float, gen_s: float) -> Timings:
    """One page's timings; total = preprocessing + waiting in the queue + its batch's generate call."""
    queue_ms = (t0 - item.enqueued_at) * 1000.0
    gen_ms = gen_s * 1000.0
    pre_ms = item.prepared.preprocess_ms
    return Timings(queue_ms=queue_ms, preprocess_ms=pre_ms, generate_ms=gen_ms, total_ms=pre_ms + queue_ms + gen_ms)
