"""Locking and staging a local DEST: the lock next to it, the journal that lets a run resume, copying and
hashing in one pass, and the swap that publishes the staging tree."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from ..atomicfile import fsync_dir
from ..errors import LockedError, ProvisionError
from ..manifest import (
    CHUNK,
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    ManifestFormatError,
    byte_progress,
    hash_files,
    read_manifest,
)
from .plan import PlanFile
from .result import Action, ProvisionResult

logger = logging.getLogger(__name__)

COPY_WORKERS = 4


class DestLock:
    """An exclusive flock on ``<parent>/.<name>.htr-lock``, removed again when released.

    The holder unlinks the file before it unlocks; a process that opened the
    same file meanwhile gets the lock on an unlinked inode, sees that the path
    no longer names its file, and starts over on a new one (no unlink races,
    and no lock files left behind DEST).
    """

    def __init__(self, dest: Path) -> None:
        self.path = dest.parent / f".{dest.name}.htr-lock"
        self.fd: int | None = None

    def __enter__(self) -> "DestLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise LockedError(f"{self.path.parent / self.path.name[1:-9]} is being provisioned by another "
                                  f"process (pid {holder})", remedy="wait for it to finish, or stop that process") from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the previous holder removed it after we opened it: take a fresh one
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.path)  # still locked: whoever opened it meanwhile starts over
            except FileNotFoundError:
                pass
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


class Journal:
    """Append-only record of staged files, so an interrupted run resumes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: dict[str, dict[str, Any]] = {}
        self.started: dict[str, dict[str, Any]] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a torn last line
                (self.done if rec.get("event") == "done" else self.started)[rec["rel"]] = rec
        self._lock = threading.Lock()
        self._f = open(path, "a")

    def record(self, event: str, rel: str, **kw: Any) -> None:
        with self._lock:
            self._f.write(json.dumps({"event": event, "rel": rel, **kw}) + "\n")
            self._f.flush()
            os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


