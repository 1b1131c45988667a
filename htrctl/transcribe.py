"""The library behind ``htrctl transcribe``: many images through one or more daemons.

- Inputs: files, directories (recursive; ``include``/``exclude`` globs), ``-``
  for stdin. A multi-page TIFF gives one result per page (the daemon splits it).
- Outputs: with ``out_dir`` one file per input (``<relative name>.<fmt>``),
  each written atomically (temp file in the same directory, fsync, rename);
  otherwise records on stdout (``jsonl`` streams one record per page as it
  completes; ``json`` one array at the end; ``txt`` the text).
- ``concurrency`` worker threads per socket keep the daemon's batches full
  (default: twice the daemon's largest batch size, read from its status: one
  batch generating while the next one queues); several sockets (one ``htrd``
  replica per GPU) share one work queue.
- A daemon that restarts mid-run (socket gone, connection refused or reset,
  503 not_ready / queue_full) is retried with bounded exponential backoff for up
  to ``retry_for`` seconds; the item goes back to the shared queue, so another
  replica may take it. Per-file errors (4xx: not an image, too large...) are
  reported with the daemon's message and the run continues.
- ``resume`` skips inputs whose output file exists (a file exists only once
  complete). Ctrl-C / SIGTERM stop the workers, wait for a write in progress and
  remove temp files: only complete outputs remain. Each output is written once.
- A summary at the end on stderr; :attr:`RunSummary.exit_code` is 0, or
  :data:`~htrctl.errors.ExitCode.PARTIAL` (4) when some inputs failed.
"""

from __future__ import annotations

import collections
import fnmatch
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from . import archival
from .atomicfile import write_atomic
from . import protocol as P
from .client import HtrClient, is_retryable
from .errors import ArchivalError, DaemonError, DaemonPermissionError, ExitCode, HtrError, UsageError, from_os_error

logger = logging.getLogger(__name__)

Format = Literal["txt", "jsonl", "json", "page", "alto"]
FORMATS = ("txt", "jsonl", "json", "page", "alto")
XML_FORMATS = ("page", "alto")  # a PAGE/ALTO file around each image's text (``<name>.xml``)
DEFAULT_INCLUDE = ("*.png", "*.jpg", "*.jpeg", "*.tif", "*.tiff", "*.webp")  # what htrd decodes (protocol)
TEMP_SUFFIX = ".htr-part"
AUTO_CONCURRENCY_MAX = 512  # requests in flight per socket at most (auto): twice 256 slots
PLAIN_PROGRESS_S = 30.0
STDIN = "-"


# --------------------------------------------------------------------------- inputs
@dataclass
class InputItem:
    """One input image (file or stdin) and the relative name of its output."""

    index: int
    display: str  # as shown to the user and in records
    rel: str  # posix relative path the output is named after
    path: Path | None = None  # None for stdin
    data: bytes | None = None  # stdin's bytes (read once)
    attempts: int = 0
    job: archival.PageJob | None = None  # a PAGE/ALTO input: its lines, cut out (htrctl.archival)

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.path is not None
        return self.path.read_bytes()


def _matches(rel: str, patterns: tuple[str, ...] | list[str]) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(name, p) for p in patterns)


