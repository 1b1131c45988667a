"""Pull a directory over SFTP, for sources without rsync (Windows' OpenSSH server, ``internal-sftp`` accounts).

A small SFTP version 3 client (draft-ietf-secsh-filexfer-02, what every server speaks) over the user's own
ssh command (``ssh ... -s HOST sftp``): keys, ``~/.ssh/config``, jump hosts and known_hosts work as for
rsync, and nothing runs on the remote but its SFTP server. :func:`fetch_tree` mirrors a remote directory
into a local staging tree:

- files are listed with their sizes and modification times (symlinks and other non-regular files are
  skipped, as ``rsync -r`` does);
- a file already complete in the tree, or unchanged in DEST (same size and mtime: hard-linked), is not
  fetched again; a partial file left by an interrupted run continues at its offset when the journal says
  it came from the same remote version (size and mtime), else starts over;
- reads are pipelined (many requests in flight), hashed with sha256 as they arrive (a resumed file's
  prefix is hashed first), and a file that changed on the remote while it was read is an error;
- when the source holds an ``htr-manifest.json`` (it was provisioned), every fetched file's sha256 is
  checked against it.

Windows paths (``C:/models/htr``, ``D:\\models\\htr``) are sent with forward slashes, which Windows'
OpenSSH SFTP server accepts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import struct
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

from ..atomicfile import write_atomic
from ..errors import ProvisionError

logger = logging.getLogger(__name__)

FXP_INIT, FXP_VERSION, FXP_OPEN, FXP_CLOSE, FXP_READ = 1, 2, 3, 4, 5
FXP_STAT, FXP_OPENDIR, FXP_READDIR = 17, 11, 12
FXP_STATUS, FXP_HANDLE, FXP_DATA, FXP_NAME, FXP_ATTRS = 101, 102, 103, 104, 105
FX_OK, FX_EOF, FX_NO_SUCH_FILE, FX_PERMISSION_DENIED = 0, 1, 2, 3
ATTR_SIZE, ATTR_UIDGID, ATTR_PERMISSIONS, ATTR_ACMODTIME, ATTR_EXTENDED = 0x1, 0x2, 0x4, 0x8, 0x80000000
READ_SIZE = 32 * 1024  # every server serves at least this much per request
IN_FLIGHT = 64  # requests outstanding per file (2 MiB): loopback and WAN both stay busy
MAX_PACKET = 256 * 1024 + 1024


def remote_path(path: str) -> str:
    """A path as the SFTP server wants it: Windows back-slashes become forward slashes."""
    return path.replace("\\", "/") if "\\" in path else path


class _Reader:
    def __init__(self, stream) -> None:
        self.stream = stream

    def exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.stream.read(n - len(buf))
            if not chunk:
                raise EOFError("the SFTP session ended")
            buf += chunk
        return bytes(buf)


class _Msg:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def u32(self) -> int:
        (v,) = struct.unpack_from(">I", self.data, self.pos)
        self.pos += 4
        return v

    def u64(self) -> int:
        (v,) = struct.unpack_from(">Q", self.data, self.pos)
        self.pos += 8
        return v

    def string(self) -> bytes:
        n = self.u32()
        v = self.data[self.pos:self.pos + n]
        self.pos += n
        return v

    def attrs(self) -> dict:
        flags = self.u32()
        a: dict = {}
        if flags & ATTR_SIZE:
            a["size"] = self.u64()
        if flags & ATTR_UIDGID:
            self.u32()
            self.u32()
        if flags & ATTR_PERMISSIONS:
            a["mode"] = self.u32()
        if flags & ATTR_ACMODTIME:
            self.u32()
            a["mtime"] = self.u32()
        if flags & ATTR_EXTENDED:
            for _ in range(self.u32()):
                self.string()
                self.string()
        return a


def _s(b: bytes | str) -> bytes:
    b = b.encode("utf-8") if isinstance(b, str) else b
    return struct.pack(">I", len(b)) + b


class SftpClient:
    """One SFTP session through ``ssh_cmd + ["-s", host, "sftp"]``. Not thread-safe; use as a context manager."""

    def __init__(self, host: str, ssh_cmd: list[str]) -> None:
        cmd = [*ssh_cmd, "-s", host, "sftp"]
        logger.debug("sftp session: %s", " ".join(cmd))
        self.host = host
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._err: list[bytes] = []
        self._drain = threading.Thread(target=lambda: self._err.append(self.proc.stderr.read()), daemon=True)
        self._drain.start()
        self._in = _Reader(self.proc.stdout)
        self._id = 0
        try:
            self._send(FXP_INIT, struct.pack(">I", 3))
            kind, _ = self._recv()
        except (EOFError, BrokenPipeError, OSError) as exc:
            raise self._session_error("cannot start an SFTP session") from exc
        if kind != FXP_VERSION:
            raise ProvisionError(f"{host}: the SFTP server answered INIT with packet type {kind}",
                            remedy="check that the host offers the sftp subsystem")

    # -- plumbing
    def _session_error(self, what: str) -> ProvisionError:
        self.proc.poll()
        if self.proc.returncode is None:
            self.proc.kill()
        self.proc.wait(10)
        self._drain.join(timeout=5)
        err = b"".join(self._err).decode(errors="replace").strip()
        last = err.splitlines()[-1] if err else f"ssh exited {self.proc.returncode}"
        return ProvisionError(f"{self.host}: {what}: {last}",
                         remedy="check the host, the user's key and the ssh command (--ssh / $HTR_SSH)")

    def _send(self, kind: int, payload: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(struct.pack(">IB", len(payload) + 1, kind) + payload)
        self.proc.stdin.flush()

    def _request(self, kind: int, payload: bytes) -> int:
        self._id = (self._id + 1) & 0xFFFFFFFF
        self._send(kind, struct.pack(">I", self._id) + payload)
        return self._id

    def _recv(self) -> tuple[int, _Msg]:
        (n,) = struct.unpack(">I", self._in.exact(4))
        if n > MAX_PACKET + 1024:
            raise ProvisionError(f"{self.host}: SFTP packet of {n} bytes", remedy="the server misbehaves")
        data = self._in.exact(n)
        return data[0], _Msg(data[1:])

    def _reply(self, rid: int) -> tuple[int, _Msg]:
        try:
            kind, msg = self._recv()
        except (EOFError, BrokenPipeError, OSError) as exc:
            raise self._session_error("the SFTP session broke") from exc
        got = msg.u32()
        if got != rid:
            raise ProvisionError(f"{self.host}: SFTP reply {got} to request {rid}", remedy="the server misbehaves")
        return kind, msg

    def _call(self, kind: int, payload: bytes, path: str) -> tuple[int, _Msg]:
        try:
            rid = self._request(kind, payload)
        except (BrokenPipeError, OSError) as exc:
            raise self._session_error("the SFTP session broke") from exc
        k, msg = self._reply(rid)
        if k == FXP_STATUS:
            code = msg.u32()
            if code != FX_OK:
                self._raise_status(code, msg, path)
        return k, msg

    def _raise_status(self, code: int, msg: _Msg, path: str) -> None:
        text = msg.string().decode(errors="replace")
        if code == FX_NO_SUCH_FILE:
            raise ProvisionError(f"{self.host}:{path}: no such file or directory", remedy="check the SOURCE path")
        if code == FX_PERMISSION_DENIED:
            raise ProvisionError(f"{self.host}:{path}: permission denied", remedy="make it readable by the ssh user")
        raise ProvisionError(f"{self.host}:{path}: SFTP error {code} ({text})", remedy="check the SOURCE path")

    # -- operations
    def stat(self, path: str) -> dict:
        k, msg = self._call(FXP_STAT, _s(path), path)
        if k != FXP_ATTRS:
            raise ProvisionError(f"{self.host}:{path}: unexpected reply {k} to STAT", remedy="the server misbehaves")
        return msg.attrs()

    def listdir(self, path: str) -> list[tuple[str, dict]]:
        k, msg = self._call(FXP_OPENDIR, _s(path), path)
        handle = msg.string()
        out: list[tuple[str, dict]] = []
        try:
            while True:
                try:
                    k, msg = self._reply(self._request(FXP_READDIR, _s(handle)))
                except (BrokenPipeError, OSError) as exc:
                    raise self._session_error("the SFTP session broke") from exc
                if k == FXP_STATUS:
                    code = msg.u32()
                    if code == FX_EOF:  # the end of the listing
                        break
                    self._raise_status(code, msg, path)
                for _ in range(msg.u32()):
                    name = msg.string().decode("utf-8", errors="surrogateescape")
                    msg.string()  # longname
                    attrs = msg.attrs()
                    if name not in (".", ".."):
                        out.append((name, attrs))
        finally:
            self._close(handle, path)
        return out

    def _close(self, handle: bytes, path: str) -> None:
        self._call(FXP_CLOSE, _s(handle), path)

    def walk(self, root: str) -> dict[str, dict]:
        """``{relative posix path: {"size", "mtime"}}`` of every regular file under *root*."""
        files: dict[str, dict] = {}
        todo = [""]
        while todo:
            rel_dir = todo.pop()
            base = root.rstrip("/") or "/"
            full = base if not rel_dir else f"{base.rstrip('/')}/{rel_dir}"
            for name, a in sorted(self.listdir(full)):
                rel = f"{rel_dir}/{name}" if rel_dir else name
                mode = a.get("mode", 0)
                if stat.S_ISDIR(mode):
                    todo.append(rel)
                elif stat.S_ISREG(mode) or "mode" not in a:
                    files[rel] = {"size": a.get("size", 0), "mtime": a.get("mtime", 0)}
                else:
                    logger.info("skipping %s:%s/%s: not a regular file", self.host, root, rel)
        return files

    def read_into(self, path: str, out, *, offset: int, size: int, hasher, advance: Callable[[int], None]) -> int:
        """Read ``path[offset:size]`` into the open binary file *out* (positioned at *offset*), pipelined;
        returns the bytes read."""
        _, msg = self._call(FXP_OPEN, _s(path) + struct.pack(">II", 0x1, 0), path)
        handle = msg.string()
        pending: dict[int, tuple[int, int]] = {}  # request id -> (offset, length)
        ready: dict[int, bytes] = {}
        nxt, pos, got = offset, offset, 0
        try:
            while pos < size:
                while nxt < size and len(pending) < IN_FLIGHT:
                    n = min(READ_SIZE, size - nxt)
                    rid = self._request(FXP_READ, _s(handle) + struct.pack(">QI", nxt, n))
                    pending[rid] = (nxt, n)
                    nxt += n
                try:
                    kind, msg = self._recv()
                except (EOFError, OSError) as exc:
                    raise self._session_error(f"reading {path} broke off") from exc
                rid = msg.u32()
                off, n = pending.pop(rid)
                if kind == FXP_STATUS:
                    code = msg.u32()
                    if code == FX_EOF:
                        raise ProvisionError(f"{self.host}:{path}: shorter than listed (changed while copying?)",
                                        remedy="run the provision again once the source is stable")
                    self._raise_status(code, msg, path)
                data = msg.string()
                if len(data) < n:  # a short read: ask for the rest
                    rid2 = self._request(FXP_READ, _s(handle) + struct.pack(">QI", off + len(data), n - len(data)))
                    pending[rid2] = (off + len(data), n - len(data))
                if data:
                    ready[off] = data
                while pos in ready:
                    chunk = ready.pop(pos)
                    out.write(chunk)
                    hasher.update(chunk)
                    pos += len(chunk)
                    got += len(chunk)
                    advance(len(chunk))
        finally:
            while pending:  # drain answers to requests still in flight before CLOSE
                try:
                    _, msg = self._recv()
                    pending.pop(msg.u32(), None)
                except (EOFError, OSError, KeyError):
                    break
            if self.proc.poll() is None:
                try:
                    self._close(handle, path)
                except ProvisionError:
                    pass
        return got

    def close(self) -> None:
        if self.proc.stdin:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._drain.join(timeout=5)
        for s in (self.proc.stdout, self.proc.stderr):
            if s:
                s.close()

    def __enter__(self) -> SftpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fetch_tree(client: SftpClient, root: str, tree: Path, dest: Path | None, *, exclude: set[str],
               journal: Path, advance: Callable[[int], None] = lambda n: None) -> dict:
    """Mirror ``root`` on the remote into *tree* (see the module docstring).

    Returns ``{"bytes": fetched, "hashes": {rel: sha256 of fetched files}, "resumed": [rel],
    "linked": [rel], "files": {rel: {"size", "mtime"}}}``.
    """
    from ..manifest import unsafe_relpath

    root = remote_path(root)
    files = {r: a for r, a in client.walk(root).items() if r not in exclude}
    for rel in files:
        why = unsafe_relpath(rel)
        if why:
            raise ProvisionError(f"{client.host}:{root}: the server lists {rel!r} ({why})", remedy="the server misbehaves")
    try:
        started = json.loads(journal.read_text()) if journal.is_file() else {}
    except (OSError, ValueError):
        started = {}
    # files an earlier, interrupted run staged that the source no longer has
    for p in sorted(tree.rglob("*"), reverse=True):
        rel = p.relative_to(tree).as_posix()
        if p.is_file() and rel not in files:
            p.unlink()
    out: dict = {"bytes": 0, "hashes": {}, "resumed": [], "linked": [], "files": files}
    for rel, a in sorted(files.items(), key=lambda kv: -kv[1]["size"]):
        size, mtime = int(a["size"]), int(a["mtime"])
        local = tree / rel
        local.parent.mkdir(parents=True, exist_ok=True)
        st = local.stat() if local.is_file() else None
        if st and st.st_size == size and int(st.st_mtime) == mtime and started.get(rel) == [size, mtime, "done"]:
            continue  # complete from an earlier run (hashed later by the staging pass)
        if st is None and dest is not None and (dest / rel).is_file():
            d = (dest / rel).stat()
            if d.st_size == size and int(d.st_mtime) == mtime:
                try:
                    os.link(dest / rel, local)
                    out["linked"].append(rel)
                    continue
                except OSError:
                    pass  # another file system: fetch it
        offset = 0
        hasher = hashlib.sha256()
        if st and started.get(rel) == [size, mtime] and st.st_size <= size:
            offset = st.st_size
            with open(local, "rb") as f:
                while chunk := f.read(1 << 20):
                    hasher.update(chunk)
            out["resumed"].append(rel)
        else:
            started[rel] = [size, mtime]
            _save_journal(journal, started)
        with open(local, "r+b" if offset else "wb") as f:
            f.seek(offset)
            out["bytes"] += client.read_into(f"{root.rstrip('/')}/{rel}", f, offset=offset, size=size,
                                             hasher=hasher, advance=advance)
            f.flush()
            os.fsync(f.fileno())
        now = client.stat(f"{root.rstrip('/')}/{rel}")
        if int(now.get("size", -1)) != size or int(now.get("mtime", -1)) != mtime:
            local.unlink()
            started.pop(rel, None)
            _save_journal(journal, started)
            raise ProvisionError(f"{client.host}:{root}/{rel}: changed on the remote while it was copied",
                            remedy="run the provision again once the source is stable")
        os.utime(local, (mtime, mtime))
        out["hashes"][rel] = hasher.hexdigest()
        started[rel] = [size, mtime, "done"]
        _save_journal(journal, started)
    return out


def _save_journal(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data), make_parents=False)


def read_remote_manifest(client: SftpClient, root: str, name: str) -> bytes | None:
    """The source's own manifest, when it has one (None otherwise)."""
    import io

    path = f"{remote_path(root).rstrip('/')}/{name}"
    try:
        a = client.stat(path)
    except ProvisionError:
        return None
    buf = io.BytesIO()
    client.read_into(path, buf, offset=0, size=int(a.get("size", 0)), hasher=hashlib.sha256(), advance=lambda n: None)
    return buf.getvalue()
