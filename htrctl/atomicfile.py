"""Atomic file writes: the one way htrctl replaces a file so that a reader never sees half of it.

A temporary file is written in the target's own directory (same file system, so the rename is atomic), flushed
and fsync'ed, given its mode (and group), optionally checked, then renamed over the target; the directory is
fsync'ed so the rename survives a power cut. On any failure the temporary file is removed and the old file is
left as it was. Temporary names are ``.<name>.<pid>.<random><suffix>`` so a caller can find and remove the
ones a killed writer left behind (``htrctl transcribe`` does, with its own suffix).
"""

from __future__ import annotations

import grp
import os
import uuid
from pathlib import Path
from typing import Callable

DEFAULT_SUFFIX = ".tmp"


def fsync_dir(path: Path) -> None:
    """fsync a directory (a rename in it is durable afterwards); a file system that refuses is not an error."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path(path: Path, suffix: str = DEFAULT_SUFFIX) -> Path:
    """The temporary name a write to *path* uses (hidden, unique per process and call)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{suffix}")


def write_atomic(path: Path, data: bytes | str, *, mode: int = 0o644, group: str | None = None,
                 check: Callable[[Path], None] | None = None, suffix: str = DEFAULT_SUFFIX,
                 make_parents: bool = True) -> None:
    """Replace *path* with *data* atomically.

    *mode* is set on the new file (not subject to the umask); *group*, when given, becomes its group (needs the
    privilege to chown). *check*, when given, is called with the temporary file before the rename and may raise
    to keep the old file. ``str`` data is written as UTF-8.
    """
    path = Path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    tmp = temp_path(path, suffix)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, mode)
        if group is not None:
            os.chown(tmp, -1, grp.getgrnam(group).gr_gid)
        if check is not None:
            check(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
