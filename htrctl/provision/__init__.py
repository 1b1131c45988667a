"""``htrctl provision SOURCE DEST``: a complete, verified, offline-loadable model directory.

SOURCE and DEST: a local directory or ``[user@]host:/path`` (rsync over ssh; the
ssh command comes from ``ssh=`` / ``$HTR_SSH``, default ``ssh``). SOURCE may
also be ``hf://org/name[@revision]`` from the local Hugging Face cache.

What happens, in order:

1. the source's layout is read: a full model (``config.json`` + weights, the
   adapter in ``final_model/``), an adapter-only tree (``final_model/`` without
   base), or a bare PEFT adapter directory (``adapter_config.json`` at its top);
2. a missing base is resolved **locally**: ``--base``, the directory the adapter
   names if it exists here, the local HF cache (``local_files_only``). Nothing is
   downloaded unless ``allow_download`` is set; a missing base is an error that
   names it and the exact command that fixes it;
3. the pair is checked from configs and safetensors headers only (architecture,
   target modules, LoRA shapes), before anything is copied;
4. files are copied (and hashed in the same pass) into a staging tree next to
   DEST (``.<name>.htr-work/tree``); files DEST already holds unchanged are
   hard-linked, not copied; a journal lets an interrupted run resume, partial
   files included; ``htr-manifest.json`` is written last, then the staging tree
   replaces DEST by rename. DEST never looks complete when it is not.
5. A lock (``.<name>.htr-lock`` next to DEST) stops two provisions of one DEST.
   When every source file's size and mtime and every DEST file match what the
   manifest recorded, nothing is done (a no-op costs a ``stat`` per file).

A ``host:path`` SOURCE (or ``--base``) without rsync on the remote -- Windows' OpenSSH
server, ``internal-sftp`` accounts -- is pulled over SFTP (:mod:`htrctl.provision.sftp`, with
``transport="sftp"``, or ``"auto"`` when ``command -v rsync`` finds nothing there):
into the same staging tree, resumable by offset, hashed on arrival and checked
against the source's manifest when it has one; then the same manifest and swap.
Windows paths (``C:/models/htr``, a quoted ``D:\\models\\htr``) are accepted.

Remote DEST: the same, with rsync into the staging tree on the remote host
(``--link-dest`` to the current DEST, ``--partial-dir`` for resume) and an
``mv`` swap over ssh; the remote lock is ``flock`` held by an ssh session.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import IncompatibleAdapterError, InterruptedRunError, LockedError, ModelMissingError, ProvisionError
from ..atomicfile import fsync_dir
from ..manifest import (
    CHUNK,
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    ManifestFormatError,
    byte_progress,
    hash_files,
    read_manifest,
    unsafe_relpath,
    walk_files,
    write_manifest,
)
from ..modeldir import ADAPTER_DIRNAME, MERGED_DIRNAME
from ..verify import (
    ERROR,
    HeaderError,
    check_adapter_pair,
    load_weight_set,
    read_config,
    read_safetensors_header,
    weights_dtype,
)

logger = logging.getLogger(__name__)

COPY_WORKERS = 4
# What a base needs from the hub / a cache (no pickles, no READMEs' images).
BASE_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "tokenizer*", "LICENSE*"]


# --------------------------------------------------------------------------- locations


@dataclass(frozen=True)
class Local:
    path: Path

    def __str__(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class Remote:
    host: str  # [user@]host
    path: str

    def __str__(self) -> str:
        return f"{self.host}:{self.path}"


@dataclass(frozen=True)
class Hub:
    repo: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"hf://{self.repo}" + (f"@{self.revision}" if self.revision else "")


_REMOTE = re.compile(r"^(?P<host>(?:[^@:/\s]+@)?[^@:/\s\[]+):(?P<path>.*)$")


def parse_location(spec: str) -> Local | Remote | Hub:
    """``hf://org/name[@rev]``, ``[user@]host:/path`` or a local path."""
    if spec.startswith("hf://"):
        rest = spec[len("hf://"):]
        repo, _, rev = rest.partition("@")
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
            raise ProvisionError(f"{spec!r}: not a hub repository id", remedy="write it as hf://org/name[@revision]")
        return Hub(repo, rev or None)
    m = _REMOTE.match(spec)
    if m and not os.path.exists(spec) and not spec.startswith(("./", "/", "~")):
        return Remote(m.group("host"), m.group("path") or ".")
    return Local(Path(spec).expanduser())


def ssh_command(ssh: str | None = None) -> list[str]:
    cmd = ssh or os.environ.get("HTR_SSH") or "ssh"
    return shlex.split(cmd)


# --------------------------------------------------------------------------- results


@dataclass
class Action:
    kind: str  # copy | link | resume | fetch | merge | manifest | remove | hash
    path: str
    size: int = 0
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.path, "size": self.size, "source": self.source}


@dataclass
class ProvisionResult:
    source: str
    dest: str
    base: str | None = None
    actions: list[Action] = field(default_factory=list)
    bytes_copied: int = 0
    noop: bool = False
    dry_run: bool = False
    manifest_digest: str | None = None
    files: int = 0
    total_size: int = 0
    seconds: float = 0.0
    merged: bool = False
    transport: str | None = None  # "rsync" | "sftp" for a host:path SOURCE

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "dest": self.dest,
            "base": self.base,
            "noop": self.noop,
            "dry_run": self.dry_run,
            "files": self.files,
            "total_size": self.total_size,
            "bytes_copied": self.bytes_copied,
            "manifest_digest": self.manifest_digest,
            "merged": self.merged,
            "transport": self.transport,
            "seconds": round(self.seconds, 3),
            "actions": [a.to_dict() for a in self.actions],
        }

    def summary(self) -> str:
        if self.noop:
            return f"{self.dest}: up to date ({self.files} files, {_gib(self.total_size)}), nothing to do"
        kinds: dict[str, int] = {}
        for a in self.actions:
            kinds[a.kind] = kinds.get(a.kind, 0) + 1
        what = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
        verb = "would provision" if self.dry_run else "provisioned"
        return (f"{verb} {self.dest} from {self.source}: {self.files} files, {_gib(self.total_size)}; "
                f"{what}; {_gib(self.bytes_copied)} {'to copy' if self.dry_run else 'copied'}")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


# --------------------------------------------------------------------------- planning


