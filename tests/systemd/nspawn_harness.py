"""A throwaway systemd booted with systemd-nspawn, for tests (see SYSTEMD-TESTING.md).

The container shares the host's read-only ``/usr`` (``--volatile=yes``: a tmpfs
root), so everything else a test needs -- the repository, its virtual
environment, the Python installation that environment links to, scratch
directories -- is bound in at the same paths. Commands run inside with
``nsenter`` into the container's PID 1, with a clean environment.

Only the ``systemd-nspawn`` process this module started is ever signalled.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from helpers import WaitTimeout, stop_process, wait_until

# This environment's htrctl, run inside the container (the repository and .venv are bound at the same paths).
HTRCTL = Path(sys.prefix) / "bin" / "htrctl"
CONFIG = "/etc/htr/htr.yaml"
# Faults and test-only settings for htrd, read by systemd at every (re)start (EnvironmentFile=).
TEST_ENV_FILE = "/run/htr-test.env"

CLEAN_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
    "HOME": "/root",
}


class ContainerError(RuntimeError):
    pass


def _as_user(user: str) -> list[str]:
    """Prefix that drops to *user* with its own groups (setpriv: no PAM session needed)."""
    return ["setpriv", f"--reuid={user}", f"--regid={user}" if user != "nobody" else "--regid=nogroup",
            "--init-groups", "--"]


def can_boot() -> tuple[bool, str]:
    """Whether this machine can run the container at all (root and systemd-nspawn)."""
    if shutil.which("systemd-nspawn") is None:
        return False, "systemd-nspawn (Debian package systemd-container)"
    if shutil.which("nsenter") is None:
        return False, "nsenter (util-linux)"
    if os.geteuid() != 0:
        return False, "root privileges for systemd-nspawn"
    if not Path("/usr/lib/systemd/systemd").exists() and not Path("/lib/systemd/systemd").exists():
        return False, "systemd (the init binary) in /usr"
    return True, ""


class Container:
    """One booted container. ``boot()`` then ``run()``/``sh()``; ``stop()`` always."""

    def __init__(self, name: str, *, binds: Sequence[Path] = (), binds_ro: Sequence[Path] = (), log: Path) -> None:
        self.name = name
        self.binds = [Path(p) for p in binds]
        self.binds_ro = [Path(p) for p in binds_ro]
        self.log = Path(log)
        self.proc: subprocess.Popen | None = None
        self.leader: int | None = None
        self.boot_seconds: float | None = None

    # -- lifecycle

    def boot(self, timeout: float = 90.0) -> str:
        argv = [
            "systemd-nspawn", "-D", "/", "--volatile=yes", "-M", self.name,
            "--register=no", "--keep-unit", "--console=read-only",
            *[f"--bind={p}" for p in self.binds],
            *[f"--bind-ro={p}" for p in self.binds_ro],
            "--boot", "--", "systemd.firstboot=off",
        ]
        t0 = time.monotonic()
        with open(self.log, "wb") as logf:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        try:
            self.leader = wait_until(self._find_leader, timeout=30, what="the container's systemd (PID 1)", interval=0.1)

            def system_state() -> str | None:
                # Until PID 1 has its private bus socket, systemctl cannot connect: it prints nothing
                # or "offline". Ask again then.
                left = max(1.0, timeout - (time.monotonic() - t0))
                res = self.run(["systemctl", "is-system-running", "--wait"], check=False, timeout=left)
                state = res.stdout.strip()
                return None if state in ("", "offline", "unknown") else state

            state = wait_until(system_state, timeout=timeout, interval=0.2, what="systemctl is-system-running")
        except (WaitTimeout, subprocess.TimeoutExpired) as exc:
            self.stop()
            raise ContainerError(f"container did not boot: {exc}; log: {self.tail()}") from exc
        if state not in ("running", "degraded"):
            failed = self.run(["systemctl", "--failed", "--no-legend"], check=False).stdout
            self.stop()
            raise ContainerError(f"container booted into state {state!r}; failed units: {failed}; log: {self.tail()}")
        self.boot_seconds = time.monotonic() - t0
        return state

    def _find_leader(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            raise ContainerError(f"systemd-nspawn exited ({self.proc and self.proc.returncode}): {self.tail()}")
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                stat = Path(entry.path, "stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                if ppid != self.proc.pid:
                    continue
                cmdline = Path(entry.path, "cmdline").read_bytes().split(b"\0")
            except (OSError, ValueError, IndexError):
                continue
            if b"systemd.firstboot=off" in cmdline:
                return int(entry.name)
        return None

    def stop(self, timeout: float = 20.0) -> None:
        """Power the container off (SIGTERM to our nspawn asks PID 1 to halt); SIGKILL if it lingers."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        stop_process(proc, timeout)

    def tail(self, n: int = 800) -> str:
        """The end of nspawn's console log, without colour codes."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "<no log>"
        text = re.sub(r"\x1b\[[0-9;]*m", "", text)
        return " | ".join(line.strip() for line in text[-n:].splitlines() if line.strip())

    # -- commands inside

    def run(self, argv: Sequence[str], *, check: bool = True, timeout: float = 60.0, user: str | None = None,
            env: dict[str, str] | None = None, input: str | None = None) -> subprocess.CompletedProcess:
        """Run *argv* inside the container (as *user*, via setpriv), with a clean environment."""
        if self.leader is None:
            raise ContainerError("container not booted")
        full_env = {**CLEAN_ENV, **(env or {})}
        inner = ["env", "-i", *[f"{k}={v}" for k, v in full_env.items()]]
        if user:
            inner = _as_user(user) + inner
        cmd = ["nsenter", "-t", str(self.leader), "-a", *inner, *argv]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input,
                             stdin=None if input is not None else subprocess.DEVNULL)
        if check and res.returncode != 0:
            raise ContainerError(
                f"{' '.join(argv)} -> exit {res.returncode}\nstdout: {res.stdout[-3000:]}\nstderr: {res.stderr[-3000:]}"
            )
        return res

    def sh(self, script: str, **kw) -> subprocess.CompletedProcess:
        return self.run(["sh", "-c", script], **kw)

    def popen(self, argv: Sequence[str], *, user: str | None = None) -> subprocess.Popen:
        """Start *argv* inside the container in the background (stdout/stderr captured)."""
        inner = ["env", "-i", *[f"{k}={v}" for k, v in CLEAN_ENV.items()]]
        if user:
            inner = _as_user(user) + inner
        return subprocess.Popen(["nsenter", "-t", str(self.leader), "-a", *inner, *argv],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    # -- systemd helpers

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run(["systemctl", "show", unit, "--property=" + ",".join(props)]).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def prop(self, unit: str, name: str) -> str:
        return self.show(unit, name).get(name, "")

    def journal(self, unit: str, *, since_cursor: str | None = None) -> str:
        argv = ["journalctl", "--no-pager", "-o", "cat", "-u", unit]
        if since_cursor:
            argv += ["--after-cursor", since_cursor]
        return self.run(argv, check=False).stdout

    def cursor(self) -> str:
        """The journal's current end, to read only what follows."""
        out = self.run(["journalctl", "--no-pager", "-n", "1", "-o", "export"], check=False).stdout
        for line in out.splitlines():
            if line.startswith("__CURSOR="):
                return line.split("=", 1)[1]
        return ""

    def write(self, path: str, text: str, mode: str = "0644") -> None:
        self.run(["sh", "-c", f'mkdir -p "$(dirname "{path}")" && cat > "{path}" && chmod {mode} "{path}"'], input=text)


def set_test_env(box: Container, **env: str) -> None:
    """Rewrite the env file the next start of htr.service reads (nothing: no faults)."""
    box.write(TEST_ENV_FILE, "".join(f"{k}={v}\n" for k, v in env.items()))
