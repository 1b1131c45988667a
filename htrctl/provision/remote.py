"""Provisioning a remote DEST: rsync into a staging tree on the remote host (``--link-dest`` to the current
DEST, ``--partial-dir`` for resume), an ``mv`` swap over ssh, the lock an ``flock`` held by an ssh session."""

from __future__ import annotations

import os
import shlex
import subprocess
import tempfile
from pathlib import Path

from ..errors import LockedError, ProvisionError
from ..manifest import MANIFEST_NAME, FileEntry, Manifest, ManifestFormatError, hash_files
from ..modeldir import ADAPTER_DIRNAME
from .locations import Hub, Local, Remote
from .plan import carry_variants, gather, trusted_hashes
from .result import Action, ProvisionResult
from .transport import itemized, rdir, run_rsync, ssh_command, ssh_run


def provision_to_remote(
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
        plan, identity, base_label, src_manifest = gather(
            source, src_loc, str(dst), base=base, allow_download=allow_download, progress=progress, ssh=ssh,
            work=work)
        result.base = base_label
        result.files = len(plan)
        result.total_size = sum(pf.size for pf in plan)
        trusted_hashes(plan, src_manifest, src_loc.path if isinstance(src_loc, Local) else None)
        # a view of the DEST layout (symlinks to the sources) that rsync -L sends as one tree
        view = work / "view"
        for pf in plan:
            (view / pf.rel).parent.mkdir(parents=True, exist_ok=True)
            (view / pf.rel).symlink_to(pf.src.resolve())
        view.mkdir(exist_ok=True)
        with _RemoteLock(dst.host, f"{parent}/.{name}.htr-lock", ssh):
            state = ssh_run(dst.host, _remote_state_script(rpath), ssh=ssh).stdout
            if "NOT-PROVISIONED" in state:
                raise ProvisionError(f"{dst} exists, is not empty and has no {MANIFEST_NAME}: refusing to replace it",
                                     remedy="provision into a new or empty remote directory")
            remote_manifest = None
            if "HAS-MANIFEST" in state:
                body = ssh_run(dst.host, f"cat {shlex.quote(rpath + '/' + MANIFEST_NAME)}", ssh=ssh).stdout
                try:
                    remote_manifest = Manifest.from_bytes(body.encode())
                except ManifestFormatError:
                    remote_manifest = None
            # what would change at DEST itself
            _, out = run_rsync(["-L", "--delete", "--exclude", f"/{MANIFEST_NAME}", str(view) + "/",
                             f"{dst.host}:{rdir(rpath)}"], ssh=ssh, progress=False, dry_run=True)
            items = itemized(out)
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
            carry_variants(manifest, src_manifest, plan)
            ssh_run(dst.host, f"mkdir -p {shlex.quote(rwork + '/tree')}", ssh=ssh)
            link_dest = ["--link-dest", f"../../{name}"]
            literal, _ = run_rsync(["-L", "--delete", "--exclude", f"/{MANIFEST_NAME}", *link_dest,
                                 str(view) + "/", f"{dst.host}:{rdir(rwork + '/tree')}"], ssh=ssh, progress=progress)
            result.bytes_copied += literal
            for pf in plan:
                if pf.rel in changed:
                    result.actions.append(Action("copy", pf.rel, pf.size, str(pf.src)))
            mfile = work / MANIFEST_NAME
            data = manifest.to_bytes()
            mfile.write_bytes(data)
            result.manifest_digest = manifest.digest
            run_rsync([str(mfile), f"{dst.host}:{rwork}/tree/{MANIFEST_NAME}"], ssh=ssh, progress=False)
            ssh_run(dst.host, _remote_swap_script(parent, name), ssh=ssh)
            result.actions.append(Action("manifest", MANIFEST_NAME))
    return result


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