@dataclass
class PlanFile:
    rel: str  # path in DEST
    src: Path  # local path to read
    size: int
    mtime_ns: int
    origin: str  # "model" | "base"
    sha256: str | None = None


def _local_tree(root: Path, *, trusted_links: bool = False) -> dict[str, Path]:
    """Files under *root* as {relative path: path to read}. *trusted_links*: an HF cache snapshot."""
    if trusted_links:
        out: dict[str, Path] = {}
        for dirpath, _dirs, names in os.walk(root):
            for name in names:
                full = Path(dirpath) / name
                rel = full.relative_to(root).as_posix()
                if unsafe_relpath(rel) is None and full.exists() and not rel.startswith(".cache/"):
                    out[rel] = full.resolve()
        return out
    files, unsafe = walk_files(root)
    if unsafe:
        rel, why = unsafe[0]
        raise ProvisionError(f"{root / rel}: {why}", remedy="remove it from the source or copy the file itself")
    return {rel: root / rel for rel in files}


def _layout(root: Path, files: dict[str, Path]) -> tuple[dict[str, Path], bool]:
    """Map a source tree to DEST paths; returns (files, has_base)."""
    if "config.json" in files:
        return files, True
    if f"{ADAPTER_DIRNAME}/adapter_config.json" in files:
        return files, False
    if "adapter_config.json" in files:  # a bare PEFT adapter directory
        return {f"{ADAPTER_DIRNAME}/{rel}": p for rel, p in files.items()}, False
    raise ProvisionError(
        f"{root} is neither a model directory (config.json) nor a LoRA adapter (adapter_config.json)",
        remedy="point SOURCE at the model directory (base files + final_model/) or at the adapter",
    )


def hf_cache_dir() -> Path:
    """The hub cache, read from the environment now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def resolve_hub(hub: Hub, *, allow_download: bool, progress: bool) -> Path:
    """The local snapshot of *hub*: from the cache only, or downloaded when explicitly allowed."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(hub.repo, revision=hub.revision, local_files_only=True,
                                      allow_patterns=BASE_PATTERNS, cache_dir=hf_cache_dir()))
        if (path / "config.json").is_file():
            return path
    except LocalEntryNotFoundError:
        pass
    if not allow_download:
        raise ModelMissingError(
            f"{hub} is not in the local Hugging Face cache ({hf_cache_dir()})",
            remedy="pass --allow-download to fetch it from the hub, or --base DIR|host:path for a copy you have",
        )
    logger.info("downloading %s from the hub (explicitly allowed)", hub)
    try:
        return Path(snapshot_download(hub.repo, revision=hub.revision, allow_patterns=BASE_PATTERNS,
                                      cache_dir=hf_cache_dir(), tqdm_class=None if progress else _SilentTqdm))
    except Exception as exc:  # noqa: BLE001 - translated into one actionable line
        name = type(exc).__name__
        if "Offline" in name or "Connect" in name or "LocalEntryNotFound" in name or isinstance(exc, OSError):
            raise ProvisionError(
                f"cannot download {hub}: the hub is unreachable from this machine ({name})",
                remedy="copy the base from a machine that has it: --base [user@]host:/path/to/base",
            ) from exc
        raise ProvisionError(f"cannot download {hub}: {name}: {exc}",
                             remedy="check the repository id, revision and HF_TOKEN") from exc


class _SilentTqdm:  # pragma: no cover - a tqdm stand-in when progress is off
    def __init__(self, *a: Any, **k: Any) -> None:
        self.n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def close(self) -> None:
        pass

    def __enter__(self) -> "_SilentTqdm":
        return self

    def __exit__(self, *a: Any) -> None:
        pass

    @classmethod
    def get_lock(cls) -> threading.RLock:
        return threading.RLock()

    @classmethod
    def set_lock(cls, lock: Any) -> None:
        pass


def _adapter_cfg(files: dict[str, Path]) -> dict[str, Any] | None:
    p = files.get(f"{ADAPTER_DIRNAME}/adapter_config.json")
    if p is None:
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProvisionError(f"{p}: not valid JSON ({exc})", remedy="copy the adapter again") from exc


def _cmd_for(source: str, dest: str, extra: str) -> str:
    return f"htrctl provision {shlex.quote(source)} {shlex.quote(dest)} {extra}"


def _resolve_base(
    source: str, dest: str, base: str | None, acfg: dict[str, Any], *, allow_download: bool, progress: bool,
    ssh: str | None, work: Path, transport: str = "auto",
) -> tuple[Path, str]:
    """A local directory holding the base model for an adapter-only source, and its label."""
    named = acfg.get("base_model_name_or_path") or ""
    if base:
        loc = parse_location(base)
        if isinstance(loc, Hub):
            return resolve_hub(loc, allow_download=allow_download, progress=progress), str(loc)
        if isinstance(loc, Remote):
            target = work / "base"
            target.mkdir(parents=True, exist_ok=True)
            if pick_transport(loc, transport, ssh) == "sftp":
                _fetch_sftp(loc, target, None, work / "sftp-base-journal.json", ssh=ssh, progress=progress)
            else:
                _rsync([f"{loc.host}:{_rdir(loc.path)}", str(target) + "/"], ssh=ssh, progress=progress)
            return target, str(loc)
        if not (loc.path / "config.json").is_file():
            raise ModelMissingError(f"--base {base}: no config.json there (not a model directory)",
                                    remedy="point --base at the base model's directory")
        return loc.path, str(loc.path)
    if named and os.path.isabs(named) and (Path(named) / "config.json").is_file():
        return Path(named), named
    if re.fullmatch(r"[\w.-]+/[\w.-]+", named):
        try:
            return resolve_hub(Hub(named), allow_download=allow_download, progress=progress), f"hf://{named}"
        except ModelMissingError:
            pass
    raise ModelMissingError(
        f"the adapter's base model {named or '(unnamed)'!r} is missing: {source} holds only the adapter, no --base "
        f"was given, and it is not in the local Hugging Face cache ({hf_cache_dir()}); loading would download it",
        remedy=(f"copy it from a machine that has it: {_cmd_for(source, dest, '--base [user@]host:/path/to/base')}"
                + (f"  or fetch it from the hub: {_cmd_for(source, dest, '--allow-download')}" if named else "")),
    )