def discover_inputs(
    paths: list[str],
    *,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    skip_dirs: list[Path] | None = None,
    stdin: IO[bytes] | None = None,
) -> tuple[list[InputItem], list[tuple[str, str]]]:
    """Expand *paths* into input items (sorted within directories).

    Returns ``(items, missing)`` where *missing* lists ``(path, reason)`` for
    arguments that do not exist (reported per file; the rest go on).
    Raises :class:`UsageError` when two inputs would write the same output.
    """
    inc = tuple(include) if include else DEFAULT_INCLUDE
    exc = tuple(exclude or ())
    skip = [p.resolve() for p in (skip_dirs or [])]
    items: list[InputItem] = []
    missing: list[tuple[str, str]] = []
    owner: dict[str, str] = {}

    def add(display: str, rel: str, path: Path | None = None, data: bytes | None = None) -> None:
        if rel in owner:
            raise UsageError(
                f"inputs {owner[rel]} and {display} would write the same output '{rel}'",
                remedy="transcribe them in separate runs or into separate --out directories",
            )
        owner[rel] = display
        items.append(InputItem(len(items), display, rel, path, data))

    for arg in paths:
        if arg == STDIN:
            src = stdin if stdin is not None else sys.stdin.buffer
            add("-", "stdin", data=src.read())
            continue
        p = Path(arg)
        if p.is_dir():
            found = []
            for dirpath, dirnames, filenames in os.walk(p):
                d = Path(dirpath)
                dirnames[:] = sorted(
                    n for n in dirnames if not n.startswith(".") and (d / n).resolve() not in skip
                )
                for n in filenames:
                    if n.startswith("."):
                        continue
                    rel = (d / n).relative_to(p).as_posix()
                    if _matches(rel, inc) and not _matches(rel, exc):
                        found.append(rel)
            for rel in sorted(found):
                add(str(p / rel), rel, path=p / rel)
        elif p.is_file():
            if exc and _matches(p.name, exc):
                continue
            add(str(p), p.name, path=p)
        else:
            missing.append((arg, "no such file or directory"))
    return items, missing


# --------------------------------------------------------------------------- outputs
def output_path(out_dir: Path, item: InputItem, fmt: str) -> Path:
    """``<out_dir>/<relative input name>.<fmt>`` (the full input name is kept: no collisions); a PAGE/ALTO
    input is written back under its own name."""
    if archival.is_xml(item.rel):
        return out_dir / item.rel
    return out_dir / f"{item.rel}.{'xml' if fmt in XML_FORMATS else fmt}"


def atomic_write(path: Path, data: bytes) -> None:
    """Write one output atomically (see htrctl.atomicfile); its temp name ends in TEMP_SUFFIX."""
    write_atomic(path, data, suffix=TEMP_SUFFIX)


def remove_stale_temps(out_dir: Path, outputs: set[Path] | None = None) -> int:
    """Remove temp files a killed run left behind (they are never complete outputs).

    With *outputs*, only the temp files of those outputs: runs that share the directory (the
    shards of one collection, array tasks) never remove each other's writes in progress.
    """
    n = 0
    if out_dir.is_dir():
        for p in out_dir.rglob(f".*{TEMP_SUFFIX}"):
            # ".<output name>.<pid>.<random>.htr-part" -> "<output name>"
            if outputs is not None and p.with_name(p.name[1:-len(TEMP_SUFFIX)].rsplit(".", 2)[0]) not in outputs:
                continue
            p.unlink(missing_ok=True)
            n += 1
    return n


def page_records(item: InputItem, resp: P.TranscribeResponse, client_ms: float) -> list[dict[str, Any]]:
    """One record per page: input path, page, text, timings, model digest."""
    return [
        {
            "input": item.display,
            "page": r.page,
            "text": r.text,
            "tokens": r.tokens,
            "batch_size": r.batch_size,
            "timings": r.timings.model_dump(),
            "client_ms": round(client_ms, 1),
            "model_digest": resp.model_digest,
            "request_id": resp.request_id,
        }
        for r in resp.results
    ]


def input_record(item: InputItem, resp: P.TranscribeResponse, client_ms: float) -> dict[str, Any]:
    """One record per input (``--format json``)."""
    return {
        "input": item.display,
        "model_digest": resp.model_digest,
        "request_id": resp.request_id,
        "client_ms": round(client_ms, 1),
        "pages": [r.model_dump() for r in resp.results],
    }


def plain_text(item: InputItem, resp: P.TranscribeResponse) -> str:
    """``-f txt`` on stdout: an image's pages separated by a form feed line; a PAGE/ALTO file's lines in order."""
    if item.job is not None:
        return "".join(r.text + "\n" for r in resp.results)
    return "\f\n".join(r.text + "\n" for r in resp.results)


