"""Preprocessing -- decoding a request's image and the processor's part (:class:`htrd.model.ImageEncoder`) --
in worker processes, off htrd's own interpreter.

Why processes: htrd's inference thread launches the GPU's work from Python, and every torch call it makes
lets go of the GIL and takes it back; preprocessing threads beside it hold the GIL for up to the switch
interval (5 ms) whenever they run Python. On H200 hosts under load an image took 40-70 ms to preprocess in
threads against ~3 ms alone (``bench/preprocess_contention.py`` shows the convoy on any machine); in processes
15-18 ms. Throughput moved less than that suggests (README: 1.02-1.11x at 64 clients, 0.94-1.02x at 256) --
the GIL was not what holds the GPU back -- and a decoder that crashes or hangs on a hostile file now takes
down a worker, not htrd. What crosses is the file's bytes one way and the patches (through shared memory) and
token ids the other.

A worker that dies (a decoder crashing on a hostile file, the OOM killer) -- or is killed by the hang watch,
an image in the pool past ``limits.preprocess_timeout_s`` -- breaks its pool: a new pool starts,
and every image the old one had in hand goes again, once, one at a time -- the file that crashes a decoder
then fails alone with ``internal``, and the images that were in the pool beside it are served.
``limits.preprocess_workers: 0`` keeps the preprocessing in threads of htrd's own process instead.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import select
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.shared_memory import SharedMemory
from typing import Any

from .api_errors import ApiError
from .images import ImageHeader, iter_pages

logger = logging.getLogger(__name__)

# Imported once by the fork server; each worker forks from it with them imported (a worker starts in ~0.1 s
# instead of importing torch and transformers anew, and shares their pages).
PRELOAD = ["torch", "transformers", "PIL.Image", "htrd.model", "htrd.images", "htrd.prepool"]
START_TIMEOUT_S = 120.0  # every worker up (the processor loaded, the warm-up image preprocessed)


def encode_pages(data: bytes, header: ImageHeader, encode: Callable[[Any], Any]) -> list[tuple[int, Any]]:
    """*encode* every page of the image *data* (read before as *header*), decoded one at a time: each decoded
    page is dropped once encoded. A geometry the model's image processor refuses is ``bad_image``."""
    out = []
    with contextlib.closing(iter_pages(data, header)) as pages:
        for page in pages:
            try:
                out.append((page.index, encode(page.image)))
            except ValueError as exc:  # the model's image processor refuses this geometry (e.g. smart_resize)
                w, h = page.image.size
                where = f" (page {page.index})" if page.index else ""
                raise ApiError("bad_image", f"the model cannot take this {w}x{h} image{where}: "
                               f"{str(exc).splitlines()[0][:200]}") from None
            del page
    return out


