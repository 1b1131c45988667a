"""The scheduler: one inference thread that feeds a generator from a bounded queue.

The model itself -- loading, the processor, the prompt, EOS/pad ids -- is
:mod:`htrd.model`'s; how tokens are produced is the generator's
(:mod:`htrd.generation`: :class:`~htrd.fastgen.FastGenerator` by default,
:class:`~htrd.plaingen.PlainGenerator` with ``generation.static_cache: false``).
The engine keeps scheduling only:

- **Preprocessing** (decode + image processor) runs in worker processes
  (:mod:`htrd.prepool`; ``limits.preprocess_workers``), never on the inference
  thread nor under its GIL (:meth:`Engine.decode_prepare`); its CPU time per
  line is reported in ``/v1/status``.
- **Queue and admission**: :meth:`Engine.submit` queues the pages of a request
  at once or refuses them all (``queue_full``: 503 + Retry-After).
- **Continuous batching**: the inference thread moves queued lines, in FIFO
  order, into the generator's free slots at step boundaries (while lines
  decode, at most ``generation.prefill_chunk`` at one boundary, so running
  lines are not stalled for long) and advances every running line a few tokens per step; a line
  leaves at its own end and its slot is reused at once.
- **Deadlines stop work**: an expired line is taken out of the running batch
  at the next step (``deadline_exceeded``); the others continue. A client that
  gave up frees its lines the same way.
- **Failures**: CUDA out-of-memory in a prefill retries its lines one by one;
  a line that still does not fit gets ``out_of_memory`` (507) and the daemon
  stays ready. Errors are counted once, by the HTTP layer.
- **Watchdog**: :attr:`Engine.generate_started_at` tells the supervisor how
  long the current model call (a prefill or a few decode steps) has run.

Why a dedicated inference thread: the GPU work is a sequence of model calls
that must never run concurrently (one CUDA stream, shared buffers), and cuBLAS
keeps per-thread handles and workspaces -- warm-up runs on this same thread so
the first request after READY is as fast as the others.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from htrctl.errors import GpuError
from htrctl.protocol import PageResult, Timings

from .api_errors import ApiError
from .faults import Faults
from .generation import Finished, Seq
from .metrics import Metrics
from .model import Prepared, _first_line, resolve_dtype_name
from .prepool import PreprocessPool, default_workers, encode_pages
from .state import DaemonState

logger = logging.getLogger(__name__)

# Longest extra wait, when nothing runs, for requests admitted but not yet queued (see Engine._take).
HOLD_FOR_ARRIVING_S = 0.05
# Quiet this long (nothing queued or running), the inference thread captures the prefill graphs later prefills
# may need, one at a time (FastGenerator.precapture_next; tens of ms each -- a request arriving meanwhile
# waits for that one), until none is left.
PRECAPTURE_QUIET_S = 1.0


@dataclass(eq=False)
class WorkItem:
    prepared: Prepared
    deadline: float  # time.monotonic()
    max_new_tokens: int
    request_id: str
    page: int = 0
    enqueued_at: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)
    started_at: float = 0.0


class Engine:
    """Owns the generator (and through it the model), the queue and the inference thread."""

    def __init__(self, settings, *, device: str, faults: Faults, state: DaemonState, metrics: Metrics) -> None:
        self.settings = settings
        self.device = device  # "cpu" or "cuda:0" (after CUDA_VISIBLE_DEVICES pinning)
        self.faults = faults
        self.state = state
        self.metrics = metrics
        self.model_dir = Path(settings.model.dir)
        self.dtype_name = resolve_dtype_name(settings.model.dtype, device)
        self.fast = settings.generation.fast_generator
        self.variant: str | None = None
        self.gen = None  # FastGenerator | PlainGenerator
        self.batch_sizes = list(settings.limits.batch_sizes)
        self.max_batch = max(self.batch_sizes)
        self.capacity = settings.limits.queue_length
        self.window_s = settings.limits.batch_window_ms / 1000.0
        self.join_wait_s = settings.generation.join_wait_ms / 1000.0
        self._queue: deque[WorkItem] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._serving = False  # faults apply to serving calls only, never to warm-up
        self._thread: threading.Thread | None = None
        self._warm = threading.Event()
        self._warm_error: BaseException | None = None
        self._go = threading.Event()
        self._admitting: list[WorkItem] = []  # lines being prefilled (neither queued nor in a slot yet)
        self._left_last = 0  # lines that left the slots at the last step boundary (_take replaces them)
        self._busy_at = time.monotonic()  # the inference thread's last serving work (or the warm-up's end)
        # while quiet, capture prefill graphs ahead of need (FastGenerator.precapture_next) until none is left
        self._precapturing = False  # set once warm (generators that have precapture_next)
        # Preprocessing: worker processes (htrd.prepool) unless limits.preprocess_workers is 0, then threads.
        procs = settings.limits.preprocess_workers
        self._procs: PreprocessPool | None = None
        if procs != 0:
            self._procs = PreprocessPool(self.model_dir, prompt=settings.generation.prompt, dtype_name=self.dtype_name,
                                         workers=procs or default_workers(), warm_png=_warmup_png(),
                                         one_cpu_thread=device.startswith("cuda"),
                                         timeout_s=settings.limits.preprocess_timeout_s)
        self._procs_started: Future | None = None
        workers = self._procs.workers if self._procs is not None else max(1, min(32, os.cpu_count() or 1))
        # threads: the preprocessing itself without processes; with them, only what starts them beside the load
        self._cpu_pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="htrd-pre")
        self.cpu_workers = workers
        self._pre_lock = threading.Lock()
        self.preprocessed = 0
        self.preprocess_ms_total = 0.0
        # Watchdog: monotonic start of the running model call (None when none) and loop heartbeat.
        self.generate_started_at: float | None = None
        self.heartbeat = time.monotonic()
        self.last_batch_s = 0.0
        self.load_s: float | None = None
        self.warmup_s: float | None = None
        self.warmup_report: dict = {}
        self.thread_error: BaseException | None = None

    # -- loading -------------------------------------------------------------------------------------
    def load(self, progress: Callable[[str], None] = lambda s: None) -> None:
        """Load the model onto the device and build the generator; raises ModelError/GpuError."""
        t0 = time.monotonic()
        if self.faults.slow_load_s:
            progress(f"loading (test fault slow_load={self.faults.slow_load_s:g}s)")
            threading.Event().wait(self.faults.slow_load_s)
        from .model import Preprocessor, load_model

        if self._procs is not None:  # the workers start beside the load (each loads the processor)
            self._procs_started = self.run_cpu(self._procs.start)
        gen_s = self.settings.generation
        compiling = self.fast and self.device.startswith("cuda") and gen_s.compile
        precompiled: list[threading.Thread] = []
        loaded = load_model(self.model_dir, device=self.device, dtype=self.settings.model.dtype,
                            variant=self.settings.model.variant, merge=self.fast, progress=progress,
                            imported=lambda: precompiled.extend(self._precompile() if compiling else []))
        if self.device.startswith("cuda"):
            import torch

            if torch.cuda.device_count() != 1:
                raise GpuError(f"expected exactly one visible GPU after pinning, torch sees {torch.cuda.device_count()}")
        for thread in precompiled:
            thread.join()  # the generator and the warm-up must not run beside it (below; the same ops)
        _reset_default_dtype()
        pre = Preprocessor(loaded.processor, loaded.model, prompt=gen_s.prompt,
                           one_cpu_thread=self.device.startswith("cuda"))
        if self.fast:
            from .fastgen import FastGenerator

            progress("building the fast generator (static KV cache with slots)")
            self.gen = FastGenerator(loaded.model, loaded.processor, batch_sizes=self.batch_sizes,
                                     max_cache_len=gen_s.max_cache_len, max_new_tokens=gen_s.max_new_tokens,
                                     prefill_chunk=gen_s.prefill_chunk, mixed=gen_s.mixed_steps,
                                     prefill_tokens=gen_s.prefill_tokens,
                                     decode_attention=gen_s.decode_attention, compile=compiling, preprocessor=pre)
            self.batch_sizes = list(self.gen.batch_sizes)  # those whose KV cache fits
            self.max_batch = self.gen.slots
        else:
            from .plaingen import PlainGenerator

            self.gen = PlainGenerator(loaded.model, loaded.processor, batch_sizes=self.batch_sizes,
                                      max_new_tokens=gen_s.max_new_tokens, preprocessor=pre, on_token=self._beat)
        self.variant = loaded.variant
        self.load_s = time.monotonic() - t0
        self.metrics.load_seconds.set(self.load_s)
        logger.info("model loaded in %.2fs: variant=%s dtype=%s device=%s params=%d generator=%s slots=%d",
                    self.load_s, self.variant, self.dtype_name, self.device,
                    sum(p.numel() for p in loaded.model.parameters()), type(self.gen).__name__, self.gen.slots)

    def _precompile(self) -> list[threading.Thread]:
        """Point the compile caches at the state directory and start compiling the fast path's elementwise ops
        (:func:`htrd.fastgen.precompile_ops`) in a thread while the weights load -- ~5 s of an H200's warm-up
        otherwise (8 compilations from the persistent cache, the first paying inductor's imports). Started
        once torch and transformers are imported: beside the imports (pure Python, like compiling) the two
        only took turns. Never fatal: what it does not compile, the warm-up does."""
        from htrctl.modeldir import text_config

        from .fastgen import configure_compile_cache, precompile_ops

        configure_compile_cache(self.settings.generation.compile_cache_dir)
        config = text_config(self.model_dir, self.settings.model.variant)
        if config is None:
            return []  # load_model reports what is wrong with the directory
        dtype_name = resolve_dtype_name(self.settings.model.dtype, self.device)

        def run() -> None:
            t0 = time.monotonic()
            self._one_cpu_thread()
            try:
                n = precompile_ops(config, device=self.device, dtype_name=dtype_name)
            except Exception as exc:  # noqa: BLE001 -- the warm-up compiles them instead
                logger.warning("compiling the fast path's ops beside the load failed (%s: %s); the warm-up "
                               "compiles them", type(exc).__name__, _first_line(exc))
                return
            logger.info("compiled the fast path's ops (%d calls) beside the load in %.1f s", n,
                        time.monotonic() - t0)

        thread = threading.Thread(target=run, name="htrd-precompile", daemon=True)
        thread.start()
        return [thread]

    def _one_cpu_thread(self) -> None:
        """On a GPU, the calling thread's torch CPU ops on one core -- what the preprocessing threads set
        (:meth:`htrd.model.ImageEncoder._limit_threads`), and the inference thread preprocesses the warm-up line.
        The thread that compiles the ops and the inference thread that runs them must agree: the compiled ops
        are guarded on torch's thread count, and a mismatch recompiled all four of them twice before READY
        (~1 s on an H200)."""
        if self.device.startswith("cuda"):
            import torch

            torch.set_num_threads(1)

    def _beat(self) -> None:
        self.heartbeat = time.monotonic()

    # -- preprocessing (worker processes or the CPU pool, never the inference thread) -------------------------
    def run_cpu(self, fn: Callable, *args) -> Future:
        """Run *fn(*args)* in the bounded thread pool (the preprocessing with ``limits.preprocess_workers: 0``)."""
        return self._cpu_pool.submit(fn, *args)

    def decode_prepare(self, data: bytes, header) -> Future:
        """Decode and preprocess the image *data* (read before as *header*), off the inference thread: a future
        of ``[(page index, Prepared)]``, failing with the image's :class:`ApiError`."""
        if self._procs is None:
            return self.run_cpu(encode_pages, data, header, self.prepare)
        out: Future = Future()
        out.set_running_or_notify_cancel()

        def done(f: Future) -> None:
            try:
                out.set_result([(page, self._count(self.gen.complete(enc))) for page, enc in f.result()])
            except BaseException as exc:  # noqa: BLE001 -- the image's error, for the request
                out.set_exception(exc)

        self._procs.submit(data, header).add_done_callback(done)
        return out

    def prepare(self, image) -> Prepared:
        return self._count(self.gen.prepare(image))

    def _count(self, prepared: Prepared) -> Prepared:
        with self._pre_lock:
            self.preprocessed += 1
            self.preprocess_ms_total += prepared.preprocess_ms
        return prepared

    def preprocess_ms_per_image(self) -> float | None:
        with self._pre_lock:
            return round(self.preprocess_ms_total / self.preprocessed, 2) if self.preprocessed else None

    # -- warm-up and start ------------------------------------------------------------------------------------
    def warm_up(self, progress: Callable[[str], None] = lambda s: None) -> None:
        """Start the inference thread; it warms the generator up (every shape it will serve), and this
        waits for that. The thread then waits for :meth:`start` before it serves."""
        t0 = time.monotonic()
        self._progress = progress
        self._thread = threading.Thread(target=self._run_guarded, name="htrd-inference", daemon=True)
        self._thread.start()
        if self._procs_started is not None:
            try:
                self._procs_started.result()
            except Exception as exc:  # noqa: BLE001 -- logged; serving goes on with threads
                # (the processor itself loaded in htrd: what failed is the host's multiprocessing -- no /dev/shm
                # for its semaphores, a refused fork...)
                logger.warning("the preprocessing worker processes did not start (%s): preprocessing in %d threads "
                               "of htrd instead (limits.preprocess_workers: 0 says so and skips the attempt)",
                               _first_line(exc), self.cpu_workers)
                self._procs.close()
                self._procs = None
        if self._procs is None:
            self._warm_cpu_pool()
        self._warm.wait()
        if self._warm_error is not None:
            raise self._warm_error
        self.warmup_s = time.monotonic() - t0
        self.metrics.warmup_seconds.set(self.warmup_s)
        logger.info("warmed up in %.2fs (%s)", self.warmup_s, self.warmup_report)

    def _warm_cpu_pool(self) -> None:
        """Every preprocessing worker decodes and preprocesses the warm-up line once (while the inference thread
        warms the GPU): the pool starts its threads lazily, and a request landing on a new one paid for the
        thread, its torch thread settings and the first image decoding in it."""
        n = self.cpu_workers
        barrier = threading.Barrier(n)  # each task holds its worker until all n run: one task per thread

        def one() -> None:
            try:
                barrier.wait(timeout=30)
            except threading.BrokenBarrierError:
                pass
            self.gen.prepare(self._warmup_line())

        for f in [self._cpu_pool.submit(one) for _ in range(n)]:
            f.result()

    def _warm_up_here(self) -> None:
        self.warmup_report = self.gen.warmup(self._warmup_line(), progress=self._progress,
                                             max_new_tokens=self.settings.generation.max_new_tokens)

    def _warmup_line(self):
        """The warm-up line image, through the request path (PNG bytes decoded as a request's are: decoding is
        slow on its first use in a thread)."""
        from .images import decode_image

        return decode_image(_warmup_png(), max_pixels=self.settings.limits.max_image_pixels, max_pages=1)[0].image

    def start(self) -> None:
        """Serve: the inference thread (started by :meth:`warm_up`) takes work from now on."""
        self._serving = True
        self._go.set()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._go.set()
        if self._procs is not None:
            self._procs.close()

    # -- queue -----------------------------------------------------------------------------------------------
    def queue_depth(self) -> int:
        with self._cond:
            return len(self._queue)

    def occupied(self) -> int:
        gen = self.gen
        return gen.occupancy() if gen is not None else 0

    def idle(self) -> bool:
        with self._cond:
            return not self._queue and self.occupied() == 0

    def _retry_after_s_locked(self) -> int:
        per_batch = max(self.last_batch_s, 0.5)
        return max(1, math.ceil(per_batch * (len(self._queue) / self.max_batch + 1)))

    def abandon(self, message: str) -> int:
        """Fail every queued and running image with 503 not_ready (drain gave up); returns how many."""
        with self._cond:
            items = list(self._queue) + list(self._admitting)
            items += [s.tag for s in (self.gen.running() if self.gen is not None else [])]
            self._queue.clear()
            self.metrics.queue_depth.set(0)
        err = ApiError("not_ready", message, retry_after=5)
        return sum(_settle(item, exc=err) for item in items)

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
                    retry_after=self._retry_after_s_locked(),
                )
            self._queue.extend(items)
            self.metrics.queue_depth.set(len(self._queue))
            self._cond.notify_all()
        return items

    # -- the inference thread ----------------------------------------------------------------------------------
    def _run_guarded(self) -> None:
        self._one_cpu_thread()
        try:
            self._warm_up_here()
        except BaseException as exc:  # noqa: BLE001 -- handed to warm_up(), which raises it on the load thread
            self._warm_error = exc
            self._warm.set()
            return
        self._warm.set()
        self._go.wait()
        self._precapturing = hasattr(self.gen, "precapture_next")
        self._busy_at = time.monotonic()
        try:
            self._loop()
        except BaseException as exc:  # recorded; the supervisor turns it into an exit
            self.thread_error = exc
            logger.exception("the inference thread died")

    def _loop(self) -> None:
        gen = self.gen
        while True:
            if gen.running():
                # Newcomers join inside the step, once its decode steps are launched (_step's join): the host's
                # work of launching their prefill then overlaps the GPU's decoding instead of preceding it.
                self._step()
                self._busy_at = time.monotonic()
            else:
                taken = self._take()
                if taken is None:
                    return
                if taken:
                    self._admit(taken)
                    self._busy_at = time.monotonic()
                elif self._precapturing and not self._queue:
                    # quiet (see _take): one prefill graph ahead of need
                    self._precapturing = bool(self._call_quiet(gen.precapture_next))
            self.heartbeat = time.monotonic()

    def _call_quiet(self, fn: Callable[[], Any]) -> Any:
        """*fn* on the inference thread while it is quiet, timed by the watchdog like a model call (a capture
        talks to the GPU too); an error is logged and ends the quiet work."""
        self.generate_started_at = time.monotonic()
        try:
            return fn()
        except Exception:  # never fatal: serving goes on without what it would have prepared
            logger.exception("preparing prefill graphs while quiet failed; not trying again")
            return False
        finally:
            self.generate_started_at = None

    def _take(self) -> list[WorkItem] | None:
        """The next lines to join (FIFO, at most the free slots); [] to just step; None to exit."""
        gen = self.gen
        with self._cond:
            while not self._queue and not gen.running() and not self._stopping:
                self.heartbeat = time.monotonic()
                quiet = self.heartbeat - self._busy_at
                if self._precapturing and quiet >= PRECAPTURE_QUIET_S:
                    return []  # _loop prepares a prefill graph
                self._cond.wait(min(0.25, PRECAPTURE_QUIET_S - quiet) if self._precapturing else 0.25)
            if self._stopping and not self._queue and not gen.running():
                return None
            free = gen.free_slots()
            if not self._queue or not free:
                return []
            if gen.running() and not self.settings.generation.continuous_batching:
                return []  # static batching: the running batch ends first
            if not gen.running():
                # Nothing runs: wait only for requests already admitted and still being decoded in the
                # CPU pool -- a lone request starts at once, while many concurrent clients do not split
                # into a few early arrivals and the rest. Bounded by the window plus HOLD_FOR_ARRIVING_S.
                # Continuous batching waits for one prefill group at most: later arrivals join at the next
                # step boundary, so holding the GPU idle for them would gain nothing.
                limit = self.window_s + (HOLD_FOR_ARRIVING_S if self.window_s > 0 else 0.0)
                end = time.monotonic() + limit
                want = min(free, gen_chunk(gen)) if self.settings.generation.continuous_batching else free
                while len(self._queue) < want and not self._stopping:
                    left = end - time.monotonic()
                    if left <= 0 or self.state.in_flight <= len(self._queue):
                        break
                    self._cond.wait(min(left, 0.002))
            elif (not getattr(gen, "mixed", False) and len(self._queue) < min(free, gen_chunk(gen))
                  and self._arriving_locked() > 0):
                # Lines are decoding: a newcomer joins at the next step boundary -- or later, with the requests
                # already on their way (accepted, still being decoded and preprocessed), up to
                # generation.join_wait_ms. One prefill of several lines costs the GPU much less per line than
                # several of one (an H200: 18.7 ms for one 284-token line, 45.6 ms for four). With nothing on
                # its way, waiting would only add latency. Mixed steps chunk every prompt into the decode
                # steps whoever joins with it: nothing to share, no wait.
                if time.monotonic() - self._queue[0].enqueued_at < self.join_wait_s:
                    return []
            n = min(free, len(self._queue))
            if gen.running() and not getattr(gen, "mixed", False):
                # Lines are decoding and stall while newcomers prefill: a burst into free slots joins one prefill
                # chunk per step boundary (a stall of ~0.15 s for 16 lines of the 8B model on an H200), however
                # many slots it could fill; the rest join at the next boundaries, in order. On top of that chunk,
                # the lines that left at the last boundary are replaced, whatever their number: with one chunk a
                # boundary the joins and the leaves settle at a chunk each, and 50-token lines never filled more
                # than 16 x 50 / 4 = 200 decode rows (256 clients on an H200: ~185 of 256 slots decoding, ~28
                # lines queued -- and a step of 256 slots costs the same whatever the rows decoding). So the
                # slots fill under a deep queue, and the stall is one chunk's more than what left. (Mixed steps
                # chunk by tokens.)
                n = min(n, gen_chunk(gen) + self._left_last)
            taken = [self._queue.popleft() for _ in range(n)]
            self.metrics.queue_depth.set(len(self._queue))
            return taken

    def _arriving_locked(self) -> int:
        """Requests accepted but not yet queued, admitted or decoding: on their way through the preprocessing
        pool. One image per request assumed (a request's pages are queued together, so a multi-page request
        only makes this smaller: never a longer wait)."""
        return self.state.in_flight - len(self._queue) - len(self._admitting) - self.gen.occupancy()

    def _admit(self, taken: list[WorkItem]) -> None:
        """Prefill the live ones among *taken* into free slots."""
        now = time.monotonic()
        live = []
        for item in taken:
            if not item.future.set_running_or_notify_cancel():
                continue  # the client gave up (deadline) while it was queued
            if item.deadline <= now:
                _settle(item, exc=_deadline_error(item))
                continue
            item.started_at = now
            live.append(item)
        if live:
            self._admitting = live
            try:
                self._prefill(live)
            finally:
                self._admitting = []

    def _prefill(self, live: list[WorkItem]) -> None:
        import torch

        try:
            self._call(lambda: self._finish(self.gen.add([self._seq(i) for i in live])), len(live), prefill=True)
        except torch.cuda.OutOfMemoryError as exc:
            logger.error("CUDA out of memory in a prefill of %d images (requests %s): %s", len(live),
                         ",".join(sorted({i.request_id for i in live})), _first_line(exc))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(live) > 1:
                # One large image must not fail its batch-mates: retry each image alone.
                logger.warning("retrying the %d images of that batch one by one", len(live))
                for item in live:
                    if time.monotonic() > item.deadline:
                        _settle(item, exc=_deadline_error(item))
                    else:
                        self._prefill([item])
                return
            for item in live:
                _settle(item, exc=_prefill_error(exc, len(live)))
            return
        except Exception as exc:  # one prefill fails, the daemon keeps serving
            logger.exception("prefill failed for %d images", len(live))
            for item in live:
                _settle(item, exc=_prefill_error(exc, len(live)))
            return
        if self._serving:
            self.metrics.batch_size.observe(len(live))
            self.metrics.generate_seconds.observe(self.last_batch_s)
            self.state.count(batches=1)

    def _step(self) -> None:
        def stop(seq: Seq) -> bool:
            item: WorkItem = seq.tag
            return item.future.done() or time.monotonic() > item.deadline

        def join() -> None:
            # While the launched steps run on the GPU: newcomers' prefills are launched behind them (their
            # host-side launching overlaps the decoding instead of leaving the GPU idle after it).
            taken = self._take()
            if taken:
                self._admit(taken)

        def run() -> None:
            finished = self.gen.step(stop, during=join)
            self._left_last = len(finished)
            self._finish(finished)

        n = self.gen.occupancy()
        t0, tokens0 = time.monotonic(), self.gen.occupied_sum
        try:
            self._call(run, n, prefill=False)
            dt = time.monotonic() - t0
            if self._serving and dt > 0:
                self.metrics.tokens_per_second.set((self.gen.occupied_sum - tokens0) / dt)
        except Exception as exc:  # the running lines fail, the daemon keeps serving
            logger.exception("decoding failed for %d running lines", self.gen.occupancy())
            err = ApiError("internal", f"transcription failed: {_first_line(exc)}")
            for seq in self.gen.running():
                _settle(seq.tag, exc=err)
            self.gen.step(lambda s: True)  # frees every slot

    def _call(self, fn: Callable[[], Any], n: int, *, prefill: bool) -> None:
        """One model call, timed for the watchdog (a hung peer-to-peer copy blocks here as well)."""
        t0 = time.monotonic()
        outer = self.generate_started_at  # a prefill launched while decode steps run (Engine._step's join)
        self.generate_started_at = outer or t0
        self.metrics.generating.set(n)
        try:
            if prefill and self._serving:
                self._inject_faults()
            fn()
        finally:
            self.generate_started_at = outer
            self.metrics.generating.set(self.occupied())
        if prefill:
            self.last_batch_s = time.monotonic() - t0

    def _seq(self, item: WorkItem) -> Seq:
        return Seq(item.prepared, item.max_new_tokens, min(self.settings.generation.min_new_tokens,
                                                            item.max_new_tokens), tag=item)

    def _finish(self, finished: list[Finished]) -> None:
        now = time.monotonic()
        for f in finished:
            item: WorkItem = f.seq.tag
            if item.future.done():
                continue
            if f.error is not None:  # its prefill failed (mixed steps stage each line apart); the others go on
                _settle(item, exc=_prefill_error(f.error, 1))
                continue
            if f.stopped or now > item.deadline:
                _settle(item, exc=_deadline_error(item))
                continue
            ids = [t for t in f.token_ids if t not in self.gen.eos_ids][: item.max_new_tokens]
            gen_ms = f.prefill_ms + f.decode_ms
            queue_ms = (item.started_at - item.enqueued_at) * 1000.0
            pre_ms = item.prepared.preprocess_ms
            timings = Timings(queue_ms=queue_ms, preprocess_ms=pre_ms, generate_ms=gen_ms,
                              total_ms=pre_ms + queue_ms + gen_ms)
            result = PageResult(page=item.page, text=self.gen.decode(ids), tokens=len(ids), batch_size=f.group,
                                timings=timings)
            if _settle(item, result=result) and self._serving:
                self.metrics.generated_tokens.inc(len(ids))
                self.metrics.images.inc()
                self.state.count(images=1, generated_tokens=len(ids))
        self.heartbeat = now

    def _inject_faults(self) -> None:
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
            import torch

            raise torch.cuda.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 20.00 GiB (injected by HTR_TEST_FAULTS=oom)")

    # -- status -----------------------------------------------------------------------------------------------
    def slots_info(self) -> dict[str, Any]:
        gen = self.gen
        if gen is None:
            return {}
        steps = getattr(gen, "steps_run", 0)
        return {
            "generator": "fast" if self.fast else "plain",
            "slots": gen.slots,
            "slots_occupied": gen.occupancy(),
            "avg_occupied_slots": round(gen.occupied_sum / steps, 2) if steps else None,
            "decode_steps": steps,
            "decode_checks": getattr(gen, "step_calls", None),
            "turnaround_total_ms": (round(gen.turnaround_s * 1000.0, 3) if hasattr(gen, "turnaround_s") else None),
            "turnarounds": getattr(gen, "turnarounds", None),
            "occupied_slot_steps": gen.occupied_sum,
            "kv_cache_bytes": int(getattr(gen, "kv_cache_bytes", 0)),
            "decode_attention": gen.decode_attention if self.fast else None,
            "mlp_activation": gen.mlp_activation if self.fast else None,
            "preprocess_ms_per_image": self.preprocess_ms_per_image(),
            "preprocess_workers": self.cpu_workers,
            "preprocess_in": "threads" if self._procs is None else "processes",
            "preprocess_restarts": None if self._procs is None else self._procs.restarts,
            "prefill_layout": (("mixed" if gen.mixed else "packed") if gen.packed else "left-padded") if self.fast
            else None,
            "prefill_tokens_per_step": gen.prefill_budgets[-1] if self.fast and gen.mixed else None,
            "mixed_steps": getattr(gen, "mixed_steps", None),
            "prefill_waiting": len(gen._prefills) if self.fast and gen.mixed else None,
            "prefill_packed_graphs": len(getattr(gen, "_packed_graphs", ())),
            "prefill_graphs": len(getattr(gen, "_prefill_graphs", ())),
            "prefill_lm_graphs": len(getattr(gen, "_lm_graphs", ())),
            "prefill_vision_graphs": len(getattr(gen, "_vision_graphs", ())),
            "prefill_replays": getattr(gen, "prefill_replays", 0),
            "prefill_direct_capture_failures": getattr(gen, "direct_capture_failures", 0),
            "prefill_precaptured": getattr(gen, "precaptured", 0),
            "load_s": _rounded(self.load_s),
            "warmup_s": _rounded(self.warmup_s),
            "warmup_graphs": self.warmup_report.get("graphs"),
            "warmup_graphs_s": _rounded(self.warmup_report.get("graphs_s")),
        }

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


