"""Security properties, each checked against the real thing.

- The socket is reachable only by its group: mode 0660 and the configured group; a uid outside the group
  (``nobody``, through ``setpriv``) is refused by the kernel, the same uid with the group is served.
- The daemon opens no path a client names: bodies, batch file names, headers and query strings naming a
  canary file get a 4xx (or are ignored), and inotify on the canary sees no open; no fd points at it.
- A manifest cannot name a path outside the model directory (``../``, absolute, a symlink out): verify
  rejects each and the daemon refuses to start with exit 65 naming the file.
- Weights load from safetensors only: the shared daemon's model directory carries booby-trapped pickle
  files (``pytorch_model.bin``, ``final_model/adapter_model.bin``) that would write a marker file when
  unpickled; the daemon loads and serves, verify flags them, and the marker never appears.
- No remote code: the source (AST, not comments) never passes ``trust_remote_code`` other than False,
  never ``device_map="auto"``, never calls ``torch.load``/``pickle.load``; every ``from_pretrained`` in the
  daemon is ``local_files_only=True`` (model loads also ``use_safetensors=True``).
- Request logs carry the peer's uid and never image contents or secrets sent in headers.
"""

from __future__ import annotations

import ast
import ctypes
import ctypes.util
import grp
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from helpers import REPO, wait_until

from . import hostile as H
from .conftest import SOCKET_GROUP

pytestmark = pytest.mark.timeout(300)


def _require_root_setpriv():
    from helpers import require_system

    require_system(os.geteuid() == 0 and shutil.which("setpriv") is not None, "root and setpriv (util-linux)")
    require_system(SOCKET_GROUP is not None, "a 'daemon' group (the shared socket's group)")


