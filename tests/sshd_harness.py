"""A real sshd on 127.0.0.1 (own port, generated keys, config in a private directory).

``sshd -D -f <dir>/sshd_config``: no system configuration is touched. Used by the
provisioning tests (rsync over ssh) and the remote-replica tests (forwarded Unix
sockets). Needs ``sshd`` and ``ssh-keygen`` (``make test`` installs them).
"""

from __future__ import annotations

import getpass
import os
import shlex
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

from helpers import free_port, wait_until

SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None)


def available() -> bool:
    return bool(SSHD and shutil.which("ssh") and shutil.which("ssh-keygen"))


# What a test sshd allows beyond key logins: stream-local forwards (remote replicas) and many sessions.
FORWARDING = "AllowStreamLocalForwarding yes\nMaxStartups 100\nMaxSessions 100\n"


@contextmanager
def sshd_server(d: Path, *, config: str = FORWARDING, ready=None):
    """Yields ``{"ssh": <ssh command with -p>, "ssh_opts": <the same without -p>, "host": user@127.0.0.1,
    "user", "port"}`` while the server runs. *config*: sshd_config lines beyond key-only logins; *ready(info)*:
    true once the server serves (default: ``ssh host true`` succeeds)."""
    d = Path(d)
    for name in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    (d / "authorized_keys").write_text((d / "user_key.pub").read_text())
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\nPidFile {d / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nStrictModes no\nPubkeyAuthentication yes\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nPermitRootLogin prohibit-password\n"
        f"{config}LogLevel ERROR\n"
    )
    host_pub = (d / "host_key.pub").read_text().split()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stderr=subprocess.PIPE)
    opts = (f"ssh -i {d / 'user_key'} -o IdentitiesOnly=yes -o BatchMode=yes "
            f"-o UserKnownHostsFile={d / 'known_hosts'} -o StrictHostKeyChecking=yes -o LogLevel=ERROR")
    ssh = opts.replace("ssh ", f"ssh -p {port} ", 1)
    user = getpass.getuser()
    info = {"ssh": ssh, "ssh_opts": opts, "host": f"{user}@127.0.0.1", "user": user, "port": port}

    def up():
        if proc.poll() is not None:
            raise AssertionError(f"sshd exited: {proc.stderr.read().decode()}")
        if ready is not None:
            return ready(info)
        return subprocess.run(shlex.split(ssh) + ["127.0.0.1", "true"], capture_output=True).returncode == 0

    try:
        wait_until(up, 30, "sshd to serve")
        yield info
    finally:
        proc.terminate()
        proc.wait(timeout=10)
