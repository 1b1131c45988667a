"""sd_notify(3) in a few lines: a no-op without ``$NOTIFY_SOCKET``.

Abstract sockets (``@name``) are supported; the socket is ``SOCK_CLOEXEC`` so a
child process never inherits it.
"""

from __future__ import annotations

import os
import socket


def notify(message: str) -> bool:
    """Send *message* (e.g. ``"READY=1"``) to the service manager; False when there is none."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or address[0] not in ("/", "@"):
        return False
    if address[0] == "@":
        address = "\0" + address[1:]  # abstract namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall(message.encode())
    return True