def _reset_default_dtype() -> None:
    """torch's default dtype back to float32 after the load, logged where it was not. It is process-wide, and two
    things change it beside each other while htrd loads: transformers sets the model's dtype (bfloat16) as the
    default while it builds the model, then restores it, and torch.compile (htrd-precompile, beside the load)
    restores at its end the default it saw at its start. A compilation that starts inside transformers' window
    and ends after it leaves bfloat16 as the default for good -- on an H200 with cold compile caches the start-up
    check of the Triton decode kernel then failed (its float32 reference met a bfloat16 mask) and htrd exited 1;
    elsewhere, tensors made without a dtype would silently be bfloat16."""
    import torch

    left = torch.get_default_dtype()
    if left != torch.float32:
        logger.warning("torch's default dtype was %s after the load (a compilation beside it restored the default "
                       "it saw while transformers built the model); reset to float32", str(left).removeprefix("torch."))
        torch.set_default_dtype(torch.float32)


@functools.cache
def _warmup_png() -> bytes:
    import io

    from .model import warmup_image

    buf = io.BytesIO()
    warmup_image().save(buf, format="PNG")
    return buf.getvalue()


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 2)


def gen_chunk(gen) -> int:
    return getattr(gen, "prefill_chunk", gen.slots)


def _settle(item: WorkItem, *, result: Any = None, exc: BaseException | None = None) -> bool:
    """Resolve *item*'s future once (a drain or the client may have settled it already); True if this did."""
    if item.future.done():
        return False
    try:
        if exc is not None:
            item.future.set_exception(exc)
        else:
            item.future.set_result(result)
        return True
    except InvalidStateError:
        return False


def _prefill_error(exc: BaseException, n: int) -> ApiError:
    """The error a request gets when the prefill of its *n* images failed with *exc*."""
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return ApiError("out_of_memory",
                        f"CUDA out of memory while transcribing a batch of {n} images; the daemon is still ready -- "
                        "retry, send smaller images, or lower limits.batch_sizes", detail={"batch_size": n})
    return ApiError("internal", f"transcription failed: {_first_line(exc)}")


def _deadline_error(item: WorkItem) -> ApiError:
    return ApiError("deadline_exceeded", "the request was not done within limits.request_deadline_s; retry later "
                    "or raise the limit", detail={"request_id": item.request_id})