def render_file(item: InputItem, resp: P.TranscribeResponse, client_ms: float, fmt: str) -> bytes:
    """The content of one output file."""
    if item.job is not None:
        return item.job.render(resp)
    if fmt in XML_FORMATS:
        return archival.whole_image_document(fmt, item.display, item.read(), resp)
    if fmt == "txt":
        # Pages of a multi-page TIFF are separated by a form feed (as pdftotext does).
        return ("\f\n".join(r.text + "\n" for r in resp.results)).encode()
    if fmt == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in page_records(item, resp, client_ms)).encode()
    return (json.dumps(input_record(item, resp, client_ms), ensure_ascii=False, indent=2) + "\n").encode()


# --------------------------------------------------------------------------- the run
@dataclass
class TranscribeOptions:
    inputs: list[str]
    sockets: list[Path]
    fmt: Format = "jsonl"
    out_dir: Path | None = None
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    concurrency: int = 0  # requests in flight per socket; 0: twice the daemon's largest batch size
    timeout: float = 120.0  # per request
    # wait this long for readiness at the start; None: as long as retry_for while the daemon loads (not when down)
    wait: float | None = None
    retry_for: float = 120.0  # keep retrying a restarting daemon this long
    resume: bool = False
    max_new_tokens: int | None = None
    shard: Any = None  # a htrctl.shard.Shard: only this part of the sorted input list
    progress: bool = True  # a progress bar when stderr is a terminal
    quiet: bool = False
    images_dir: Path | None = None  # PAGE/ALTO inputs: where their page images are (else beside the XML)
    replace: bool = False  # PAGE/ALTO inputs: recognise lines that already have a text too, replacing it
    in_place: bool = False  # PAGE/ALTO inputs: write the texts into the input files themselves


@dataclass
class RunSummary:
    total: int = 0
    done: int = 0
    skipped: int = 0
    failed: int = 0
    pages: int = 0
    retries: int = 0
    elapsed_s: float = 0.0
    interrupted: bool = False
    failures: list[dict[str, str]] = field(default_factory=list)
    not_done: int = 0
    completed: list[str] = field(default_factory=list)  # relative names of the inputs this run wrote
    results: list[dict[str, Any]] = field(default_factory=list)  # in-memory records (library use, json)

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return int(ExitCode.INTERRUPTED)
        return int(ExitCode.PARTIAL) if (self.failed or self.not_done) else int(ExitCode.OK)

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total, "done": self.done, "skipped": self.skipped, "failed": self.failed,
            "not_done": self.not_done, "pages": self.pages, "retries": self.retries,
            "elapsed_s": round(self.elapsed_s, 3), "interrupted": self.interrupted,
            "failures": self.failures, "exit_code": self.exit_code,
        }

    def line(self) -> str:
        rate = self.done / self.elapsed_s if self.elapsed_s > 0 else 0.0
        parts = [f"transcribed {self.done} of {self.total} inputs ({self.pages} pages) in {self.elapsed_s:.1f} s"
                 f" ({rate:.1f}/s)"]
        if self.skipped:
            parts.append(f"{self.skipped} already done (--resume)")
        if self.failed:
            parts.append(f"{self.failed} failed")
        if self.not_done:
            parts.append(f"{self.not_done} not attempted")
        if self.retries:
            parts.append(f"{self.retries} retries")
        return "; ".join(parts)


class _Backoff:
    """Bounded exponential backoff: 0.1, 0.2, 0.4 ... up to ``cap`` seconds."""

    def __init__(self, first: float = 0.1, cap: float = 5.0) -> None:
        self.first, self.cap, self.next = first, cap, first

    def step(self, hint: float | None = None) -> float:
        delay = self.next if hint is None else min(max(hint, self.next), self.cap)
        self.next = min(self.next * 2, self.cap)
        return delay

    def reset(self) -> None:
        self.next = self.first


