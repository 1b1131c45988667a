"""Remote replicas: ``--socket ssh://[user@]host[:port]/run/htr/htr.sock``.

The daemon's socket never listens on a network: OpenSSH forwards a local Unix
socket to the remote one (``ssh -N -L local.sock:/run/htr/htr.sock host``).
:class:`Sockets` opens one such forward per ``ssh://`` socket and closes it
afterwards; local paths pass through unchanged, so remote and local replicas
mix in one run (the transcriber spreads work over all of them from one queue,
and what a replica that goes away had in flight goes to the others).

Each forward is its own ssh master (``-M -S <control socket>``, checked with
``-O check``, closed with ``-O exit``) with ``ExitOnForwardFailure=yes`` (no
forward, no process: the failure is seen at once), ``StreamLocalBindUnlink=yes``
and ``StreamLocalBindMask=0177`` (the local socket is this user's only), and
server-alive probes (a dead link ends the forward instead of hanging). The
local sockets live in a fresh private directory; the ssh command comes from
``$HTR_SSH`` (as for ``htrctl provision``), default ``ssh``, in batch mode.
A forward that dies mid-run is opened again (bounded backoff) while the run
lasts: the replica is back as soon as its host is.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import DaemonUnavailableError, UsageError
from .jobs import die_with_parent

logger = logging.getLogger(__name__)

SCHEME = "ssh://"
OPEN_TIMEOUT_S = 30.0
_URL = re.compile(r"^ssh://(?:(?P<user>[^@/]+)@)?(?P<host>\[[0-9A-Fa-f:.]+\]|[^:/@\[\]]+)(?::(?P<port>\d+))?(?P<path>/.*)$")


@dataclass(frozen=True)
class SshSocket:
    """A daemon socket on another host, reached through ssh."""

    host: str
    path: str
    user: str | None = None
    port: int | None = None

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = f"{self.user}@" if self.user else ""
        return f"ssh://{user}{host}{f':{self.port}' if self.port else ''}{self.path}"


def parse_socket(spec: str) -> SshSocket | Path:
    """``ssh://[user@]host[:port]/abs/path`` -> :class:`SshSocket`; anything else is a local path."""
    if not spec.startswith(SCHEME):
        return Path(spec)
    m = _URL.match(spec)
    if not m:
        raise UsageError(f"--socket {spec!r}: expected ssh://[user@]host[:port]/path/to/htr.sock")
    host = m.group("host").strip("[]")
    return SshSocket(host=host, path=m.group("path"), user=m.group("user"),
                     port=int(m.group("port")) if m.group("port") else None)