def _connect_as(sock: Path, *setpriv_args: str) -> subprocess.CompletedProcess:
    code = ("import socket,sys\n"
            "s=socket.socket(socket.AF_UNIX)\n"
            "try:\n s.connect(sys.argv[1])\nexcept OSError as e:\n print('ERR', e.errno, e.strerror); sys.exit(3)\n"
            "s.sendall(b'GET /v1/ready HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n')\n"
            "print(s.recv(200).split(b'\\r\\n')[0].decode())\n")
    return subprocess.run(["setpriv", *setpriv_args, sys.executable, "-I", "-c", code, str(sock)],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.slow
def test_socket_is_not_reachable_by_other_users(shared_daemon, record):
    _require_root_setpriv()
    sock = shared_daemon.socket_path
    st = sock.stat()
    mode = st.st_mode & 0o777
    group = grp.getgrgid(st.st_gid).gr_name
    assert mode == 0o660, oct(mode)
    assert group == SOCKET_GROUP, group  # SHARED_CONFIG socket.group
    outsider = _connect_as(sock, "--reuid=65534", "--regid=65534", "--clear-groups")
    assert outsider.returncode == 3 and "ERR 13" in outsider.stdout, outsider.stdout + outsider.stderr
    member = _connect_as(sock, "--reuid=65534", "--regid=65534", f"--groups={st.st_gid}")
    assert member.returncode == 0 and member.stdout.startswith("HTTP/1.1 200"), member.stdout + member.stderr
    record("security", "socket reachable only by its group", check="mode and group of the socket; connect as uid 65534",
           observed=f"mode {oct(mode)}, group {group}; uid 65534 without the group: EACCES; "
                    f"with the group: {member.stdout.strip()}")


# ------------------------------------------------------------------------------------- client-named paths
class _Inotify:
    """Minimal inotify (ctypes): did anything open or read these files?"""

    IN_ACCESS, IN_OPEN = 0x001, 0x020

    def __init__(self, paths: list[Path]) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        for p in paths:
            if libc.inotify_add_watch(self.fd, os.fsencode(p), self.IN_OPEN | self.IN_ACCESS) < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {p}")

    def events(self) -> int:
        n = 0
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return n
            off = 0
            while off < len(buf):
                _, _, _, length = struct.unpack_from("iIII", buf, off)
                off += 16 + length
                n += 1

    def close(self) -> None:
        os.close(self.fd)


def _fd_targets(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return out


@pytest.mark.slow
def test_the_daemon_opens_no_path_a_client_names(shared_daemon, record, tmp_path):
    canary = tmp_path / "canary.png"
    canary.write_bytes(H.encode(H.line_image()))  # a valid image: were it opened, it would transcribe
    secret = tmp_path / "secret.txt"
    secret.write_text("not for clients\n")
    watch = _Inotify([canary, secret])
    fds_before = _fd_targets(shared_daemon.pid)
    answers = []
    try:
        for name in (str(canary), f"file://{canary}", f"{canary}\n", f"../../../..{canary}", str(secret)):
            r = shared_daemon.post("/v1/transcribe", content=name.encode(), timeout=30)
            assert r.status_code == 415 and r.json()["error"]["type"] == "bad_image", r.text
            answers.append(r.status_code)
        r = shared_daemon.post("/v1/transcribe", content=json.dumps({"path": str(canary)}).encode(),
                               headers={"Content-Type": "application/json"}, timeout=30)
        assert r.status_code == 415, r.text
        answers.append(r.status_code)
        # a batch part *named* like the canary, with bytes that are not an image: the name is only echoed
        r = shared_daemon.post("/v1/transcribe/batch", files=[("image", (str(canary), b"not an image", "image/png"))],
                               timeout=30)
        assert r.status_code == 200 and r.json()["items"][0]["error"]["type"] == "bad_image", r.text
        assert r.json()["items"][0]["filename"] == str(canary)
        answers.append(r.status_code)
        # path-looking query parameters and headers are ignored (or refused), never opened
        r = shared_daemon.post("/v1/transcribe", params={"path": str(canary), "file": str(secret)},
                               headers={"X-File": str(canary), "Content-Location": f"file://{canary}"},
                               content=b"", timeout=30)
        assert r.status_code == 400 and r.json()["error"]["type"] == "bad_image", r.text
        answers.append(r.status_code)
        for url in (f"/v1/transcribe/..{canary}", f"/{canary}", f"/v1/status/../../..{secret}"):
            r = shared_daemon.get(url)
            assert r.status_code in (404, 405), (url, r.status_code, r.text)
            answers.append(r.status_code)
        opened = watch.events()
    finally:
        watch.close()
    fds_after = _fd_targets(shared_daemon.pid)
    assert opened == 0, f"{opened} open/read events on the canary files"
    assert not {str(canary), str(secret)} & fds_after
    assert len(fds_after - fds_before) <= 2  # a connection socket may still be closing, nothing else
    record("security", "the daemon opens no client-named path",
           check=f"{len(answers)} requests naming a canary file (body, JSON, batch file name, query, headers, URL)",
           observed=f"answers {sorted(set(answers))}; inotify open/read events on the canaries: {opened}; "
                    "no fd points at them")


# --------------------------------------------------------------------------------------- manifest paths
def _rewrite_manifest(model: Path, mutate) -> None:
    path = model / "htr-manifest.json"
    data = json.loads(path.read_text())
    mutate(data)
    path.write_text(json.dumps(data, indent=1))


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink_out"])
def test_a_manifest_cannot_name_a_path_outside_the_model_dir(provisioned_model, tmp_path, record, kind):
    from daemon_harness import launch

    from htrctl.verify import verify_model_dir

    model = tmp_path / "model"
    shutil.copytree(provisioned_model, model)
    outside = tmp_path / "outside.safetensors"
    shutil.copyfile(model / "model-00001-of-00003.safetensors", outside)
    if kind == "dotdot":
        def mutate(m):
            m["files"][0]["path"] = "../outside.safetensors"
        _rewrite_manifest(model, mutate)
        bad = "../outside.safetensors"
    elif kind == "absolute":
        def mutate(m):
            m["files"][0]["path"] = str(outside)
        _rewrite_manifest(model, mutate)
        bad = str(outside)
    else:
        target = model / "model-00002-of-00003.safetensors"
        target.unlink()
        target.symlink_to(outside)
        bad = "model-00002-of-00003.safetensors"
    report = verify_model_dir(model, quick=True)
    unsafe = [f for f in report.findings if f.code == "unsafe_path"]
    assert not report.ok and unsafe, report.to_dict()
    assert any(f.path == bad for f in unsafe), [(f.path, f.problem) for f in unsafe]
    (tmp_path / "d").mkdir()
    d = launch(tmp_path / "d", model)
    code = d.wait_exit(120)
    err = d.stderr()
    assert code == 65, err[-2000:]
    assert bad in err or unsafe[0].path in err, err[-2000:]
    record("security", f"manifest path outside the model dir ({kind})", check=f"verify + htrd start with {bad!r}",
           observed=f"verify: {unsafe[0].problem}; htrd exit {code}, log names {unsafe[0].path}")


# --------------------------------------------------------------------------------------- pickle weights
@pytest.mark.slow
def test_pickle_files_next_to_the_weights_are_never_loaded(shared_daemon, trapped_marker, record):
    """The shared daemon's model directory carries booby-trapped pickles (conftest: trapped_model)."""
    from htrctl.verify import verify_model_dir

    assert shared_daemon.state() == "ready"
    r = shared_daemon.post("/v1/transcribe", content=H.encode(H.line_image()), timeout=60)
    assert r.status_code == 200, r.text
    assert not trapped_marker.exists(), "a pickle next to the weights was unpickled"
    model = Path(shared_daemon.status()["model_dir"])
    planted = sorted(p.relative_to(model).as_posix() for p in model.rglob("*") if p.suffix in (".bin", ".pt"))
    assert planted == ["final_model/adapter_model.bin", "pytorch_model.bin", "training_args.pt"], planted
    report = verify_model_dir(model, quick=True)
    flagged = sorted(f.path for f in report.findings if f.code == "pickle_weights")
    assert "pytorch_model.bin" in flagged and "training_args.pt" in flagged, report.to_dict()
    adapter_flagged = any("adapter_model.bin" in f.path for f in report.findings)
    record("security", "weights load from safetensors only",
           check=f"htrd loads a model dir with booby-trapped pickles: {', '.join(planted)}",
           observed=f"served 200; the pickles' marker file was never written; verify flags {', '.join(flagged)}"
                    + ("" if adapter_flagged else " (not final_model/adapter_model.bin: it looks only at the top "
                       "level when adapter_model.safetensors exists)"))


def test_a_pickle_in_a_provisioned_dir_stops_the_daemon(provisioned_model, tmp_path, record):
    from daemon_harness import launch

    model = tmp_path / "model"
    shutil.copytree(provisioned_model, model)
    (model / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    (tmp_path / "d").mkdir()
    d = launch(tmp_path / "d", model)
    code = d.wait_exit(120)
    assert code == 65, d.stderr()[-2000:]
    assert "pytorch_model.bin" in d.stderr()
    record("security", "a pickle planted in a provisioned dir", check="htrd start on a provisioned dir + pytorch_model.bin",
           observed=f"htrd exit {code}; the log names pytorch_model.bin (not in the manifest)")


# --------------------------------------------------------------------------------------- the source
SHIPPED = ["htrctl", "daemon"]


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _func_name(call: ast.Call) -> str:
    f = call.func
    if isinstance(f, ast.Attribute):
        base = f.value.id if isinstance(f.value, ast.Name) else "?"
        return f"{base}.{f.attr}"
    return f.id if isinstance(f, ast.Name) else "?"


def _dict_keywords(tree: ast.AST, name: str) -> dict[str, ast.AST]:
    """Keywords of ``name = dict(k=v, ...)`` / ``name: T = dict(...)`` / ``{...}`` assignments and later ``name[k] = v``."""
    out: dict[str, ast.AST] = {}
    for node in ast.walk(tree):
        value = None
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            value = node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
            value = node.value
        if isinstance(value, ast.Call) and _func_name(value) == "dict":
            out.update({k.arg: k.value for k in value.keywords if k.arg})
        elif isinstance(value, ast.Dict):
            out.update({k.value: v for k, v in zip(value.keys, value.values) if isinstance(k, ast.Constant)})
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Subscript):
            t = node.targets[0]
            if isinstance(t.value, ast.Name) and t.value.id == name and isinstance(t.slice, ast.Constant):
                out[t.slice.value] = node.value
    return out


def test_no_remote_code_no_auto_device_map_no_pickle_loads(record):
    files = [p for d in SHIPPED for p in sorted((REPO / d).rglob("*.py"))]
    assert len(files) > 20
    problems = []
    loads = 0
    for path in files:
        rel = path.relative_to(REPO).as_posix()
        tree = ast.parse(path.read_text(), filename=rel)
        for call in _calls(tree):
            name = _func_name(call)
            kws = {k.arg: k.value for k in call.keywords if k.arg}
            for star in (k.value for k in call.keywords if k.arg is None and isinstance(k.value, ast.Name)):
                kws.update(_dict_keywords(tree, star.id))
            trc = kws.get("trust_remote_code")
            if trc is not None and not (isinstance(trc, ast.Constant) and trc.value is False):
                problems.append(f"{rel}:{call.lineno}: trust_remote_code={ast.unparse(trc)}")
            dm = kws.get("device_map")
            if isinstance(dm, ast.Constant) and dm.value in ("auto", "balanced", "sequential", "balanced_low_0"):
                problems.append(f"{rel}:{call.lineno}: device_map={dm.value!r}")
            if name in ("torch.load", "pickle.load", "pickle.loads", "joblib.load", "dill.load"):
                problems.append(f"{rel}:{call.lineno}: {name}()")
            if name.endswith(".from_pretrained") and rel.startswith("daemon/"):
                loads += 1
                lfo = kws.get("local_files_only")
                if not (isinstance(lfo, ast.Constant) and lfo.value is True):
                    problems.append(f"{rel}:{call.lineno}: {name} without local_files_only=True")
                if "Model" in name and "Peft" not in name:
                    st = kws.get("use_safetensors")
                    if not (isinstance(st, ast.Constant) and st.value is True):
                        problems.append(f"{rel}:{call.lineno}: {name} without use_safetensors=True")
    assert loads >= 3
    assert not problems, "\n".join(problems)
    record("security", "no remote code", check=f"AST of {len(files)} files in htrctl/ and daemon/",
           observed=f"no trust_remote_code, no device_map='auto', no torch.load/pickle.load; all {loads} "
                    "from_pretrained calls in the daemon are local_files_only (models: use_safetensors)")


# --------------------------------------------------------------------------------------------- logs
def _png_with_text(key: str, value: str) -> bytes:
    png = H.encode(H.line_image())
    data = key.encode() + b"\x00" + value.encode()
    chunk = struct.pack(">I", len(data)) + b"tEXt" + data + struct.pack(">I", zlib.crc32(b"tEXt" + data) & 0xFFFFFFFF)
    return png[:33] + chunk + png[33:]  # after IHDR


@pytest.mark.slow
def test_request_logs_carry_the_peer_uid_and_no_contents_or_secrets(shared_daemon, record):
    canary = "CANARY-image-text-7f3a9c"
    token = "SECRET-token-b81d2e"
    body = _png_with_text("Comment", canary)
    logged_before = len(shared_daemon.stderr())
    rid = "sec-log-check-1"
    r = shared_daemon.post("/v1/transcribe", content=body, timeout=60,
                           headers={"X-Request-Id": rid, "Authorization": f"Bearer {token}",
                                    "Cookie": f"session={token}", "X-Api-Key": token})
    assert r.status_code == 200, r.text
    bad_rid = "sec-log-check-2"
    r2 = shared_daemon.post("/v1/transcribe", content=f'{{"password": "{token}", "note": "{canary}"}}'.encode(),
                            headers={"X-Request-Id": bad_rid, "Authorization": f"Bearer {token}"}, timeout=60)
    assert r2.status_code == 415
    r3 = shared_daemon.post("/v1/transcribe/batch", headers={"X-Request-Id": "sec-log-check-3"}, timeout=60,
                            files=[("image", (f"{canary}.png", body, "image/png"))])
    assert r3.status_code == 200
    def request_lines() -> list[str]:
        return [ln for ln in shared_daemon.stderr()[logged_before:].splitlines()
                if "sec-log-check-" in ln and "peer_uid=" in ln]

    # htrd logs a request's line once its response is sent: the client can have the answer a moment earlier
    wait_until(lambda: len(request_lines()) >= 3, 10, "the three requests' log lines")
    logs = shared_daemon.stderr()[logged_before:]
    lines = request_lines()
    assert len(lines) >= 3, logs[-2000:]
    assert all(f"peer_uid={os.getuid()}" in ln for ln in lines), lines
    assert canary not in logs and token not in logs, [ln for ln in logs.splitlines() if canary in ln or token in ln]
    assert body[8:40].hex() not in logs and "iVBORw0KGgo" not in logs  # no hex or base64 of the image
    record("security", "request logs: peer uid, no contents or secrets",
           check="requests with a canary in a PNG tEXt chunk, a JSON body and a file name; a token in "
                 "Authorization/Cookie/X-Api-Key",
           observed=f"{len(lines)} request lines, each with peer_uid={os.getuid()}; canary and token absent "
                    f"from {len(logs.splitlines())} log lines")
