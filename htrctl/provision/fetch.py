"""Pulling a remote SOURCE (or base) into the local staging tree: rsync, or SFTP where the remote has no rsync."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..manifest import MANIFEST_NAME, ManifestFormatError, byte_progress, read_manifest
from .locations import Remote
from .result import Action, ProvisionResult
from .transport import itemized, rdir, run_rsync, ssh_command

logger = logging.getLogger(__name__)

def fetch_sftp(src: Remote, tree: Path, dest: Path | None, journal: Path, *, ssh: str | None,
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


def sftp_dry_run(result: ProvisionResult, src: Remote, dest: Path, ssh: str | None) -> ProvisionResult:
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


def fetch_rsync(src: Remote, tree: Path, dest: Path, *, ssh: str | None, progress: bool) -> int:
    """rsync a remote SOURCE into the local staging tree, hard-linking files DEST already holds."""
    # --delete: files an earlier, interrupted run staged from an older SOURCE do not survive
    args = ["--delete", "--exclude", f"/{MANIFEST_NAME}", "--exclude", "/.htr-lock"]
    if dest.is_dir():
        args += [f"--link-dest={dest}"]
    literal, _ = run_rsync(args + [f"{src.host}:{rdir(src.path)}", str(tree) + "/"], ssh=ssh, progress=progress)
    return literal


def rsync_dry_run(result: ProvisionResult, src: Remote, dest: Path, ssh: str | None) -> ProvisionResult:
    target = str(dest) + "/" if dest.is_dir() else tempfile.mkdtemp(prefix="htr-dry-") + "/"
    try:
        _, out = run_rsync(["--exclude", f"/{MANIFEST_NAME}", f"{src.host}:{rdir(src.path)}", target],
                        ssh=ssh, progress=False, dry_run=True)
    finally:
        if not dest.is_dir():
            shutil.rmtree(target, ignore_errors=True)
    for kind, name in itemized(out):
        result.actions.append(Action("fetch" if kind == "send" else kind, name, 0, str(src)))
    result.base = None
    return result