def _copy_hash(src: Path, dst: Path, advance: Callable[[int], None], resume_from_part: bool) -> tuple[str, int]:
    """Copy *src* to *dst* through ``dst.htr-part``, hashing in the same pass; returns (sha256, bytes written)."""
    part = dst.with_name(dst.name + ".htr-part")
    dst.parent.mkdir(parents=True, exist_ok=True)
    st = src.stat()
    h = hashlib.sha256()
    offset = 0
    if resume_from_part and part.exists() and part.stat().st_size <= st.st_size:
        offset = part.stat().st_size
        with open(part, "rb") as f:  # the prefix already there: hash it, do not copy it again
            while chunk := f.read(CHUNK):
                h.update(chunk)
        advance(offset)
    written = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(src, "rb", buffering=0) as fi, open(part, "ab" if offset else "wb") as fo:
        fi.seek(offset)
        while n := fi.readinto(buf):
            h.update(view[:n])
            fo.write(view[:n])
            written += n
            advance(n)
        fo.flush()
        os.fsync(fo.fileno())
    os.utime(part, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(part, dst)
    return h.hexdigest(), written


def stage(
    plan: list[PlanFile], keep: dict[str, FileEntry], todo: list[PlanFile], tree: Path, dest: Path,
    journal: Journal, fetched: Path | None, result: ProvisionResult, progress: bool,
) -> dict[str, str]:
    hashes: dict[str, str] = {}
    for pf in plan:
        if pf.rel in keep:
            target = tree / pf.rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                try:
                    os.link(dest / pf.rel, target)
                except OSError:  # another file system: copy instead
                    todo.append(pf)
                    continue
            hashes[pf.rel] = keep[pf.rel].sha256
    copy, hash_only = [], []
    for pf in todo:
        target = tree / pf.rel
        done = journal.done.get(pf.rel)
        if fetched is not None and pf.src == fetched / pf.rel:
            if pf.sha256:
                hashes[pf.rel] = pf.sha256
            else:
                hash_only.append(pf)  # fetched by rsync into the tree already
        elif done and done.get("src") == str(pf.src) and done.get("size") == pf.size \
                and done.get("mtime_ns") == pf.mtime_ns and target.is_file() and target.stat().st_size == pf.size:
            hashes[pf.rel] = done["sha256"]
            result.actions.append(Action("resume", pf.rel, pf.size, "staged by an interrupted run"))
        else:
            copy.append(pf)
    if hash_only:
        hashes.update(hash_files(tree, [pf.rel for pf in hash_only], progress=progress, label="hashing"))
    total = sum(pf.size for pf in copy)
    lock = threading.Lock()

    def one(pf: PlanFile, advance: Callable[[int], None]) -> None:
        started = journal.started.get(pf.rel)
        resumable = bool(started and started.get("src") == str(pf.src) and started.get("size") == pf.size
                         and started.get("mtime_ns") == pf.mtime_ns)
        if not resumable:
            journal.record("start", pf.rel, src=str(pf.src), size=pf.size, mtime_ns=pf.mtime_ns)
        digest, written = _copy_hash(pf.src, tree / pf.rel, advance, resumable)
        if pf.sha256 and digest != pf.sha256:
            raise ProvisionError(f"{pf.src}: sha256 differs from the source's manifest (changed while copying?)",
                                 remedy="run the provision again")
        st = (tree / pf.rel).stat()
        if st.st_size != pf.size:
            raise ProvisionError(f"{pf.src}: changed size while copying", remedy="run the provision again")
        journal.record("done", pf.rel, src=str(pf.src), size=pf.size, mtime_ns=pf.mtime_ns, sha256=digest)
        with lock:
            hashes[pf.rel] = digest
            result.bytes_copied += written

    if copy:
        with byte_progress(progress, "copying", total) as advance:
            with ThreadPoolExecutor(max_workers=COPY_WORKERS) as pool:
                futures = [pool.submit(one, pf, advance) for pf in sorted(copy, key=lambda p: -p.size)]
                try:
                    for fut in futures:
                        fut.result()
                except BaseException:
                    for fut in futures:  # stop at once; the journal and .htr-part files let the next run resume
                        fut.cancel()
                    raise
    return hashes


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: the file system cannot; fall back
        return False
    raise OSError(err, os.strerror(err), str(b))


def swap_into_place(tree: Path, dest: Path, work: Path) -> None:
    """Publish the staging tree at *dest*: one atomic exchange where the kernel allows it, else two renames
    (DEST then briefly absent, never incomplete; an interrupted swap is finished by the next run)."""
    fsync_dir(tree)
    if dest.exists():
        if _exchange(tree, dest):
            shutil.rmtree(tree, ignore_errors=True)  # now the old tree
        else:
            old = work / "old"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(dest, old)
            os.rename(tree, dest)
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tree, dest)
    fsync_dir(dest.parent)


def recover_swap(dest: Path, work: Path) -> None:
    """A run killed between the two renames of the fallback swap left DEST absent: finish it."""
    if dest.exists() or not work.is_dir():
        return
    for candidate in (work / "tree", work / "old"):
        if (candidate / MANIFEST_NAME).is_file():
            logger.warning("finishing an interrupted swap: %s -> %s", candidate, dest)
            os.rename(candidate, dest)
            return


def check_dest_replaceable(dest: Path) -> Manifest | None:
    """DEST's manifest; refuse to replace a directory that htrctl did not provision."""
    if not dest.exists():
        return None
    if not dest.is_dir():
        raise ProvisionError(f"{dest} exists and is not a directory", remedy="choose another DEST")
    try:
        got = read_manifest(dest)
    except ManifestFormatError:
        got = None
        if not any(dest.iterdir()):
            return None
    if got is None:
        if any(dest.iterdir()):
            raise ProvisionError(
                f"{dest} exists, is not empty and has no {MANIFEST_NAME}: refusing to replace a directory "
                "htrctl did not provision",
                remedy=f"provision into a new or empty directory, or adopt it in place: htrctl provision {dest} {dest}",
            )
        return None
    return got[0]