class SshForward:
    """One ``ssh -N -L local:remote`` master process (see the module docstring)."""

    def __init__(self, target: SshSocket, local: Path, control: Path, ssh: list[str]) -> None:
        self.target = target
        self.local = local
        self.control = control
        self.ssh = ssh
        self.proc: subprocess.Popen | None = None
        self.stderr = local.with_suffix(".ssh-log")

    def _base(self) -> list[str]:
        port = ["-p", str(self.target.port)] if self.target.port else []
        return [*self.ssh, *port, "-S", str(self.control)]

    def open(self, timeout: float = OPEN_TIMEOUT_S) -> None:
        self.local.unlink(missing_ok=True)
        argv = [*self._base(), "-M", "-N", "-o", "ControlPersist=no", "-o", "BatchMode=yes",
                "-o", "ExitOnForwardFailure=yes", "-o", "StreamLocalBindUnlink=yes", "-o", "StreamLocalBindMask=0177",
                "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3",
                "-L", f"{self.local}:{self.target.path}", self.target.destination]
        logger.debug("opening %s: %s", self.target, " ".join(argv))
        with open(self.stderr, "ab") as err:
            # Its own session: a Ctrl-C in the terminal reaches htrctl, which closes the forward after the
            # drain; and it ends with htrctl even when htrctl is killed (no orphaned forward).
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                         start_new_session=True, preexec_fn=die_with_parent)
        deadline = time.monotonic() + timeout
        pause = threading.Event()
        while True:
            if self.proc.poll() is not None:
                raise DaemonUnavailableError(
                    f"{self.target}: ssh exited with {self.proc.returncode}: {self.last_error() or 'no message'}",
                    remedy="check that `ssh HOST` works without a password (keys, known_hosts; $HTR_SSH for "
                           "options) and that the socket exists there (htrctl status on that host)",
                    detail={"socket": str(self.target)},
                )
            if self.local.exists() and self.check():
                return
            if time.monotonic() > deadline:
                self.close()
                raise DaemonUnavailableError(f"{self.target}: the ssh forward was not up within {timeout:g} s",
                                             remedy="check the host and the ssh command ($HTR_SSH)")
            pause.wait(0.05)

    def check(self) -> bool:
        r = subprocess.run([*self._base(), "-O", "check", self.target.destination], capture_output=True, timeout=15)
        return r.returncode == 0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def last_error(self) -> str:
        try:
            lines = [ln for ln in self.stderr.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        return lines[-1] if lines else ""

    def close(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            subprocess.run([*self._base(), "-O", "exit", self.target.destination], capture_output=True, timeout=15)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        self.local.unlink(missing_ok=True)


class Sockets:
    """A context manager: ``with Sockets(specs) as paths:`` -- local socket paths, forwards open inside.

    A forward that cannot be opened is a warning when other sockets remain (the run goes on with
    them) and an error when none does.
    """

    def __init__(self, specs: list[str], *, ssh: list[str] | None = None, note=None,
                 open_timeout: float = OPEN_TIMEOUT_S, reopen_for: float = 120.0) -> None:
        self.targets = [parse_socket(s) for s in specs]
        if ssh is None and any(isinstance(t, SshSocket) for t in self.targets):
            from .provision.transport import ssh_command

            ssh = ssh_command()
        self.ssh = ssh or ["ssh"]
        self.note = note or (lambda msg: logger.warning("%s", msg))
        self.open_timeout = open_timeout
        self.reopen_for = reopen_for
        self.forwards: list[SshForward] = []
        self.dir: Path | None = None
        self._stop = threading.Event()
        self._keeper: threading.Thread | None = None

    def open(self) -> list[Path]:
        paths: list[Path] = []
        errors: list[DaemonUnavailableError] = []
        for i, t in enumerate(self.targets):
            if isinstance(t, Path):
                paths.append(t)
                continue
            if self.dir is None:
                self.dir = Path(tempfile.mkdtemp(prefix="htr-ssh-"))
            name = re.sub(r"[^A-Za-z0-9_.-]", "_", t.host)[:40]
            fwd = SshForward(t, self.dir / f"{i}-{name}.sock", self.dir / f"{i}.ctl", self.ssh)
            try:
                fwd.open(self.open_timeout)
            except DaemonUnavailableError as exc:
                errors.append(exc)
                continue
            self.forwards.append(fwd)
            paths.append(fwd.local)
        if errors and not paths:
            self.close()
            raise errors[0]
        for e in errors:
            self.note(f"htrctl: warning: {e.one_line()} (continuing with the other sockets)")
        if self.forwards:
            self._keeper = threading.Thread(target=self._keep, name="htr-ssh-keeper", daemon=True)
            self._keeper.start()
        return paths

    def _keep(self) -> None:
        """Open a forward again when its ssh process ends while the run lasts (bounded backoff)."""
        down: dict[int, list[float]] = {}  # forward index -> [down since, next attempt, delay]
        while not self._stop.wait(0.5):
            for i, f in enumerate(self.forwards):
                if f.alive():
                    continue
                now = time.monotonic()
                if i not in down:
                    down[i] = [now, now, 0.5]
                    self.note(f"htrctl: {f.target}: the ssh forward ended ({f.last_error() or 'no message'}); "
                              "opening it again")
                since, at, delay = down[i]
                if now - since > self.reopen_for or now < at or self._stop.is_set():
                    continue
                try:
                    f.open(self.open_timeout)
                except DaemonUnavailableError as exc:
                    logger.debug("%s", exc.one_line())
                    down[i] = [since, time.monotonic() + delay, min(delay * 2, 5.0)]
                else:
                    self.note(f"htrctl: {f.target}: the forward is open again")
                    del down[i]

    def close(self) -> None:
        self._stop.set()
        if self._keeper is not None:
            self._keeper.join(timeout=OPEN_TIMEOUT_S + 5)
        for f in self.forwards:
            f.close()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> list[Path]:
        try:
            return self.open()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()


def open_sockets(specs: list[str], **kw) -> Sockets:
    """:class:`Sockets` over *specs* (``--socket`` values: paths and ``ssh://`` URLs)."""
    return Sockets(specs, **kw)

