"""The model directory's manifest, ``<dir>/htr-manifest.json``, and file hashing.

Schema (``schema_version`` 1)::

    {
      "schema_version": 1,
      "tool": {"name": "htrctl", "version": "0.1.0"},
      "created": "2026-11-27T03:00:00Z",
      "base": {"id": "Qwen/Qwen3-VL-8B-Instruct", "revision": null, "source": "...",
               "model_type": "qwen3_vl", "architectures": ["Qwen3VLForConditionalGeneration"],
               "dtype": "bfloat16"},
      "adapter": {"path": "final_model", "base_model_name_or_path": "Qwen/Qwen3-VL-8B-Instruct",
                  "peft_type": "LORA", "r": 16, "target_modules": [...], "sha256": "<adapter weights>"}
                 | null,
      "files": [{"path": "config.json", "size": 1555, "sha256": "..."}, ...],   # sorted by path
      "variants": {"merged": {"path": "merged", "dtype": "bfloat16", "adapter_sha256": "...",
                              "max_abs_logit_diff": 1e-5}},
      "sources": {"model": "<SOURCE as given>", "base": "<--base or what was resolved>"},
      "provenance": {"<path>": [source_size, source_mtime_ns, dest_mtime_ns]}   # for no-op re-provision
    }

``files`` lists every regular file of the directory except the manifest itself,
the lock file and ``.cache/`` (the hub's local-dir metadata). Paths are POSIX,
relative, without ``..`` components. ``sha256`` is the digest of the whole file:
the same value the Hugging Face hub uses as the etag of LFS files.

The manifest is written last and atomically (temp file in the same directory,
fsync, rename): a directory with a manifest is complete, one without is not.

The model's digest (``manifest_digest`` in ``/v1/status``, ``htrctl status``,
``verify --json`` and every transcription record) is :func:`content_digest`:
the sha256 of the ``sha256sum``-style listing of the files -- content only, so
the same files give the same digest on every host, whenever and from wherever
they were provisioned (``created``, ``sources``, ``provenance`` do not count).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Iterator

from . import __version__
from .atomicfile import write_atomic

logger = logging.getLogger(__name__)

MANIFEST_NAME = "htr-manifest.json"
LOCK_NAME = ".htr-lock"
SCHEMA_VERSION = 1
# Paths (relative to the model directory) a manifest never lists.
IGNORED_TOP = {MANIFEST_NAME, LOCK_NAME, ".cache"}
CHUNK = 8 * 1024 * 1024


class ManifestFormatError(ValueError):
    """The manifest file is not valid JSON or does not follow the schema."""


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


@dataclass
class Manifest:
    files: list[FileEntry]
    base: dict[str, Any] | None = None
    adapter: dict[str, Any] | None = None
    variants: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, list[int]] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    tool: dict[str, str] = field(default_factory=lambda: {"name": "htrctl", "version": __version__})
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    schema_version: int = SCHEMA_VERSION

    @property
    def digest(self) -> str:
        """The model's identity from its content alone (see :func:`content_digest`)."""
        return content_digest(self.files)

    def by_path(self) -> dict[str, FileEntry]:
        return {f.path: f for f in self.files}

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "tool": self.tool,
            "created": self.created,
            "base": self.base,
            "adapter": self.adapter,
            "files": [f.to_dict() for f in sorted(self.files, key=lambda f: f.path)],
            "variants": self.variants,
            "sources": self.sources,
            "provenance": self.provenance,
        }

    def to_bytes(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Manifest":
        try:
            raw = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestFormatError(f"not valid JSON ({exc})") from exc
        if not isinstance(raw, dict):
            raise ManifestFormatError("not a JSON object")
        version = raw.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ManifestFormatError(f"schema_version {version!r} is not supported (this htrctl reads {SCHEMA_VERSION})")
        files = raw.get("files")
        if not isinstance(files, list):
            raise ManifestFormatError("'files' is missing or not a list")
        entries = []
        for i, item in enumerate(files):
            if not (
                isinstance(item, dict)
                and isinstance(item.get("path"), str)
                and isinstance(item.get("size"), int)
                and item["size"] >= 0
                and isinstance(item.get("sha256"), str)
                and len(item["sha256"]) == 64
            ):
                raise ManifestFormatError(f"files[{i}] needs path (str), size (int >= 0) and sha256 (64 hex digits)")
            entries.append(FileEntry(item["path"], item["size"], item["sha256"].lower()))
        return cls(
            files=entries,
            base=raw.get("base"),
            adapter=raw.get("adapter"),
            variants=raw.get("variants") or {},
            provenance=raw.get("provenance") or {},
            sources=raw.get("sources") or {},
            tool=raw.get("tool") or {},
            created=raw.get("created") or "",
            schema_version=version,
        )


def content_digest(files: Iterable[FileEntry]) -> str:
    """sha256 of ``<sha256>  <path>\n`` for every file, sorted by path: what ``sha256sum`` prints for them.

    ``(cd DIR && find . -type f ! -name htr-manifest.json -printf '%P\\0' | LC_ALL=C sort -z |
    xargs -0 sha256sum | sha256sum)`` gives the same value.
    """
    listing = "".join(f"{f.sha256}  {f.path}\n" for f in sorted(files, key=lambda f: f.path.encode()))
    return hashlib.sha256(listing.encode()).hexdigest()


def manifest_path(root: Path) -> Path:
    return Path(root) / MANIFEST_NAME


def read_manifest(root: Path) -> tuple[Manifest, str] | None:
    """The manifest of *root* and the model's digest (:func:`content_digest`); None when there is none.

    Raises :class:`ManifestFormatError` when it exists but is invalid.
    """
    p = manifest_path(root)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        return None
    manifest = Manifest.from_bytes(data)
    return manifest, manifest.digest


def write_manifest(root: Path, manifest: Manifest) -> str:
    """Write the manifest atomically; returns the model's digest (:func:`content_digest`)."""
    write_atomic(manifest_path(root), manifest.to_bytes())
    return manifest.digest


# --------------------------------------------------------------------------- paths


def unsafe_relpath(rel: str) -> str | None:
    """Why *rel* is not a safe relative path inside a directory, or None when it is."""
    if not rel or rel in (".",):
        return "empty path"
    if "\\" in rel or "\0" in rel:
        return "backslash or NUL in path"
    p = PurePosixPath(rel)
    if p.is_absolute():
        return "absolute path"
    if any(part == ".." for part in p.parts):
        return "path contains '..'"
    if p.as_posix() != rel:
        return "path is not in normal form"
    return None


def is_ignored(rel: str) -> bool:
    return rel.split("/", 1)[0] in IGNORED_TOP


def walk_files(root: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Regular files under *root* (relative POSIX paths, sorted) and unsafe entries.

    Symlinks are not followed for directories; a symlink whose target resolves
    outside *root* is reported as ``(path, reason)`` and not listed. Symlinks to
    files inside *root* are listed like regular files.
    """
    root = Path(root)
    real_root = root.resolve()
    files: list[str] = []
    unsafe: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        d = Path(dirpath)
        rel_dir = d.relative_to(root).as_posix()
        prefix = "" if rel_dir == "." else f"{rel_dir}/"
        keep = []
        for name, rel, full in _entries(d, prefix, dirnames):
            if full.is_symlink():
                unsafe.append((rel, _symlink_reason(full, real_root) or "symlink to a directory"))
            else:
                keep.append(name)
        dirnames[:] = keep
        for _name, rel, full in _entries(d, prefix, filenames):
            if full.is_symlink():
                problem = _symlink_reason(full, real_root)
            else:
                problem = None if full.is_file() else "not a regular file"
            if problem:
                unsafe.append((rel, problem))
            else:
                files.append(rel)
    files.sort()
    return files, unsafe


def _entries(d: Path, prefix: str, names: list[str]) -> Iterator[tuple[str, str, Path]]:
    """(name, path relative to the root, full path) of the entries of directory *d* not ignored, sorted."""
    for name in sorted(names):
        if not is_ignored(prefix + name):
            yield name, prefix + name, d / name


def _symlink_reason(link: Path, real_root: Path) -> str | None:
    target = link.resolve()
    try:
        target.relative_to(real_root)
    except ValueError:
        return f"symlink pointing outside the directory (to {os.readlink(link)})"
    if not target.exists():
        return f"dangling symlink (to {os.readlink(link)})"
    return None


# --------------------------------------------------------------------------- hashing


def hash_file(path: Path, progress: Callable[[int], None] | None = None) -> str:
    """sha256 of the whole file, read in 8 MiB chunks (hashlib releases the GIL)."""
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
            if progress:
                progress(n)
    return h.hexdigest()


def default_workers() -> int:
    return max(2, min(8, os.cpu_count() or 2))


def hash_files(
    root: Path,
    rels: Iterable[str],
    *,
    progress: bool = False,
    label: str = "hashing",
    workers: int | None = None,
) -> dict[str, str]:
    """sha256 of each file (relative to *root*), in a thread pool, with an optional progress bar."""
    rels = list(rels)
    root = Path(root)
    sizes = {r: (root / r).stat().st_size for r in rels}
    # largest first: the pool finishes together
    order = sorted(rels, key=lambda r: -sizes[r])
    with byte_progress(progress, label, sum(sizes.values())) as advance:
        with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool:
            results = pool.map(lambda r: (r, hash_file(root / r, advance)), order)
            return dict(results)


class byte_progress:
    """Context manager yielding a thread-safe ``advance(nbytes)``; a rich bar on stderr when enabled."""

    def __init__(self, enabled: bool, label: str, total: int) -> None:
        self.enabled = enabled and total > 0
        self.label = label
        self.total = total
        self._lock = threading.Lock()
        self._progress = None
        self._task = None

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return _noop
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task(self.label, total=self.total)
        return self._advance

    def _advance(self, n: int) -> None:
        with self._lock:
            self._progress.update(self._task, advance=n)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()


def _noop(_n: int) -> None:
    return None