def default_workers(cores: int | None = None) -> int:
    """Half the cores, at most 8: an H200 host under 256 clients preprocesses ~60 lines/s at ~3 ms each, a
    fraction of one core; the rest of the cores stay with the HTTP layer and the inference thread (and on a
    CPU-only host with the model)."""
    cores = cores or os.cpu_count() or 1
    return max(1, min(8, cores // 2))


class PreprocessPool:
    """*workers* processes, each with its own :class:`htrd.model.ImageEncoder` for *model_dir* (patches in
    *dtype_name*), started by :meth:`start` (which waits until each has preprocessed the warm-up image
    *warm_png*). :meth:`submit` returns a future of ``[(page, Encoded)]``."""

    def __init__(self, model_dir: str, *, prompt: str, dtype_name: str, workers: int, one_cpu_thread: bool,
                 warm_png: bytes, timeout_s: float = 60.0) -> None:
        self.workers = workers
        self.timeout_s = timeout_s  # an image in the pool longer than this: its workers are killed (hung decoder)
        self._inflight: dict[Future, tuple[float, ProcessPoolExecutor]] = {}  # in a pool: since when, which pool
        self._killed: ProcessPoolExecutor | None = None  # the pool whose workers the hang watch killed last
        self._pings: list[Future] = []  # the current pool's start pings (_new)
        self._ready: float | None = None  # when they had all answered (_ready_at)
        self._deliver = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="htrd-pre-in")
        self._args = (str(model_dir), prompt, dtype_name, one_cpu_thread, warm_png, os.getpid())
        self._lock = threading.Lock()
        self._ex: ProcessPoolExecutor | None = None
        self._closed = False
        self._retries: deque = deque()  # (data, header, future) of images whose pool died, waiting to go again
        self._retrying = False  # one of them is in the pool
        self.restarts = 0

    def start(self) -> None:
        """Start the workers; raises what a worker's start raised (the processor cannot load...)."""
        with self._lock:
            self._ex = self._new()
            pings = self._pings
        for f in pings:
            f.result(timeout=START_TIMEOUT_S)
        threading.Thread(target=self._watch, name="htrd-pre-watch", daemon=True).start()

    def _new(self) -> ProcessPoolExecutor:
        """A pool, its workers starting: one ping a worker, ahead of any image (each submit while no worker is
        idle starts another, and they are busy starting); the hang watch counts an image's time from when they
        have all answered -- a pool started anew on a loaded host takes seconds to load its processors."""
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        ex = ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx, initializer=_init, initargs=self._args)
        self._pings, self._ready = [ex.submit(_ping) for _ in range(self.workers)], None
        return ex

    def _ready_at(self) -> float | None:
        """When every worker of the current pool had started (monotonic), or None while some are starting
        (called with the lock held)."""
        if self._ready is None and all(f.done() for f in self._pings):
            self._ready = time.monotonic()
        return self._ready

    def submit(self, data: bytes, header: ImageHeader) -> Future:
        """The pages of *data*, each an :class:`htrd.model.Encoded`, as ``[(page index, Encoded)]``; the
        future fails with the image's :class:`ApiError` (``bad_image``...) or, when workers died with it in
        the pool twice, ``internal``."""
        out: Future = Future()
        out.set_running_or_notify_cancel()
        self._submit(data, header, out, retry=False)
        return out

    def _submit(self, data: bytes, header: ImageHeader, out: Future, *, retry: bool) -> None:
        with self._lock:
            if self._closed or self._ex is None:
                out.set_exception(_stopping())
                if retry:
                    self._retrying = False
                return
            ex = self._ex
            try:
                inner = ex.submit(_work, data, header)
            except BrokenProcessPool:  # died since its last task: a new pool takes this one
                ex = self._ex = self._replace(ex)
                inner = ex.submit(_work, data, header)
            self._inflight[inner] = (time.monotonic(), ex)
        inner.add_done_callback(lambda f: self._done(f, out, ex, data, header, retry))

    def _done(self, f: Future, out: Future, ex: ProcessPoolExecutor, data: bytes, header: ImageHeader,
              retry: bool) -> None:
        with self._lock:
            self._inflight.pop(f, None)
        if f.cancelled():  # close(): htrd stops
            out.set_exception(_stopping())
            return
        try:
            result = f.result()
        except BrokenProcessPool:
            with self._lock:
                if self._ex is ex and not self._closed:
                    self._ex = self._replace(ex)
                if not retry:  # every image the pool held failed with it, whichever killed it: again, once
                    self._retries.append((data, header, out))
            if retry:
                out.set_exception(ApiError(
                    "internal", "preprocessing worker processes died or hung twice while this image was in their "
                    "pool (a decoder crash or hang on this file, most likely, or the OOM killer; see htrd's log)"))
        except BaseException as exc:  # noqa: BLE001 -- the caller's to report (the API logs it as internal)
            out.set_exception(exc)
        else:
            if isinstance(result, _Refused):
                out.set_exception(ApiError(result.type, result.message, status=result.status, detail=result.detail))
            else:  # the patches out of shared memory on a thread of htrd's: this one reads every worker's results
                self._deliver.submit(_deliver, result, out)
        if retry:
            with self._lock:
                self._retrying = False
        self._next_retry()

    def _next_retry(self) -> None:
        """Images that were in a pool that died go again one at a time: the file that crashes a worker then
        takes no other retried image down with it the second time."""
        with self._lock:
            if self._retrying or not self._retries:
                return
            self._retrying = True
            data, header, out = self._retries.popleft()
        self._submit(data, header, out, retry=True)

    def _watch(self) -> None:
        """The hang watch: an image in the pool for longer than ``timeout_s`` (a decoder looping on a hostile
        file) gets its pool's workers killed -- the pool breaks and is replaced as when a worker crashes, and
        its images go again one at a time, so the file that hangs is the one that fails."""
        while not self._closed:
            time.sleep(min(1.0, self.timeout_s / 4))
            now = time.monotonic()
            with self._lock:
                ex = self._ex
                ready = self._ready_at() if ex is not None else None
                if ready is None or ex is self._killed or self._closed:
                    continue
                if not any(now - max(t0, ready) > self.timeout_s for t0, e in self._inflight.values() if e is ex):
                    continue
                self._killed = ex
            logger.error("an image has been in the preprocessing pool for more than %g s (a decoder hanging on a "
                         "hostile file?): killing its worker processes", self.timeout_s)
            for proc in list((getattr(ex, "_processes", None) or {}).values()):  # pid -> Process (CPython)
                with contextlib.suppress(OSError, ValueError):
                    proc.kill()

    def _replace(self, ex: ProcessPoolExecutor) -> ProcessPoolExecutor:
        """A new pool for the broken *ex* (called with the lock held)."""
        logger.error("a preprocessing worker process died (a decoder crash on a hostile file, a hang, or the OOM "
                     "killer); a new pool of %d starts and the images the old one held go again, once",
                     self.workers)
        self.restarts += 1
        ex.shutdown(wait=False, cancel_futures=True)
        return self._new()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            ex, self._ex = self._ex, None
        if ex is not None:
            ex.shutdown(wait=False, cancel_futures=True)
        self._deliver.shutdown(wait=False)