def _check_pair(files: dict[str, Path], plan_root_base: Path | None) -> dict[str, Any]:
    """Header-only checks of every safetensors file and of the adapter against the base; returns base info."""
    for rel, p in sorted(files.items()):
        if rel.endswith(".safetensors"):
            try:
                read_safetensors_header(p)
            except HeaderError as exc:
                raise ProvisionError(f"{p}: bad safetensors file: {exc}",
                                     remedy="the source is damaged: copy it again from where it was made") from exc
    # a temporary view of the DEST layout (symlinks), so the same checks as verify run on it
    with tempfile.TemporaryDirectory(prefix="htr-view-") as tmp:
        view = Path(tmp)
        for rel, p in files.items():  # every file: the adapter check also reads tokenizers, templates, .bin names
            (view / rel).parent.mkdir(parents=True, exist_ok=True)
            (view / rel).symlink_to(p.resolve())
        config = read_config(view) or {}
        ws, findings = load_weight_set(view)
        errs = [f for f in findings if f.severity == ERROR]
        if errs:
            raise ModelMissingError(f"{errs[0].path}: {errs[0].problem}", remedy="copy the whole base model")
        if ws is None:
            raise ModelMissingError("the base has no weights (no model.safetensors, no index)",
                                    remedy="copy the whole base model")
        info: dict[str, Any] = {
            "model_type": config.get("model_type"),
            "architectures": config.get("architectures"),
            "dtype": weights_dtype(ws),
        }
        if (view / ADAPTER_DIRNAME / "adapter_config.json").exists():
            errs = [f for f in check_adapter_pair(config, ws, view / ADAPTER_DIRNAME, base_dir=view)
                    if f.severity == ERROR]
            if errs:
                raise IncompatibleAdapterError(f"{errs[0].path}: {errs[0].problem}", remedy=errs[0].remedy,
                                               detail=[e.to_dict() for e in errs])
        return info


# --------------------------------------------------------------------------- locking and staging


class _Lock:
    """An exclusive flock on ``<parent>/.<name>.htr-lock``, removed again when released.

    The holder unlinks the file before it unlocks; a process that opened the
    same file meanwhile gets the lock on an unlinked inode, sees that the path
    no longer names its file, and starts over on a new one (no unlink races,
    and no lock files left behind DEST).
    """

    def __init__(self, dest: Path) -> None:
        self.path = dest.parent / f".{dest.name}.htr-lock"
        self.fd: int | None = None

    def __enter__(self) -> "_Lock":
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


class _Journal:
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


def _swap_into_place(tree: Path, dest: Path, work: Path) -> None:
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


def _recover_swap(dest: Path, work: Path) -> None:
    """A run killed between the two renames of the fallback swap left DEST absent: finish it."""
    if dest.exists() or not work.is_dir():
        return
    for candidate in (work / "tree", work / "old"):
        if (candidate / MANIFEST_NAME).is_file():
            logger.warning("finishing an interrupted swap: %s -> %s", candidate, dest)
            os.rename(candidate, dest)
            return


def _check_dest_replaceable(dest: Path) -> Manifest | None:
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


# --------------------------------------------------------------------------- the entry point


def provision(
    source: str,
    dest: str,
    *,
    base: str | None = None,
    merge: bool = False,
    dry_run: bool = False,
    allow_download: bool = False,
    progress: bool = True,
    ssh: str | None = None,
    transport: str = "auto",
) -> ProvisionResult:
    """Provision DEST from SOURCE (see the module docstring). Raises HtrError subclasses.

    *transport* for a ``host:path`` SOURCE or ``--base``: ``rsync``, ``sftp`` (no rsync on the remote:
    Windows' OpenSSH server, ``internal-sftp`` accounts) or ``auto`` (rsync when both ends have it)."""
    t0 = time.monotonic()
    if transport not in TRANSPORTS:
        raise ProvisionError(f"--transport must be one of {', '.join(TRANSPORTS)}, not {transport!r}",
                             remedy="use --transport auto")
    src_loc, dst_loc = parse_location(source), parse_location(dest)
    if isinstance(dst_loc, Hub):
        raise ProvisionError("DEST cannot be hf://", remedy="give a local directory or host:path")
    try:
        result = _provision(source, dest, src_loc, dst_loc, base=base, merge=merge, dry_run=dry_run,
                            allow_download=allow_download, progress=progress, ssh=ssh, transport=transport)
    except KeyboardInterrupt:
        if isinstance(dst_loc, Remote):
            rpath = dst_loc.path.rstrip("/") or "/"
            kept = f"{dst_loc.host}:{os.path.dirname(rpath) or '.'}/.{os.path.basename(rpath)}.htr-work"
        else:
            kept = str(Path(dst_loc.path).absolute().parent / f".{Path(dst_loc.path).name}.htr-work")
        raise InterruptedRunError(
            f"interrupted: {dest} is as it was; what was copied so far is kept in {kept}",
            remedy="run the same command again: it resumes there (complete files are not copied again)") from None
    result.seconds = time.monotonic() - t0
    return result


def _provision(source: str, dest: str, src_loc: Local | Remote | Hub, dst_loc: Local | Remote, *,
               base: str | None, merge: bool, dry_run: bool, allow_download: bool, progress: bool,
               ssh: str | None, transport: str = "auto") -> ProvisionResult:
    if isinstance(dst_loc, Remote):
        if isinstance(src_loc, Remote):
            raise ProvisionError("remote to remote is not supported",
                                 remedy="provision to a local directory first, then from it to the other host")
        if merge:
            raise ProvisionError("--merge needs a local DEST", remedy="merge locally, then provision the result")
        if transport == "sftp":
            raise ProvisionError("--transport sftp pulls only: a remote DEST is written with rsync",
                                 remedy="run htrctl provision on the receiving machine, pulling from this one")
        result = _provision_to_remote(source, src_loc, dst_loc, base=base, dry_run=dry_run,
                                      allow_download=allow_download, progress=progress, ssh=ssh)
    else:
        try:
            result = _provision_local(source, src_loc, dst_loc.path, base=base, merge=merge, dry_run=dry_run,
                                      allow_download=allow_download, progress=progress, ssh=ssh,
                                      transport=transport)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise
            where = Path(dst_loc.path).parent
            try:
                free = shutil.disk_usage(where).free
            except OSError:
                free = -1
            raise ProvisionError(
                f"{exc.strerror} while provisioning {dst_loc.path}"
                + (f" ({free // 1024} KiB free on that file system)" if free >= 0 else ""),
                remedy="free space there (or choose another DEST), then rerun the same command: it resumes "
                       "where it stopped; DEST is untouched") from None
    return result


