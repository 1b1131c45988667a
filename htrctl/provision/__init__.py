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

The package, along those steps: :mod:`.locations` (what SOURCE and DEST are),
:mod:`.plan` (1-3), :mod:`.staging` (4-5: lock, journal, copy, swap),
:mod:`.local` and :mod:`.remote` (the two kinds of DEST), :mod:`.fetch`,
:mod:`.transport` and :mod:`.sftp` (reaching the other host), :mod:`.result`
(what was done); :func:`provision`, the entry point, is here.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from pathlib import Path

from ..errors import InterruptedRunError, ProvisionError
from .local import provision_local
from .locations import Hub, Local, Remote, parse_location
from .remote import provision_to_remote
from .result import Action, ProvisionResult
from .transport import TRANSPORTS, pick_transport, rsync_cause, ssh_command

__all__ = [
    "TRANSPORTS",
    "Action",
    "Hub",
    "Local",
    "ProvisionResult",
    "Remote",
    "parse_location",
    "pick_transport",
    "provision",
    "rsync_cause",
    "ssh_command",
]


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
        result = provision_to_remote(source, src_loc, dst_loc, base=base, dry_run=dry_run,
                                      allow_download=allow_download, progress=progress, ssh=ssh)
    else:
        try:
            result = provision_local(source, src_loc, dst_loc.path, base=base, merge=merge, dry_run=dry_run,
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
