"""htrd's listening socket: systemd's (socket activation, fd 3) or one bound at ``socket.path``.

One home for binding, used at start (:func:`open_socket`) and by :mod:`htrd.sockwatch` when the file was
deleted while htrd ran (:func:`bind_socket`). Binding never changes the process umask: the socket is bound
at a temporary name, given its group and mode, then linked to the path.
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import secrets
import socket
import stat
from pathlib import Path

from htrctl.errors import ConfigError, HtrError

logger = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3


def identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of *path*, or None: tells our socket file from a successor's."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def open_socket(settings, env: dict | None = None) -> socket.socket:
    """systemd's socket (LISTEN_FDS, fd 3) or the configured path, bound with mode and group."""
    env = os.environ if env is None else env
    fds, pid = env.get("LISTEN_FDS"), env.get("LISTEN_PID")
    if fds and pid and pid.isdigit() and int(pid) == os.getpid():
        for k in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
            os.environ.pop(k, None)  # not inherited by children
        if int(fds) < 1:
            raise ConfigError("LISTEN_FDS is set but passes no socket", remedy="check htr.socket")
        sock = socket.socket(fileno=SD_LISTEN_FDS_START)
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise ConfigError(f"the socket passed by systemd is {sock.family.name}/{sock.type.name}, not a Unix "
                              "stream socket", remedy="htr.socket must use ListenStream=/run/htr/htr.sock")
        os.set_inheritable(sock.fileno(), False)
        logger.info("socket: inherited from systemd (fd %d, %s)", SD_LISTEN_FDS_START, sock.getsockname() or "?")
        return sock
    return bind_socket(Path(settings.socket.path), mode=settings.socket.mode, group=settings.socket.group)


def _temp_path(path: Path) -> Path:
    """A fresh name next to *path* that still fits a Unix socket address (107 bytes)."""
    for name in (f".{path.name}.{secrets.token_hex(4)}", f".{secrets.token_hex(4)}"):
        tmp = path.with_name(name)
        if len(os.fsencode(tmp)) < 108:
            return tmp
    raise ConfigError(f"socket.path {path} is too long: htrd binds it at a temporary name in {path.parent} first, "
                      "and that does not fit a Unix socket address (max 107 bytes)", remedy="choose a shorter path")


def bind_socket(path: Path, *, mode: int, group: str | None) -> socket.socket:
    """A listening socket at *path* with *mode* and *group*; a stale socket file there is replaced, a live one
    (or anything else) refused."""
    gid = -1
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ConfigError(f"socket.group: group '{group}' does not exist",
                              remedy=f"create it (groupadd --system {group}) or set socket.group: null") from None
    if not path.parent.is_dir():
        raise ConfigError(f"socket.path: directory {path.parent} does not exist",
                          remedy="create it (systemd does with RuntimeDirectory=htr) or choose another socket.path")
    if len(os.fsencode(path)) >= 108:
        raise ConfigError(f"socket.path {path} is too long for a Unix socket (max 107 bytes)",
                          remedy="choose a shorter path")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"socket.path {path} exists and is not a socket", remedy="remove it or choose another path")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            logger.info("removing stale socket %s (nothing listens on it)", path)
            path.unlink(missing_ok=True)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise HtrError(f"socket {path} exists and cannot be probed: {exc.strerror}",
                               remedy="run htrd as the service user, or remove the socket") from None
            raise
        else:
            raise ConfigError(f"socket {path} is in use by a running process (another htrd?); not stealing it",
                              remedy="stop the other daemon (systemctl stop htr.service) or choose another socket.path")
        finally:
            probe.close()
    # Bound at a fresh name in the same directory, given its group and mode there, then linked to the path:
    # the path never exists with other permissions, and the process umask (shared by every thread -- the
    # socket watch re-binds while htrd serves) is never touched.
    tmp = _temp_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        try:
            sock.bind(str(tmp))  # not listening yet: nobody can connect to it before its mode is set
        except PermissionError as exc:
            raise HtrError(f"cannot create socket {path}: {exc.strerror}",
                           remedy="run htrd as a user that may write to its directory") from None
        try:
            if gid != -1:
                os.chown(tmp, -1, gid)
            os.chmod(tmp, mode)
        except PermissionError as exc:
            if gid != -1 and (gid == os.getegid() or gid in os.getgroups()):
                # A member may chown to its own group: what refused it is a system-call filter
                # (htr.service's SystemCallFilter=~@privileged includes chown).
                raise ConfigError(f"socket.group: chown of {path} to group '{group}' was refused ({exc.strerror}) "
                                  "although htrd is a member of it: a system-call filter forbids chown (systemd: "
                                  "SystemCallFilter=~@privileged)", remedy="under systemd let htr.socket create the "
                                  "socket (SocketGroup=), or set socket.group: null") from None
            raise ConfigError(f"socket.group: cannot give {path} to group '{group}': {exc.strerror}",
                              remedy="run htrd as a member of that group (systemd: Group=) "
                                     "or set socket.group: null") from None
        try:
            os.link(tmp, path)  # atomic, and never replaces what appeared at the path since the probe above
        except FileExistsError:
            raise ConfigError(f"socket {path} appeared while htrd was binding it (another htrd?); not stealing it",
                              remedy="stop the other daemon (systemctl stop htr.service) "
                                     "or choose another socket.path") from None
        except OSError:  # a file system without hard links
            os.rename(tmp, path)
    except BaseException:
        sock.close()
        raise
    finally:
        tmp.unlink(missing_ok=True)
    sock.listen(128)
    logger.info("socket: listening on %s (mode %s, group %s)", path, oct(mode), group or "(process group)")
    return sock