def _gather(
    source: str, src_loc: Local | Remote | Hub, dest: str, *, base: str | None, allow_download: bool,
    progress: bool, ssh: str | None, work: Path, fetched: Path | None = None, transport: str = "auto",
) -> tuple[list[PlanFile], dict[str, Any], str | None, Manifest | None]:
    """The plan: every DEST file with the local path it comes from; base and adapter identity."""
    src_manifest = None
    if isinstance(src_loc, Hub):
        root = resolve_hub(src_loc, allow_download=allow_download, progress=progress)
        files, has_base = _layout(root, _local_tree(root, trusted_links=True))
        base_root, base_label = None, str(src_loc)
    else:
        root = fetched if fetched is not None else src_loc.path.absolute()
        if not root.is_dir():
            raise ModelMissingError(f"{source}: no such directory", remedy="check the SOURCE path")
        files, has_base = _layout(root, _local_tree(root))
        try:
            got = read_manifest(root)
            src_manifest = got[0] if got else None
        except ManifestFormatError:
            src_manifest = None
        label = str(root) if isinstance(src_loc, Local) else source
        base_root, base_label = None, (src_manifest.sources.get("base") if src_manifest else None) or label
    acfg = _adapter_cfg(files)
    origins = {rel: "model" for rel in files}
    if not has_base:
        base_root, base_label = _resolve_base(source, dest, base, acfg or {}, allow_download=allow_download,
                                              progress=progress, ssh=ssh, work=work, transport=transport)
        base_files = _local_tree(base_root, trusted_links=_in_hf_cache(base_root))
        base_files = {r: p for r, p in base_files.items() if not r.startswith(f"{ADAPTER_DIRNAME}/")}
        merged_files = dict(base_files)
        merged_files.update(files)  # the model source's own files win (its processor, its adapter)
        for rel in base_files:
            if rel not in files:
                origins[rel] = "base"
        files = merged_files
    elif base:
        logger.warning("--base %s ignored: %s already holds a base model", base, source)
    info = _check_pair(files, base_root)
    plan = []
    for rel, p in sorted(files.items()):
        st = p.stat()
        plan.append(PlanFile(rel, p, st.st_size, st.st_mtime_ns, origins[rel]))
    identity: dict[str, Any] = {
        "base": {"id": (acfg or {}).get("base_model_name_or_path") or base_label, "source": base_label, **info},
        "adapter": None,
    }
    if acfg is not None:
        identity["adapter"] = {
            "path": ADAPTER_DIRNAME,
            "base_model_name_or_path": acfg.get("base_model_name_or_path"),
            "peft_type": acfg.get("peft_type"),
            "r": acfg.get("r"),
            "lora_alpha": acfg.get("lora_alpha"),
            "target_modules": acfg.get("target_modules"),
        }
    return plan, identity, base_label, src_manifest


def _label(loc: Local | Remote | Hub, given: str) -> str:
    return str(loc.path.absolute()) if isinstance(loc, Local) else given


def _in_hf_cache(p: Path) -> bool:
    try:
        p.resolve().relative_to(hf_cache_dir().resolve())
        return True
    except ValueError:
        return False


def _trusted_hashes(plan: list[PlanFile], src_manifest: Manifest | None, src_root: Path | None) -> None:
    """Use a source manifest's hashes for files it recorded unchanged (size and mtime)."""
    if src_manifest is None or src_root is None:
        return
    entries = src_manifest.by_path()
    for pf in plan:
        e = entries.get(pf.rel)
        prov = src_manifest.provenance.get(pf.rel)
        if e and prov and len(prov) == 4 and e.size == pf.size and prov[3] == pf.mtime_ns and pf.origin == "model":
            pf.sha256 = e.sha256