class _Replica:
    def __init__(self, client: HtrClient) -> None:
        self.client = client
        self.down_since: float | None = None
        self.dead = False
        self.backoff = _Backoff()
        self.lock = threading.Lock()
        self.manifest_digest: str | None = None  # for records when the daemon's answer lacks model_digest
        self.batch_sizes: list[int] = []
        self.queue_capacity = 0

    def refresh_status(self) -> None:
        try:
            st = self.client.status()
        except DaemonError as exc:
            logger.debug("status of %s: %s", self.client.socket_path, exc)
            return
        self.manifest_digest = st.manifest_digest
        self.batch_sizes = list(st.batch_sizes)
        self.queue_capacity = st.queue_capacity

    def workers(self, concurrency: int) -> int:
        """*concurrency*, or (0: auto) twice the daemon's largest batch: one batch generating, the next queued
        (no more than one batch plus its queue holds: more would only be refused with queue_full)."""
        if concurrency > 0:
            return concurrency
        biggest = max(self.batch_sizes or [4])
        cap = biggest + self.queue_capacity if self.queue_capacity else AUTO_CONCURRENCY_MAX
        return min(max(2 * biggest, 2), cap, AUTO_CONCURRENCY_MAX)


def worker_plan(capacities: list[int], n_todo: int) -> list[int]:
    """The replica of each worker thread, in start order: round-robin over the replicas, each at most its
    capacity (requests in flight) and its share of the inputs. All workers pull from one queue, so with the
    first replica's workers started first a run of fewer inputs than its capacity went to it alone (6 lines
    over two GPUs: 6 and 0); now they spread (3 and 3), and a replica that is down leaves its share to the
    others' workers."""
    share = max(1, -(-n_todo // max(1, len(capacities))))
    counts = [max(1, min(c, share)) for c in capacities]
    return [i for j in range(max(counts, default=0)) for i, c in enumerate(counts) if j < c]


def _without_name(exc: HtrError, item: InputItem) -> str:
    """An archival error's line without the file name it starts with (the failure line names the input)."""
    msg = exc.one_line()
    return msg[len(item.display) + 2:] if msg.startswith(item.display + ": ") else msg


class Transcriber:
    """One run of ``htrctl transcribe`` (see the module docstring)."""

    def __init__(self, opts: TranscribeOptions, *, stdout: IO[str] | None = None, stderr: IO[str] | None = None,
                 collect: bool = False) -> None:
        if not opts.sockets:
            raise UsageError("no daemon socket given", remedy="pass --socket PATH or set socket.path in the config")
        if opts.resume and opts.out_dir is None:
            raise UsageError("--resume needs --out DIR (it skips inputs whose output file is complete)")
        if opts.fmt not in FORMATS:
            raise UsageError(f"unknown format {opts.fmt!r} (allowed: {', '.join(FORMATS)})")
        if opts.in_place and (opts.out_dir is not None or opts.resume):
            raise UsageError("--in-place writes into the PAGE/ALTO inputs themselves: not with --out or --resume")
        if opts.fmt in XML_FORMATS and opts.out_dir is None:
            raise UsageError(f"--format {opts.fmt} writes one file per image: it needs --out DIR")
        self.opts = opts
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        self.collect = collect or (opts.fmt == "json" and opts.out_dir is None)
        self.summary = RunSummary()
        self._queue: collections.deque[InputItem] = collections.deque()
        self._cond = threading.Condition()
        self._in_flight = 0
        self._stop = threading.Event()
        self._write_lock = threading.Lock()
        self._fatal: HtrError | None = None
        self._owned: set[Path] | None = None  # this run's output paths (its temp files are its own)
        self._progress = None
        self._task = None
        self._started = 0.0
        # -f txt on stdout: texts in input order (a completed input waits for the ones before it)
        self._txt_next = 0
        self._txt_pending: dict[int, str | None] = {}
        self._last_line = 0.0  # the last plain progress line (stderr not a terminal)
        self._n_todo, self._plain_progress = 0, False

    # -- diagnostics -----------------------------------------------------
    def _note(self, msg: str, *, always: bool = False) -> None:
        if self.opts.quiet and not always:
            return
        if self._progress is not None:
            self._progress.console.print(msg, markup=False, highlight=False, soft_wrap=True)
        else:
            self.stderr.write(msg + "\n")
            self.stderr.flush()

    # -- work queue --------------------------------------------------------
    def _take(self) -> InputItem | None:
        with self._cond:
            while True:
                if self._stop.is_set():
                    return None
                if self._queue:
                    self._in_flight += 1
                    return self._queue.popleft()
                if self._in_flight == 0:
                    return None
                self._cond.wait(0.5)

    def _release(self, item: InputItem, *, requeue: bool) -> None:
        with self._cond:
            self._in_flight -= 1
            if requeue:
                self._queue.appendleft(item)
            self._cond.notify_all()

    # -- results -----------------------------------------------------------
    def _advance(self) -> None:
        s = self.summary
        elapsed = max(time.monotonic() - self._started, 1e-6)
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=s.done + s.failed, rate=s.done / elapsed, failed=s.failed)
        elif self._plain_progress:  # stderr is not a terminal (cron, journal): a line every 10 % or 30 s
            n, total = s.done + s.failed, self._n_todo
            now = time.monotonic()
            step = max(total // 10, 1)
            if n < total and (n % step == 0 or now - self._last_line >= PLAIN_PROGRESS_S):
                self._last_line = now
                rate = s.done / elapsed
                eta = f", about {(total - n) / rate:.0f} s left" if rate > 0 else ""
                self._note(f"htrctl: {n} of {total} done ({s.failed} failed), {rate:.1f} images/s{eta}")

    def _complete(self, item: InputItem, resp: P.TranscribeResponse, client_ms: float) -> None:
        o = self.opts
        with self._write_lock:
            if self._stop.is_set() and self.summary.interrupted:
                return  # interrupted: no new output after Ctrl-C
            if o.in_place and item.job is not None and item.path is not None:
                atomic_write(item.path, render_file(item, resp, client_ms, o.fmt))
            elif o.out_dir is not None:
                atomic_write(output_path(o.out_dir, item, o.fmt), render_file(item, resp, client_ms, o.fmt))
            elif o.fmt == "jsonl":
                for rec in page_records(item, resp, client_ms):
                    self.stdout.write(json.dumps(rec, ensure_ascii=False) + "\n")
                self.stdout.flush()
            elif o.fmt == "txt":
                self._txt_put(item.index, plain_text(item, resp))
            if self.collect:
                rec = input_record(item, resp, client_ms)
                rec["_index"] = item.index
                self.summary.results.append(rec)
            self.summary.done += 1
            self.summary.completed.append(item.rel)
            self.summary.pages += len(resp.results) if item.job is None else 1  # a PAGE/ALTO file: one page
            self._advance()

    def _txt_put(self, index: int, text: str | None, *, flush_all: bool = False) -> None:
        """``-f txt`` on stdout: write texts in input order, pages and inputs separated by a form feed."""
        if not flush_all:
            self._txt_pending[index] = text
        while self._txt_pending and (flush_all or self._txt_next in self._txt_pending):
            nxt = self._txt_next if self._txt_next in self._txt_pending else min(self._txt_pending)
            text = self._txt_pending.pop(nxt)
            self._txt_next = nxt + 1
            if text is not None:
                self.stdout.write(("\f\n" if self._txt_written else "") + text)
                self._txt_written = True
        self.stdout.flush()

    _txt_written = False

    def _fail(self, item: InputItem, message: str, etype: str = "error") -> None:
        with self._write_lock:
            self.summary.failed += 1
            self.summary.failures.append({"input": item.display, "type": etype, "message": message})
            if self.opts.out_dir is None and self.opts.fmt == "jsonl":
                self.stdout.write(json.dumps({"input": item.display, "error": {"type": etype, "message": message}},
                                             ensure_ascii=False) + "\n")
                self.stdout.flush()
            if self.collect:
                self.summary.results.append({"_index": item.index, "input": item.display,
                                             "error": {"type": etype, "message": message}})
            if self.opts.out_dir is None and self.opts.fmt == "txt" and item.index >= 0:
                self._txt_put(item.index, None)
            self._advance()
        self._note(f"htrctl: {item.display}: {message}", always=True)

    def _set_fatal(self, exc: HtrError) -> None:
        with self._cond:
            if self._fatal is None:
                self._fatal = exc
            self._stop.set()
            self._cond.notify_all()

    # -- one worker thread -------------------------------------------------
    def _worker(self, replica: _Replica) -> None:
        try:
            self._work(replica)
        except OSError as exc:  # an output cannot be written (disk full, stdout closed): the run ends with it
            where = None if exc.filename else ("stdout" if self.opts.out_dir is None else str(self.opts.out_dir))
            self._set_fatal(from_os_error(exc, target=where))

    def _work(self, replica: _Replica) -> None:
        o = self.opts
        while True:
            if replica.dead:
                return
            item = self._take()
            if item is None:
                return
            try:
                data = item.read()
                if item.job is None and archival.is_xml(item.rel):
                    item.job = archival.prepare(data, name=item.display, xml_path=item.path,
                                                images_dir=o.images_dir, replace=o.replace)
                    for w in item.job.doc.warnings:
                        self._note(f"htrctl: {item.display}: warning: {w}")
            except OSError as exc:
                self._release(item, requeue=False)
                self._fail(item, f"cannot read: {exc.strerror or exc}", "unreadable")
                continue
            except HtrError as exc:  # a PAGE/ALTO file that cannot be used (or the archival extra missing)
                self._release(item, requeue=False)
                self._fail(item, _without_name(exc, item), "archival")
                continue
            t0 = time.monotonic()
            try:
                if item.job is not None:
                    resp = item.job.send(replica.client, timeout=o.timeout, max_new_tokens=o.max_new_tokens)
                else:
                    resp = replica.client.transcribe(data, timeout=o.timeout, max_new_tokens=o.max_new_tokens)
            except DaemonPermissionError as exc:
                self._release(item, requeue=True)
                self._set_fatal(exc)
                return
            except DaemonError as exc:
                if not is_retryable(exc):
                    self._release(item, requeue=False)
                    info = exc.detail if isinstance(exc.detail, dict) else {}
                    self._fail(item, exc.message, str(info.get("type") or exc.kind))
                    continue
                self._release(item, requeue=True)
                if not self._retry_wait(replica, exc):
                    return
                continue
            except ArchivalError as exc:  # a line of a PAGE/ALTO page refused by the daemon
                item.job = None
                self._release(item, requeue=False)
                self._fail(item, _without_name(exc, item), "archival")
                continue
            except Exception as exc:  # noqa: BLE001 -- one bad answer must not stop the run
                logger.debug("unexpected error on %s", item.display, exc_info=True)
                self._release(item, requeue=False)
                self._fail(item, f"unexpected error: {type(exc).__name__}: {exc}", "internal")
                continue
            with replica.lock:
                # Only a request sent after the outage began proves the daemon is back: one that was
                # already in flight (finished while draining) says nothing about the restart.
                came_back = replica.down_since is not None and t0 > replica.down_since
                if came_back:
                    replica.down_since = None
                    replica.backoff.reset()
            if came_back:
                self._note(f"htrctl: {replica.client.socket_path}: daemon is back, continuing")
                replica.refresh_status()
            if resp.model_digest is None:
                resp.model_digest = replica.manifest_digest
            try:
                self._complete(item, resp, (time.monotonic() - t0) * 1000.0)
            except ArchivalError as exc:  # a PAGE/ALTO answer that cannot be written back
                self._fail(item, _without_name(exc, item), "archival")
            except OSError as exc:  # the output cannot be written (disk full, permissions): that input failed
                if o.out_dir is None and not (o.in_place and item.job is not None):
                    raise  # stdout itself (full, or its reader gone): the run ends with one line (_worker)
                self._fail(item, f"cannot write the output: {exc.strerror or exc}", "unwritable")
            item.job = None  # a page's tree and line images are not kept for the rest of the run
            self._release(item, requeue=False)

    def _retry_wait(self, replica: _Replica, exc: DaemonError) -> bool:
        """Back off after a retryable failure; False when this replica is given up."""
        now = time.monotonic()
        with replica.lock:
            first = replica.down_since is None
            if first:
                replica.down_since = now
            down_for = now - replica.down_since
            hint = (exc.detail or {}).get("retry_after") if isinstance(exc.detail, dict) else None
            delay = replica.backoff.step(hint)
        with self._write_lock:
            self.summary.retries += 1
        if first:
            self._note(f"htrctl: {replica.client.socket_path}: {exc.message}; retrying for up to "
                       f"{self.opts.retry_for:g} s")
        if down_for > self.opts.retry_for:
            with replica.lock:
                if not replica.dead:
                    replica.dead = True
                    self._note(f"htrctl: {replica.client.socket_path}: giving up after {down_for:.0f} s")
            if all(r.dead for r in self._replicas):
                exc.remedy = (exc.remedy + "; " if exc.remedy else "") + "then rerun with --resume"
                self._set_fatal(exc)
            return False
        return not self._stop.wait(delay)

    # -- the run -------------------------------------------------------------
    def _preflight(self) -> None:
        errors: list[DaemonError] = []
        # Default: a daemon that is loading is waited for as long as a restart mid-run would be retried.
        wait = self.opts.retry_for if self.opts.wait is None else self.opts.wait
        for r in self._replicas:
            shown: list[str] = []

            def on_state(state: str, _r=r, _shown=shown) -> None:
                if state != P.READY and wait > 0:
                    self._note(f"htrctl: {_r.client.socket_path}: daemon state: {state}; waiting up to "
                               f"{wait:g} s")
                _shown.append(state)

            try:
                r.client.wait_ready(wait, on_state=on_state, stop=self._stop, wait_if_down=self.opts.wait is not None)
                r.refresh_status()
            except DaemonError as exc:
                errors.append(exc)
                r.down_since = time.monotonic()
        if len(errors) == len(self._replicas):
            perm = [e for e in errors if isinstance(e, DaemonPermissionError)]
            raise (perm or errors)[0]
        for e in errors:
            self._note(f"htrctl: warning: {e.one_line()} (continuing with the other sockets)")

    def run(self) -> RunSummary:
        o = self.opts
        s = self.summary
        skip_dirs = [o.out_dir] if o.out_dir is not None else []
        items, missing = discover_inputs(o.inputs, include=o.include, exclude=o.exclude, skip_dirs=skip_dirs)
        if not items and not missing:
            raise UsageError(
                f"no images found in {', '.join(o.inputs)}",
                remedy=f"the default --include is {' '.join(DEFAULT_INCLUDE)}",
            )
        if o.shard is not None:
            from .shard import names_digest, shard_inputs

            every = names_digest([it.rel for it in items]), len(items)
            items, missing = shard_inputs(o.shard, items, missing)
            self._note(f"htrctl: shard {o.shard}: {len(items)} of {every[1]} inputs (input list {every[0]})")
        s.total = len(items) + len(missing)
        self._started = time.monotonic()
        if o.out_dir is not None:
            o.out_dir.mkdir(parents=True, exist_ok=True)
            self._owned = {output_path(o.out_dir, it, o.fmt) for it in items}
            stale = remove_stale_temps(o.out_dir, self._owned)
            if stale:
                self._note(f"htrctl: removed {stale} incomplete temp file(s) of an interrupted run")
        todo = []
        for it in items:
            if o.resume and o.out_dir is not None and output_path(o.out_dir, it, o.fmt).is_file():
                s.skipped += 1
            else:
                todo.append(it)
        for arg, why in missing:
            self._fail(InputItem(-1, arg, arg), why, "missing")
        pool = o.concurrency if o.concurrency > 0 else AUTO_CONCURRENCY_MAX
        self._replicas = [_Replica(HtrClient(sock, timeout=o.timeout, max_connections=pool)) for sock in o.sockets]
        old_term = None
        if threading.current_thread() is threading.main_thread():
            old_term = signal.signal(signal.SIGTERM, lambda *_: self._stop.set())  # the main loop acts on it
        try:
            if todo:
                self._preflight()
            self._queue.extend(todo)
            self._run_workers(len(todo))
        except KeyboardInterrupt:
            self._interrupt()
        finally:
            if old_term is not None:
                signal.signal(signal.SIGTERM, old_term)
            for r in self._replicas:
                r.client.close()
            s.elapsed_s = time.monotonic() - self._started
        with self._cond:
            s.not_done = len(self._queue)
        self._finish()
        return s

    def _run_workers(self, n_todo: int) -> None:
        from contextlib import nullcontext

        show = self.opts.progress and not self.opts.quiet and n_todo > 1
        progress = self._make_progress() if show else None
        self._n_todo, self._plain_progress = n_todo, show and progress is None
        with progress if progress is not None else nullcontext():
            if progress is not None:
                self._progress = progress
                self._task = progress.add_task("transcribing", total=n_todo, rate=0.0, failed=0)
            plan = worker_plan([r.workers(self.opts.concurrency) for r in self._replicas], n_todo)
            threads = [
                threading.Thread(target=self._worker, args=(self._replicas[i],), name=f"htr-worker-{i}-{j}",
                                 daemon=True)
                for j, i in enumerate(plan)
            ]
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                for t in threads:
                    t.join(0.1)
                if self._stop.is_set() and self._fatal is None:
                    raise KeyboardInterrupt  # SIGTERM
            self._progress = None

    def _make_progress(self):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        console = Console(file=self.stderr)
        if not console.is_terminal:
            return None
        return Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:.1f} img/s"), TextColumn("ETA"), TimeRemainingColumn(),
            TextColumn("{task.fields[failed]} failed"), console=console, transient=True,
        )

    def _interrupt(self) -> None:
        """Ctrl-C: stop taking work; wait for a write in progress; leave only complete outputs."""
        self.summary.interrupted = True
        self._stop.set()
        self._write_lock.acquire()  # held until exit: no output starts after this point
        if self.opts.out_dir is not None:
            remove_stale_temps(self.opts.out_dir, self._owned)
        with self._cond:
            self.summary.not_done = len(self._queue) + self._in_flight

    def _finish(self) -> None:
        s = self.summary
        if self._txt_pending:  # inputs before these never completed: what is done is still written, in order
            self._txt_put(-1, None, flush_all=True)
        if self.collect:
            s.results.sort(key=lambda r: r["_index"])
            for r in s.results:
                r.pop("_index", None)
        if self.opts.fmt == "json" and self.opts.out_dir is None:
            self.stdout.write(json.dumps(s.results, ensure_ascii=False, indent=2) + "\n")
            self.stdout.flush()
        if s.interrupted:
            s.not_done = s.total - s.done - s.failed - s.skipped
            self._note(f"htrctl: interrupted: {s.line()}"
                       + ("; rerun with --resume to finish" if self.opts.out_dir is not None else ""), always=True)
            return  # exit_code says 130; only complete outputs exist
        if self._fatal is None or not self._fatal.quiet:  # stdout's reader went away: end quietly
            self._note(f"htrctl: {s.line()}", always=bool(s.failed or self._fatal))
        if self._fatal is not None:
            s.not_done = s.total - s.done - s.failed - s.skipped
            raise self._fatal


def run_transcribe(opts: TranscribeOptions, **kw: Any) -> RunSummary:
    """Run one transcription job (see :class:`Transcriber`)."""
    return Transcriber(opts, **kw).run()
