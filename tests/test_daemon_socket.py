"""htrd binding its own socket (htrd.sock.bind_socket): the exact mode and group, published at once, a live
socket never stolen, and the process umask -- shared by every thread; the socket watch re-binds while htrd
serves -- never touched."""

from __future__ import annotations

import grp
import os
import socket
import stat
import subprocess
import sys
import textwrap

import pytest

from htrctl.errors import ConfigError
from htrd.sock import bind_socket

# Runs in its own process: an audit hook cannot be removed again. At the moment the socket is bound (the
# "socket.bind" audit event fires inside bind_socket, just before the system call) it creates a file the way
# any other thread of htrd might, and reports the mode that file got.
_PROBE = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from htrd.sock import bind_socket

    sock_path, probe = Path(sys.argv[1]), Path(sys.argv[2])
    os.umask(0o022)
    seen = []

    def hook(event, args):
        if event == "socket.bind" and not seen:
            os.close(os.open(probe, os.O_CREAT | os.O_WRONLY, 0o666))
            seen.append(os.stat(probe).st_mode & 0o777)

    sys.addaudithook(hook)
    bind_socket(sock_path, mode=0o660, group=None)
    print(oct(seen[0]), oct(os.stat(sock_path).st_mode & 0o777), oct(os.umask(0o022)))
""")


def test_a_file_created_while_the_socket_is_bound_keeps_the_process_umask(tmp_path):
    res = subprocess.run([sys.executable, "-c", _PROBE, str(tmp_path / "htrd.sock"), str(tmp_path / "probe")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    probe_mode, sock_mode, umask_after = res.stdout.split()
    assert probe_mode == "0o644"  # 0666 & ~022: not 0600 from an umask switched around bind()
    assert sock_mode == "0o660" and umask_after == "0o22"


def test_the_socket_appears_with_exactly_its_mode_and_group_and_nothing_else(tmp_path):
    path = tmp_path / "htrd.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # nothing listens on it: replaced
    stale.close()
    group = grp.getgrgid(os.getegid())
    old = os.umask(0o077)  # a default that differs from the mode asked for
    try:
        sock = bind_socket(path, mode=0o660, group=group.gr_name)
    finally:
        os.umask(old)
    try:
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == group.gr_gid
        assert sorted(p.name for p in tmp_path.iterdir()) == ["htrd.sock"]  # no temporary name left behind
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(path))  # the listening socket is the one at the path
            conn, _ = sock.accept()
            conn.close()
    finally:
        sock.close()


def test_binding_over_a_live_socket_is_refused_and_leaves_nothing_behind(tmp_path):
    path = tmp_path / "htrd.sock"
    first = bind_socket(path, mode=0o600, group=None)
    try:
        before = os.lstat(path).st_ino
        with pytest.raises(ConfigError, match="in use by a running process"):
            bind_socket(path, mode=0o600, group=None)
        assert os.lstat(path).st_ino == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["htrd.sock"]
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(path))
    finally:
        first.close()