def _provision_local(
    source: str, src_loc: Local | Remote | Hub, dest: Path, *, base: str | None, merge: bool, dry_run: bool,
    allow_download: bool, progress: bool, ssh: str | None, transport: str = "auto",
) -> ProvisionResult:
    dest = dest.absolute()
    result = ProvisionResult(source=source, dest=str(dest), dry_run=dry_run)
    in_place = isinstance(src_loc, Local) and src_loc.path.exists() and dest.exists() and \
        src_loc.path.resolve() == dest.resolve()
    work = dest.parent / f".{dest.name}.htr-work"
    with _Lock(dest):
        _recover_swap(dest, work)
        old = None if in_place else _check_dest_replaceable(dest)
        fetched = None
        sftp_got: dict[str, Any] | None = None
        if isinstance(src_loc, Remote):
            if not dry_run:  # the staging tree exists before the first connection (an interrupt names it)
                work.mkdir(parents=True, exist_ok=True)
                fetched = work / "tree"
                fetched.mkdir(exist_ok=True)
            use = pick_transport(src_loc, transport, ssh)
            result.transport = use
            if dry_run:
                if use == "sftp":
                    return _sftp_dry_run(result, src_loc, dest, ssh)
                return _remote_dry_run(result, src_loc, dest, ssh)
            assert fetched is not None
            if use == "sftp":
                sftp_got = _fetch_sftp(src_loc, fetched, dest, work / "sftp-journal.json", ssh=ssh,
                                       progress=progress)
                result.bytes_copied += sftp_got["bytes"]
                for rel in sftp_got["resumed"]:
                    result.actions.append(Action("resume", rel, sftp_got["files"][rel]["size"], f"{source} (sftp)"))
            else:
                result.bytes_copied += _fetch_remote(src_loc, fetched, dest, ssh=ssh, progress=progress)
        if dry_run and base and isinstance(parse_location(base), Remote) and isinstance(src_loc, Local):
            return _dry_run_remote_base(result, src_loc.path.absolute(), parse_location(base), ssh)
        plan, identity, base_label, src_manifest = _gather(
            source, src_loc, str(dest), base=base, allow_download=allow_download, progress=progress, ssh=ssh,
            work=work, fetched=fetched, transport=transport)
        if sftp_got is not None:  # hashed as they arrived: not read again
            for pf in plan:
                if pf.origin == "model" and pf.rel in sftp_got["hashes"]:
                    pf.sha256 = sftp_got["hashes"][pf.rel]
        result.base = base_label
        if in_place:
            return _adopt_in_place(result, dest, plan, identity, merge=merge, dry_run=dry_run, progress=progress)
        _trusted_hashes(plan, src_manifest, src_loc.path if isinstance(src_loc, Local) else None)
        src_key = {pf.rel: str(pf.src) for pf in plan}
        result.files = len(plan)
        result.total_size = sum(pf.size for pf in plan)

        # what DEST already holds unchanged
        keep: dict[str, FileEntry] = {}
        if old is not None:
            entries = old.by_path()
            for pf in plan:
                e, prov = entries.get(pf.rel), old.provenance.get(pf.rel)
                if not (e and prov and len(prov) == 4):
                    continue
                try:
                    dst_st = (dest / pf.rel).stat()
                except FileNotFoundError:
                    continue
                if (prov[0] == src_key[pf.rel] and prov[1] == pf.size and prov[2] == pf.mtime_ns
                        and dst_st.st_size == e.size == pf.size and dst_st.st_mtime_ns == prov[3]):
                    keep[pf.rel] = e
            merged_ok = not merge or _merged_up_to_date(old, dest)
            wanted = {pf.rel for pf in plan}
            old_files = {e.path for e in old.files if not e.path.startswith(f"{MERGED_DIRNAME}/")}
            if len(keep) == len(plan) and old_files == wanted and merged_ok:
                result.noop = True
                result.manifest_digest = read_manifest(dest)[1]
                shutil.rmtree(work, ignore_errors=True)  # nothing to stage (rsync only hard-linked DEST's files)
                return result

        todo = [pf for pf in plan if pf.rel not in keep]
        for pf in plan:
            if pf.rel in keep:
                result.actions.append(Action("link", pf.rel, pf.size, "DEST (unchanged)"))
            elif fetched is not None and pf.origin == "model":
                result.actions.append(Action("fetch", pf.rel, pf.size, source))
            else:
                result.actions.append(Action("copy", pf.rel, pf.size, str(pf.src)))
        if old is not None:
            for e in old.files:
                if e.path not in src_key and not (merge and e.path.startswith(f"{MERGED_DIRNAME}/")):
                    result.actions.append(Action("remove", e.path, e.size))
        if merge:
            result.actions.append(Action("merge", MERGED_DIRNAME + "/", 0, "base + final_model"))
        if dry_run:
            result.bytes_copied = sum(pf.size for pf in todo if not (fetched is not None and pf.origin == "model"))
            return result

        work.mkdir(parents=True, exist_ok=True)
        tree = work / "tree"
        tree.mkdir(exist_ok=True)
        journal = _Journal(work / "journal.jsonl")
        try:
            hashes = _stage(plan, keep, todo, tree, dest, journal, fetched, result, progress)
        finally:
            journal.close()
        # every staged file that is not in the plan goes (stale partials, files of an older source)
        wanted = {pf.rel for pf in plan}
        staged, _ = walk_files(tree)
        for rel in staged:
            if rel not in wanted and not (merge and old is not None and rel.startswith(f"{MERGED_DIRNAME}/")):
                (tree / rel).unlink()
        for dirpath, _dirs, _names in sorted(os.walk(tree), reverse=True):  # and the directories left empty
            if Path(dirpath) != tree and not any(Path(dirpath).iterdir()):
                Path(dirpath).rmdir()
        for ref in (src_manifest, (sftp_got or {}).get("manifest")):
            if ref is None:
                continue
            for e in ref.files:
                if e.path in hashes and hashes[e.path] != e.sha256:
                    if fetched is not None:
                        (fetched / e.path).unlink(missing_ok=True)  # fetched again by the next run
                    raise ProvisionError(f"{source}/{e.path}: sha256 differs from the source's own manifest",
                                         remedy=f"the source is damaged or changed: run htrctl verify {source} "
                                                "there, then provision again")
        manifest = Manifest(
            files=[FileEntry(pf.rel, pf.size, hashes[pf.rel]) for pf in plan],
            base=identity["base"],
            adapter=identity["adapter"],
            sources={"model": _label(src_loc, source), "base": base_label or source},
            provenance={pf.rel: [src_key[pf.rel], pf.size, pf.mtime_ns, (tree / pf.rel).stat().st_mtime_ns]
                        for pf in plan},
        )
        if manifest.adapter is not None:
            manifest.adapter["sha256"] = hashes.get(f"{ADAPTER_DIRNAME}/adapter_model.safetensors")
        _carry_variants(manifest, src_manifest, plan)
        if merge:
            _do_merge(tree, manifest, old, dest, result, progress)
        (tree / MANIFEST_NAME).unlink(missing_ok=True)
        result.manifest_digest = write_manifest(tree, manifest)
        result.actions.append(Action("manifest", MANIFEST_NAME))
        _swap_into_place(tree, dest, work)
        shutil.rmtree(work, ignore_errors=True)
        return result


