"""ssh and rsync, the commands that reach another host; which transport pulls a remote SOURCE."""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading

from ..errors import ProvisionError
from .locations import Remote

logger = logging.getLogger(__name__)

def ssh_command(ssh: str | None = None) -> list[str]:
    cmd = ssh or os.environ.get("HTR_SSH") or "ssh"
    return shlex.split(cmd)


def rdir(path: str) -> str:
    return path.rstrip("/") + "/"


def run_rsync(args: list[str], *, ssh: str | None, progress: bool, dry_run: bool = False) -> tuple[int, str]:
    """Run rsync over ssh; returns (literal bytes sent, its stdout). ``$HTR_RSYNC_OPTS`` adds options
    (e.g. ``--bwlimit=20m``)."""
    if shutil.which("rsync") is None:
        raise ProvisionError("rsync is not installed", remedy="apt-get install rsync (on both machines)")
    cmd = ["rsync", "-rt", "--partial", "--partial-dir=.rsync-partial", "--stats", "-i",
           "-e", shlex.join(ssh_command(ssh))]
    cmd += shlex.split(os.environ.get("HTR_RSYNC_OPTS", ""))
    progress = progress and _stderr_is_terminal()  # "\r" progress only where it redraws: not cron, the journal
    if dry_run:
        cmd.append("-n")
    elif progress:
        cmd.append("--info=progress2")
    cmd += args
    logger.debug("running %s", shlex.join(cmd))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    err_chunks: list[bytes] = []
    drain = threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()), daemon=True)
    drain.start()
    out = bytearray()
    pending = b""
    try:
        while chunk := proc.stdout.read1(65536):
            out += chunk
            if progress and not dry_run:  # progress2 lines end in \r: show the last one on stderr
                pending = (pending + chunk).split(b"\n")[-1]
                last = pending.split(b"\r")
                line = next((x for x in reversed(last) if b"%" in x), None)
                if line:
                    sys.stderr.write("\r" + line.decode(errors="replace").strip()[:100])
                    sys.stderr.flush()
    except BaseException:  # Ctrl-C: no rsync (and ssh) left running behind us; --partial keeps its work
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    rc = proc.wait()
    drain.join(timeout=10)
    if progress and not dry_run:
        sys.stderr.write("\r\033[K")
    text = out.decode(errors="replace")
    if rc != 0:
        err = b"".join(err_chunks).decode(errors="replace")
        raise ProvisionError(f"rsync failed (exit {rc}): {rsync_cause(err, rc)}",
                             remedy="check the host, the path and the ssh command (--ssh / $HTR_SSH); "
                                    "run again to resume, complete files are not copied again")
    m = re.search(r"Literal data: ([\d,.]+)", text)
    literal = int(re.sub(r"[,.]", "", m.group(1))) if m else 0
    return literal, text


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def rsync_cause(stderr: str, rc: int) -> str:
    """The line of rsync's stderr that says why: ssh's own message (host unreachable, key refused, remote
    shell errors) before rsync's generic "connection unexpectedly closed" / "rsync error: ..." lines."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    own = [ln for ln in lines if not ln.startswith(("rsync:", "rsync error:", "rsync warning:"))]
    if own:
        return own[0]
    specific = [ln for ln in lines if ln.startswith("rsync:") and "connection unexpectedly closed" not in ln]
    return (specific or lines or [f"exit {rc}"])[0]


def itemized(out: str) -> list[tuple[str, str]]:
    """``(kind, path)`` of the files rsync -i would change: kind "send" or "remove"; directories left out."""
    names = []
    for line in out.splitlines():
        if line.startswith("*deleting "):
            name = line[len("*deleting "):].strip()
            if not name.endswith("/"):
                names.append(("remove", name))
            continue
        m = re.match(r"^([<>ch.][fLDS][^ ]{9}) +(.+)$", line)
        if m:
            names.append(("send", m.group(2)))
    return names


TRANSPORTS = ("auto", "rsync", "sftp")


def pick_transport(src: Remote, transport: str, ssh: str | None) -> str:
    """``rsync`` or ``sftp`` for pulling *src*; ``auto``: rsync when it runs here and on the remote (a shell
    that finds it: not Windows' cmd.exe, not an ``internal-sftp`` account), else SFTP."""
    if transport != "auto":
        return transport
    if shutil.which("rsync") is None:
        return "sftp"
    try:
        proc = subprocess.run(ssh_command(ssh) + [src.host, "command -v rsync"], stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return "sftp"
    found = proc.returncode == 0 and b"rsync" in proc.stdout
    logger.info("%s: %s", src.host, "rsync found: pulling with rsync" if found else "no rsync: pulling over SFTP")
    return "rsync" if found else "sftp"


def ssh_run(host: str, script: str, *, ssh: str | None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ssh_command(ssh) + [host, script]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise ProvisionError(f"{host}: remote command failed (exit {proc.returncode}): "
                             f"{rsync_cause(proc.stderr, proc.returncode)}",
                             remedy="check ssh access (--ssh / $HTR_SSH) and permissions on the remote path")
    return proc