def _stopping() -> ApiError:
    return ApiError("not_ready", "htrd is stopping; send the image again later", retry_after=1)


# -- in the worker processes -----------------------------------------------------------------------------------
_encoder = None
_crash_width = 0  # test fault crash_preprocess (htrd.faults): die on an image this wide
_hang_width = 0  # test fault hang_preprocess: never finish an image this wide


class _Refused:
    """An image's :class:`ApiError`, as it crosses back (plain fields: pickles whatever ApiError's signature)."""

    def __init__(self, err: ApiError) -> None:
        self.type, self.message, self.status, self.detail = err.type, err.message, err.status, err.detail


def _init(model_dir: str, prompt: str, dtype_name: str, one_cpu_thread: bool, warm_png: bytes, htrd_pid: int) -> None:
    global _encoder, _crash_width, _hang_width
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: htrd decides
    _exit_with(htrd_pid)
    import torch

    from .faults import ENV, Faults
    from .heap import freeze_loaded_heap
    from .images import read_header
    from .model import ImageEncoder, load_processor

    faults = Faults.parse(os.environ.get(ENV))
    if faults.fail_preprocess_start:
        raise RuntimeError("test fault fail_preprocess_start")
    _crash_width, _hang_width = faults.crash_preprocess_width, faults.hang_preprocess_width

    if one_cpu_thread:
        torch.set_num_threads(1)
    _encoder = ImageEncoder(load_processor(model_dir), prompt=prompt, dtype=getattr(torch, dtype_name),
                            one_cpu_thread=one_cpu_thread)
    t0 = time.perf_counter()
    encode_pages(warm_png, read_header(warm_png, max_pixels=1 << 30), _encoder.encode)  # decoders warm
    logger.debug("preprocessing worker %d ready (warm-up image %.0f ms)", os.getpid(),
                 (time.perf_counter() - t0) * 1000)
    freeze_loaded_heap(level=logging.DEBUG)  # the processor's heap: no full collection walks it again


def _exit_with(pid: int) -> None:
    """End this worker when htrd (*pid*) ends, however it ends. A pool's worker waits for its next task on a
    pipe it holds both ends of, so it would outlive a killed htrd (and keep the fork server alive) forever;
    under systemd the unit's cgroup goes with it anyway, elsewhere (a terminal, tests) this does it."""
    try:
        fd = os.pidfd_open(pid)  # Linux >= 5.3: readable once the process has exited
    except (AttributeError, OSError):
        fd = None

    def watch() -> None:
        if fd is not None:
            select.select([fd], [], [])
        else:
            while True:
                time.sleep(1.0)
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                except PermissionError:  # a pid taken by another user's process: htrd is gone
                    break
        os._exit(0)

    threading.Thread(target=watch, name="htrd-gone", daemon=True).start()


def _ping() -> int:
    return os.getpid()