def _stage(
    plan: list[PlanFile], keep: dict[str, FileEntry], todo: list[PlanFile], tree: Path, dest: Path,
    journal: _Journal, fetched: Path | None, result: ProvisionResult, progress: bool,
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


def _adopt_in_place(
    result: ProvisionResult, root: Path, plan: list[PlanFile], identity: dict[str, Any], *, merge: bool,
    dry_run: bool, progress: bool,
) -> ProvisionResult:
    """SOURCE == DEST: check the directory and write its manifest (hashing every file)."""
    result.files = len(plan)
    result.total_size = sum(pf.size for pf in plan)
    if merge:
        raise ProvisionError("--merge in place is not supported", remedy="provision into a new directory with --merge")
    if any(pf.origin == "base" for pf in plan):
        raise ProvisionError(f"{root} holds only the adapter: adding a base in place is not supported",
                             remedy=f"provision into a new directory: htrctl provision {root} NEW_DIR --base ...")
    try:
        got = read_manifest(root)
    except ManifestFormatError:
        got = None
    if got is not None:
        old = got[0]
        same = {e.path: e for e in old.files}
        if all(pf.rel in same and same[pf.rel].size == pf.size and (old.provenance.get(pf.rel) or [0])[-1]
               == pf.mtime_ns for pf in plan) and len(same) == len(plan) and (not merge or "merged" in old.variants):
            result.noop = True
            result.manifest_digest = got[1]
            return result
    result.actions = [Action("hash", pf.rel, pf.size) for pf in plan] + [Action("manifest", MANIFEST_NAME)]
    if dry_run:
        return result
    hashes = hash_files(root, [pf.rel for pf in plan], progress=progress, label="hashing")
    manifest = Manifest(
        files=[FileEntry(pf.rel, pf.size, hashes[pf.rel]) for pf in plan],
        base=identity["base"],
        adapter=identity["adapter"],
        sources={"model": str(root), "base": result.base or str(root)},
        provenance={pf.rel: [str(pf.src), pf.size, pf.mtime_ns, pf.mtime_ns] for pf in plan},
    )
    if manifest.adapter is not None:
        manifest.adapter["sha256"] = hashes.get(f"{ADAPTER_DIRNAME}/adapter_model.safetensors")
    result.manifest_digest = write_manifest(root, manifest)
    return result


def _carry_variants(manifest: Manifest, src_manifest: Manifest | None, plan: list[PlanFile]) -> None:
    """A source's merged/ variant travels with its record in the manifest."""
    if src_manifest is None:
        return
    rels = {pf.rel for pf in plan}
    for name, v in src_manifest.variants.items():
        if any(r.startswith(f"{v.get('path', name)}/") for r in rels):
            manifest.variants[name] = dict(v)


def _merged_up_to_date(old: Manifest, dest: Path) -> bool:
    v = old.variants.get("merged")
    if not v or not old.adapter:
        return False
    return v.get("adapter_sha256") == old.adapter.get("sha256") and (dest / MERGED_DIRNAME).is_dir()


def _do_merge(tree: Path, manifest: Manifest, old: Manifest | None, dest: Path, result: ProvisionResult,
              progress: bool) -> None:
    if manifest.adapter is None:
        raise ProvisionError("--merge needs a LoRA adapter in final_model/", remedy="drop --merge")
    from ..merge import merge_adapter

    variant = merge_adapter(tree, progress=progress)
    rels, _ = walk_files(tree / MERGED_DIRNAME)
    rels = [f"{MERGED_DIRNAME}/{r}" for r in rels]
    hashes = hash_files(tree, rels, progress=progress, label="hashing merged")
    for rel in rels:
        st = (tree / rel).stat()
        manifest.files.append(FileEntry(rel, st.st_size, hashes[rel]))
    variant["adapter_sha256"] = manifest.adapter.get("sha256")
    manifest.variants["merged"] = variant
    result.merged = True


# --------------------------------------------------------------------------- rsync / ssh


def _rdir(path: str) -> str:
    return path.rstrip("/") + "/"


def _rsync(args: list[str], *, ssh: str | None, progress: bool, dry_run: bool = False) -> tuple[int, str]:
    """Run rsync over ssh; returns (literal bytes sent, its stdout). ``$HTR_RSYNC_OPTS`` adds options
    (e.g. ``--bwlimit=20m``)."""
    if shutil.which("rsync") is None:
        raise ProvisionError("rsync is not installed", remedy="apt-get install rsync (on both machines)")
    cmd = ["rsync", "-rt", "--partial", "--partial-dir=.rsync-partial", "--stats", "-i",
           "-e", shlex.join(ssh_command(ssh))]
    cmd += shlex.split(os.environ.get("HTR_RSYNC_OPTS", ""))
    progress = progress and _stderr_is_terminal()  # "\r" progress only where it redraws: not cron, the journal
    if dry_run:
        cmd.append("-n")
    elif progress:
        cmd.append("--info=progress2")
    cmd += args
    logger.debug("running %s", shlex.join(cmd))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    err_chunks: list[bytes] = []
    drain = threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()), daemon=True)
    drain.start()
    out = bytearray()
    pending = b""
    try:
        while chunk := proc.stdout.read1(65536):
            out += chunk
            if progress and not dry_run:  # progress2 lines end in \r: show the last one on stderr
                pending = (pending + chunk).split(b"\n")[-1]
                last = pending.split(b"\r")
                line = next((x for x in reversed(last) if b"%" in x), None)
                if line:
                    sys.stderr.write("\r" + line.decode(errors="replace").strip()[:100])
                    sys.stderr.flush()
    except BaseException:  # Ctrl-C: no rsync (and ssh) left running behind us; --partial keeps its work
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    rc = proc.wait()
    drain.join(timeout=10)
    if progress and not dry_run:
        sys.stderr.write("\r\033[K")
    text = out.decode(errors="replace")
    if rc != 0:
        err = b"".join(err_chunks).decode(errors="replace")
        raise ProvisionError(f"rsync failed (exit {rc}): {rsync_cause(err, rc)}",
                             remedy="check the host, the path and the ssh command (--ssh / $HTR_SSH); "
                                    "run again to resume, complete files are not copied again")
    m = re.search(r"Literal data: ([\d,.]+)", text)
    literal = int(re.sub(r"[,.]", "", m.group(1))) if m else 0
    return literal, text


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def rsync_cause(stderr: str, rc: int) -> str:
    """The line of rsync's stderr that says why: ssh's own message (host unreachable, key refused, remote
    shell errors) before rsync's generic "connection unexpectedly closed" / "rsync error: ..." lines."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    own = [ln for ln in lines if not ln.startswith(("rsync:", "rsync error:", "rsync warning:"))]
    if own:
        return own[0]
    specific = [ln for ln in lines if ln.startswith("rsync:") and "connection unexpectedly closed" not in ln]
    return (specific or lines or [f"exit {rc}"])[0]


def _itemized(out: str) -> list[tuple[str, str]]:
    """``(kind, path)`` of the files rsync -i would change: kind "send" or "remove"; directories left out."""
    names = []
    for line in out.splitlines():
        if line.startswith("*deleting "):
            name = line[len("*deleting "):].strip()
            if not name.endswith("/"):
                names.append(("remove", name))
            continue
        m = re.match(r"^([<>ch.][fLDS][^ ]{9}) +(.+)$", line)
        if m:
            names.append(("send", m.group(2)))
    return names


TRANSPORTS = ("auto", "rsync", "sftp")


def pick_transport(src: Remote, transport: str, ssh: str | None) -> str:
    """``rsync`` or ``sftp`` for pulling *src*; ``auto``: rsync when it runs here and on the remote (a shell
    that finds it: not Windows' cmd.exe, not an ``internal-sftp`` account), else SFTP."""
    if transport != "auto":
        return transport
    if shutil.which("rsync") is None:
        return "sftp"
    try:
        proc = subprocess.run(ssh_command(ssh) + [src.host, "command -v rsync"], stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return "sftp"
    found = proc.returncode == 0 and b"rsync" in proc.stdout
    logger.info("%s: %s", src.host, "rsync found: pulling with rsync" if found else "no rsync: pulling over SFTP")
    return "rsync" if found else "sftp"


def _fetch_sftp(src: Remote, tree: Path, dest: Path | None, journal: Path, *, ssh: str | None,
                progress: bool) -> dict[str, Any]:
    """Pull a remote SOURCE over SFTP into the staging tree (htrctl.provision.sftp): resumable, hashed on arrival,
    checked against the source's own manifest when it has one."""
    from .sftp import SftpClient, fetch_tree, read_remote_manifest, remote_path

    with SftpClient(src.host, ssh_command(ssh)) as client:
        listed = client.walk(remote_path(src.path))
        total = sum(int(a["size"]) for r, a in listed.items() if r not in (MANIFEST_NAME, ".htr-lock"))
        with byte_progress(progress, "fetching (sftp)", total) as advance:
            got = fetch_tree(client, src.path, tree, dest, exclude={MANIFEST_NAME, ".htr-lock"}, journal=journal,
                             advance=advance)
        raw = read_remote_manifest(client, src.path, MANIFEST_NAME)
    got["manifest"] = None
    if raw is not None:
        ref = journal.parent / "source-manifest"
        ref.mkdir(exist_ok=True)
        (ref / MANIFEST_NAME).write_bytes(raw)
        try:
            parsed = read_manifest(ref)
            got["manifest"] = parsed[0] if parsed else None
        except ManifestFormatError:
            logger.warning("%s: the source's %s is not valid; files are not checked against it", src, MANIFEST_NAME)
        shutil.rmtree(ref, ignore_errors=True)
    return got


def _sftp_dry_run(result: ProvisionResult, src: Remote, dest: Path, ssh: str | None) -> ProvisionResult:
    from .sftp import SftpClient, remote_path

    with SftpClient(src.host, ssh_command(ssh)) as client:
        listed = client.walk(remote_path(src.path))
    for rel, a in sorted(listed.items()):
        if rel in (MANIFEST_NAME, ".htr-lock"):
            continue
        d = dest / rel
        same = d.is_file() and d.stat().st_size == a["size"] and int(d.stat().st_mtime) == a["mtime"]
        result.actions.append(Action("link" if same else "fetch", rel, 0 if same else int(a["size"]), str(src)))
    result.base = None
    return result


def _fetch_remote(src: Remote, tree: Path, dest: Path, *, ssh: str | None, progress: bool) -> int:
    """rsync a remote SOURCE into the local staging tree, hard-linking files DEST already holds."""
    # --delete: files an earlier, interrupted run staged from an older SOURCE do not survive
    args = ["--delete", "--exclude", f"/{MANIFEST_NAME}", "--exclude", "/.htr-lock"]
    if dest.is_dir():
        args += [f"--link-dest={dest}"]
    literal, _ = _rsync(args + [f"{src.host}:{_rdir(src.path)}", str(tree) + "/"], ssh=ssh, progress=progress)
    return literal


def _remote_dry_run(result: ProvisionResult, src: Remote, dest: Path, ssh: str | None) -> ProvisionResult:
    target = str(dest) + "/" if dest.is_dir() else tempfile.mkdtemp(prefix="htr-dry-") + "/"
    try:
        _, out = _rsync(["--exclude", f"/{MANIFEST_NAME}", f"{src.host}:{_rdir(src.path)}", target],
                        ssh=ssh, progress=False, dry_run=True)
    finally:
        if not dest.is_dir():
            shutil.rmtree(target, ignore_errors=True)
    for kind, name in _itemized(out):
        result.actions.append(Action("fetch" if kind == "send" else kind, name, 0, str(src)))
    result.base = None
    return result


def _dry_run_remote_base(result: ProvisionResult, root: Path, base: Remote, ssh: str | None) -> ProvisionResult:
    """--dry-run with --base host:path: list what would move without fetching the base."""
    files, has_base = _layout(root, _local_tree(root))
    for rel, p in sorted(files.items()):
        result.actions.append(Action("copy", rel, p.stat().st_size, str(p)))
    result.base = str(base)
    if not has_base:
        with tempfile.TemporaryDirectory(prefix="htr-dry-") as tmp:
            _, out = _rsync(["--exclude", f"/{ADAPTER_DIRNAME}", f"{base.host}:{_rdir(base.path)}", tmp + "/"],
                            ssh=ssh, progress=False, dry_run=True)
        for kind, name in _itemized(out):
            if kind == "send" and name not in files:
                result.actions.append(Action("fetch", name, 0, str(base)))
    result.files = len(result.actions)
    result.bytes_copied = sum(a.size for a in result.actions)
    logger.info("dry run: the adapter/base pair is checked once the base is fetched")
    return result


def _ssh_run(host: str, script: str, *, ssh: str | None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ssh_command(ssh) + [host, script]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise ProvisionError(f"{host}: remote command failed (exit {proc.returncode}): "
                             f"{rsync_cause(proc.stderr, proc.returncode)}",
                             remedy="check ssh access (--ssh / $HTR_SSH) and permissions on the remote path")
    return proc


class _RemoteLock:
    """``flock -n`` on the remote host, held by an ssh session until we close its stdin."""

    def __init__(self, host: str, lock_path: str, ssh: str | None) -> None:
        self.host, self.lock_path, self.ssh = host, lock_path, ssh
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "_RemoteLock":
        q = shlex.quote(self.lock_path)
        script = (f"mkdir -p \"$(dirname {q})\" && exec flock -n -E 75 {q} "
                  "sh -c 'echo locked; exec cat >/dev/null'")
        self.proc = subprocess.Popen(ssh_command(self.ssh) + [self.host, script], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "locked":
            rc = self.proc.wait(timeout=30)
            err = self.proc.stderr.read().strip() if self.proc.stderr else ""
            if rc == 75:
                raise LockedError(f"{self.host}:{self.lock_path}: another provision holds the lock",
                                  remedy="wait for it to finish")
            raise ProvisionError(f"{self.host}: cannot take the remote lock (exit {rc}): {err[-200:]}",
                                 remedy="check ssh access (--ssh / $HTR_SSH); the remote needs flock (util-linux)")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            try:
                if self.proc.stdin:
                    self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            for s in (self.proc.stdout, self.proc.stderr):
                if s:
                    s.close()


def _provision_to_remote(
    source: str, src_loc: Local | Hub, dst: Remote, *, base: str | None, dry_run: bool, allow_download: bool,
    progress: bool, ssh: str | None,
) -> ProvisionResult:
    result = ProvisionResult(source=source, dest=str(dst), dry_run=dry_run)
    rpath = dst.path.rstrip("/") or "/"
    parent, name = os.path.split(rpath)
    parent = parent or "."
    rwork = f"{parent}/.{name}.htr-work"
    with tempfile.TemporaryDirectory(prefix="htr-remote-") as tmp:
        work = Path(tmp)
        plan, identity, base_label, src_manifest = _gather(
            source, src_loc, str(dst), base=base, allow_download=allow_download, progress=progress, ssh=ssh,
            work=work)
        result.base = base_label
        result.files = len(plan)
        result.total_size = sum(pf.size for pf in plan)
        _trusted_hashes(plan, src_manifest, src_loc.path if isinstance(src_loc, Local) else None)
        # a view of the DEST layout (symlinks to the sources) that rsync -L sends as one tree
        view = work / "view"
        for pf in plan:
            (view / pf.rel).parent.mkdir(parents=True, exist_ok=True)
            (view / pf.rel).symlink_to(pf.src.resolve())
        view.mkdir(exist_ok=True)
        with _RemoteLock(dst.host, f"{parent}/.{name}.htr-lock", ssh):
            state = _ssh_run(dst.host, _remote_state_script(rpath), ssh=ssh).stdout
            if "NOT-PROVISIONED" in state:
                raise ProvisionError(f"{dst} exists, is not empty and has no {MANIFEST_NAME}: refusing to replace it",
                                     remedy="provision into a new or empty remote directory")
            remote_manifest = None
            if "HAS-MANIFEST" in state:
                body = _ssh_run(dst.host, f"cat {shlex.quote(rpath + '/' + MANIFEST_NAME)}", ssh=ssh).stdout
                try:
                    remote_manifest = Manifest.from_bytes(body.encode())
                except ManifestFormatError:
                    remote_manifest = None
            # what would change at DEST itself
            _, out = _rsync(["-L", "--delete", "--exclude", f"/{MANIFEST_NAME}", str(view) + "/",
                             f"{dst.host}:{_rdir(rpath)}"], ssh=ssh, progress=False, dry_run=True)
            items = _itemized(out)
            changed = {name for _, name in items}
            if remote_manifest is not None and not changed:
                known = remote_manifest.by_path()
                if {pf.rel for pf in plan} == set(known) and all(known[pf.rel].size == pf.size for pf in plan):
                    result.noop = True
                    return result
            for kind, name_ in items:
                result.actions.append(Action(kind, name_, 0, source))
            if dry_run:
                result.bytes_copied = sum(pf.size for pf in plan if pf.rel in set(changed))
                return result
            # hashes: from the remote manifest for unchanged files, else computed here
            known = remote_manifest.by_path() if remote_manifest else {}
            need = [pf for pf in plan if not pf.sha256 and not (pf.rel not in changed and pf.rel in known
                                                                 and known[pf.rel].size == pf.size)]
            for pf in plan:
                if not pf.sha256 and pf.rel in known and pf.rel not in changed:
                    pf.sha256 = known[pf.rel].sha256
            if need:
                digests = hash_files(view, [pf.rel for pf in need], progress=progress, label="hashing")
                for pf in need:
                    pf.sha256 = digests[pf.rel]
            manifest = Manifest(
                files=[FileEntry(pf.rel, pf.size, pf.sha256 or "") for pf in plan],
                base=identity["base"], adapter=identity["adapter"],
                sources={"model": source, "base": base_label or source},
                provenance={pf.rel: [str(pf.src), pf.size, pf.mtime_ns, pf.mtime_ns] for pf in plan},
            )
            if manifest.adapter is not None:
                manifest.adapter["sha256"] = next(
                    (pf.sha256 for pf in plan if pf.rel == f"{ADAPTER_DIRNAME}/adapter_model.safetensors"), None)
            _carry_variants(manifest, src_manifest, plan)
            _ssh_run(dst.host, f"mkdir -p {shlex.quote(rwork + '/tree')}", ssh=ssh)
            link_dest = ["--link-dest", f"../../{name}"]
            literal, _ = _rsync(["-L", "--delete", "--exclude", f"/{MANIFEST_NAME}", *link_dest,
                                 str(view) + "/", f"{dst.host}:{_rdir(rwork + '/tree')}"], ssh=ssh, progress=progress)
            result.bytes_copied += literal
            for pf in plan:
                if pf.rel in changed:
                    result.actions.append(Action("copy", pf.rel, pf.size, str(pf.src)))
            mfile = work / MANIFEST_NAME
            data = manifest.to_bytes()
            mfile.write_bytes(data)
            result.manifest_digest = manifest.digest
            _rsync([str(mfile), f"{dst.host}:{rwork}/tree/{MANIFEST_NAME}"], ssh=ssh, progress=False)
            _ssh_run(dst.host, _remote_swap_script(parent, name), ssh=ssh)
            result.actions.append(Action("manifest", MANIFEST_NAME))
    return result


def _remote_state_script(rpath: str) -> str:
    q = shlex.quote(rpath)
    return (f"if [ -f {q}/{MANIFEST_NAME} ]; then echo HAS-MANIFEST; "
            f"elif [ -d {q} ] && [ -n \"$(ls -A {q})\" ]; then echo NOT-PROVISIONED; "
            f"elif [ -e {q} ] && [ ! -d {q} ]; then echo NOT-PROVISIONED; else echo EMPTY; fi")


def _remote_swap_script(parent: str, name: str) -> str:
    p, n = shlex.quote(parent), shlex.quote(name)
    work = shlex.quote(f".{name}.htr-work")
    return (f"set -e; cd {p}; sync; rm -rf {work}/old; "
            f"if [ -e {n} ]; then mv {n} {work}/old; fi; mv {work}/tree {n}; rm -rf {work}")
