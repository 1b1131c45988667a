"""Provisioning a local DEST: from a local directory, the hub cache or a remote SOURCE; in place (SOURCE ==
DEST: adopt it); with ``--merge``."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..errors import ProvisionError
from ..manifest import (
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    ManifestFormatError,
    hash_files,
    read_manifest,
    walk_files,
    write_manifest,
)
from ..modeldir import ADAPTER_DIRNAME, MERGED_DIRNAME
from .fetch import fetch_rsync, fetch_sftp, rsync_dry_run, sftp_dry_run
from .locations import Hub, Local, Remote, parse_location
from .plan import PlanFile, carry_variants, gather, layout, local_tree, trusted_hashes
from .result import Action, ProvisionResult
from .staging import DestLock, Journal, check_dest_replaceable, recover_swap, stage, swap_into_place
from .transport import itemized, pick_transport, rdir, run_rsync

logger = logging.getLogger(__name__)

def provision_local(
    source: str, src_loc: Local | Remote | Hub, dest: Path, *, base: str | None, merge: bool, dry_run: bool,
    allow_download: bool, progress: bool, ssh: str | None, transport: str = "auto",
) -> ProvisionResult:
    dest = dest.absolute()
    result = ProvisionResult(source=source, dest=str(dest), dry_run=dry_run)
    in_place = isinstance(src_loc, Local) and src_loc.path.exists() and dest.exists() and \
        src_loc.path.resolve() == dest.resolve()
    work = dest.parent / f".{dest.name}.htr-work"
    with DestLock(dest):
        recover_swap(dest, work)
        old = None if in_place else check_dest_replaceable(dest)
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
                    return sftp_dry_run(result, src_loc, dest, ssh)
                return rsync_dry_run(result, src_loc, dest, ssh)
            assert fetched is not None
            if use == "sftp":
                sftp_got = fetch_sftp(src_loc, fetched, dest, work / "sftp-journal.json", ssh=ssh,
                                       progress=progress)
                result.bytes_copied += sftp_got["bytes"]
                for rel in sftp_got["resumed"]:
                    result.actions.append(Action("resume", rel, sftp_got["files"][rel]["size"], f"{source} (sftp)"))
            else:
                result.bytes_copied += fetch_rsync(src_loc, fetched, dest, ssh=ssh, progress=progress)
        if dry_run and base and isinstance(parse_location(base), Remote) and isinstance(src_loc, Local):
            return _dry_run_remote_base(result, src_loc.path.absolute(), parse_location(base), ssh)
        plan, identity, base_label, src_manifest = gather(
            source, src_loc, str(dest), base=base, allow_download=allow_download, progress=progress, ssh=ssh,
            work=work, fetched=fetched, transport=transport)
        if sftp_got is not None:  # hashed as they arrived: not read again
            for pf in plan:
                if pf.origin == "model" and pf.rel in sftp_got["hashes"]:
                    pf.sha256 = sftp_got["hashes"][pf.rel]
        result.base = base_label
        if in_place:
            return _adopt_in_place(result, dest, plan, identity, merge=merge, dry_run=dry_run, progress=progress)
        trusted_hashes(plan, src_manifest, src_loc.path if isinstance(src_loc, Local) else None)
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
        journal = Journal(work / "journal.jsonl")
        try:
            hashes = stage(plan, keep, todo, tree, dest, journal, fetched, result, progress)
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
        carry_variants(manifest, src_manifest, plan)
        if merge:
            _do_merge(tree, manifest, old, dest, result, progress)
        (tree / MANIFEST_NAME).unlink(missing_ok=True)
        result.manifest_digest = write_manifest(tree, manifest)
        result.actions.append(Action("manifest", MANIFEST_NAME))
        swap_into_place(tree, dest, work)
        shutil.rmtree(work, ignore_errors=True)
        return result


def _label(loc: Local | Remote | Hub, given: str) -> str:
    return str(loc.path.absolute()) if isinstance(loc, Local) else given


def _dry_run_remote_base(result: ProvisionResult, root: Path, base: Remote, ssh: str | None) -> ProvisionResult:
    """--dry-run with --base host:path: list what would move without fetching the base."""
    files, has_base = layout(root, local_tree(root))
    for rel, p in sorted(files.items()):
        result.actions.append(Action("copy", rel, p.stat().st_size, str(p)))
    result.base = str(base)
    if not has_base:
        with tempfile.TemporaryDirectory(prefix="htr-dry-") as tmp:
            _, out = run_rsync(["--exclude", f"/{ADAPTER_DIRNAME}", f"{base.host}:{rdir(base.path)}", tmp + "/"],
                            ssh=ssh, progress=False, dry_run=True)
        for kind, name in itemized(out):
            if kind == "send" and name not in files:
                result.actions.append(Action("fetch", name, 0, str(base)))
    result.files = len(result.actions)
    result.bytes_copied = sum(a.size for a in result.actions)
    logger.info("dry run: the adapter/base pair is checked once the base is fetched")
    return result


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