def _work(data: bytes, header: ImageHeader):
    if _crash_width and any(w == _crash_width for w, _ in header.sizes):
        os._exit(70)  # test fault crash_preprocess
    if _hang_width and any(w == _hang_width for w, _ in header.sizes):
        threading.Event().wait()  # test fault hang_preprocess
    try:
        return [(page, _to_wire(enc)) for page, enc in encode_pages(data, header, _encoder.encode)]
    except ApiError as err:
        return _Refused(err)


def _deliver(result: list, out: Future) -> None:
    try:
        out.set_result([(page, _from_wire(wire)) for page, wire in result])
    except BaseException as exc:  # noqa: BLE001 -- for the request
        out.set_exception(exc)


# What crosses: token ids and the grid as numpy arrays (pickled by value), the patches (a few MB a line) through
# a shared-memory block the worker fills and htrd copies out and unlinks. Through the result pipe, a line's
# patches took ~40 reads of 64 KB in htrd's one thread that reads every worker's results, each taking the GIL
# back from the inference thread: under 256 clients on an H200 that thread was the bottleneck (47 lines/s
# against 63 with threads). Not torch's shared-memory tensors: a file descriptor each, kept by a worker that dies.
# Where the shared-memory tmpfs is small (a container's 64 MB /dev/shm and a full page's patches), by value.
def _to_wire(enc) -> tuple:
    return (_array(enc.input_ids), None if enc.mm_token_type_ids is None else _array(enc.mm_token_type_ids),
            _shared(enc.pixel_values), _array(enc.image_grid_thw), enc.preprocess_ms)


def _from_wire(wire: tuple):
    from .model import Encoded

    ids, mm, pixels, grid, ms = wire
    return Encoded(input_ids=_tensor(ids), mm_token_type_ids=None if mm is None else _tensor(mm),
                   pixel_values=_unshared(pixels), image_grid_thw=_tensor(grid), preprocess_ms=ms)


def _array(t) -> tuple:
    """(bytes as a uint8 array, dtype name, shape): any torch dtype, bfloat16 included (numpy has none)."""
    import torch

    t = t.contiguous()
    return t.view(-1).view(torch.uint8).numpy(), str(t.dtype).removeprefix("torch."), tuple(t.shape)


def _tensor(wire: tuple):
    import torch

    raw, dtype, shape = wire
    return torch.from_numpy(raw).view(getattr(torch, dtype)).view(shape)


SHM_DIR = "/dev/shm"  # where POSIX shared memory lives on Linux (a tmpfs; 64 MB in a default Docker container)


def _shm_room() -> int:
    """Bytes free in :data:`SHM_DIR` (0 when it cannot be read)."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def _shared(t) -> tuple:
    """*t* for the receiver: its bytes in a new shared-memory block, ``("shm", name, bytes, dtype, shape)`` (the
    receiver unlinks it) -- or, where the shared-memory tmpfs lacks room for twice the block, by value through the
    pipe, ``("inline", array, dtype, shape)``: a write past a full tmpfs would kill the worker (SIGBUS), and the
    file would fail as a crash."""
    import numpy as np

    raw, dtype, shape = _array(t)
    if raw.nbytes * 2 > _shm_room():
        return "inline", raw, dtype, shape
    try:
        shm = SharedMemory(create=True, size=max(1, raw.nbytes))
    except OSError:
        return "inline", raw, dtype, shape
    try:
        np.frombuffer(shm.buf, dtype=np.uint8, count=raw.nbytes)[:] = raw
    finally:
        shm.close()
    return "shm", shm.name, raw.nbytes, dtype, shape


def _unshared(wire: tuple):
    """The tensor :func:`_shared` sent: copied out of its block (then unlinked), or as it came."""
    import numpy as np
    import torch

    if wire[0] == "inline":
        return _tensor(wire[1:])
    _, name, nbytes, dtype, shape = wire
    shm = SharedMemory(name=name)
    try:
        out = torch.empty((nbytes,), dtype=torch.uint8)
        view = np.frombuffer(shm.buf, dtype=np.uint8, count=nbytes)
        out.copy_(torch.from_numpy(view))
        del view
    finally:
        shm.close()
        shm.unlink()
    return out.view(getattr(torch, dtype)).view(shape)
