"""Keep the socket file in place: a deleted socket path is bound again, live.

When htrd bound its socket itself (not under systemd socket activation) and
the file is removed while the daemon runs (``rm``, a tmp cleaner, a second
installer), the listening socket still works but no client can reach it: every
connect gets ENOENT while ``/v1/live`` would look fine from the inside. This
thread notices within ``interval`` seconds, binds the path again (same mode and
group, via :func:`htrd.sock.bind_socket`, which leaves the process umask alone)
and adds the new socket to the running uvicorn server. In-flight requests and open connections are not touched;
clients that were retrying (``htrctl transcribe`` treats a missing socket as a
restart) simply carry on.

A path taken over by something else (another daemon's live socket, a regular
file) is never stolen: that is logged as an error and left alone.

Under socket activation systemd owns the file; there the remedy is
``systemctl restart htr.socket htr.service``, which htrd logs instead.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from pathlib import Path

from htrctl.errors import HtrError

from .sock import bind_socket, identity

logger = logging.getLogger(__name__)


class SocketWatch(threading.Thread):
    def __init__(self, server, sock: socket.socket, path: Path, *, mode: int, group: str | None,
                 activated: bool = False, interval: float = 1.0) -> None:
        super().__init__(name="htrd-sockwatch", daemon=True)
        self.server = server  # uvicorn.Server, running in its own thread
        self.path = Path(path)
        self.mode = mode
        self.group = group
        self.activated = activated
        self.interval = interval
        self.rebinds = 0
        self._stop = threading.Event()
        self._identity = identity(self.path)
        self._last_problem: str | None = None
        self._sockets: list[socket.socket] = [sock]

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        if self._identity is None:
            logger.warning("socket watch: %s does not exist at start; not watching it", self.path)
            return
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:  # noqa: BLE001 -- the watch must never take the daemon down
                logger.exception("socket watch failed")

    def check(self) -> bool:
        """One look at the path; True when it was bound again."""
        now = identity(self.path)
        if now is not None and now == self._identity:
            self._last_problem = None
            return False
        if now is not None:
            self._problem(f"socket path {self.path} now belongs to something else (not this htrd's socket); "
                          "leaving it alone -- clients reach whatever is there now")
            return False
        if self.activated:
            self._problem(f"the socket file {self.path} was removed; under socket activation systemd owns it: "
                          "run `systemctl restart htr.socket htr.service`")
            return False
        if not getattr(self.server, "started", False) or not getattr(self.server, "servers", None):
            return False  # the HTTP server is not up yet (or is stopping)
        try:
            sock = bind_socket(self.path, mode=self.mode, group=self.group)
        except (HtrError, OSError) as exc:
            self._problem(f"the socket file {self.path} was removed and cannot be bound again: {exc}")
            return False
        loop = self.server.servers[0].get_loop()
        fut = asyncio.run_coroutine_threadsafe(self._serve(sock), loop)
        try:
            fut.result(10)
        except Exception:
            sock.close()
            raise
        self._identity = identity(self.path)
        self._sockets.append(sock)
        self.rebinds += 1
        self._last_problem = None
        logger.error("the socket file %s was removed while htrd ran; bound it again (rebind #%d)", self.path,
                     self.rebinds)
        return True

    async def _serve(self, sock: socket.socket) -> None:
        server = self.server
        config = server.config

        def create_protocol(_loop=None):  # as uvicorn.Server.startup builds it
            return config.http_protocol_class(config=config, server_state=server.server_state,
                                              app_state=server.lifespan.state, _loop=_loop)

        srv = await asyncio.get_running_loop().create_server(create_protocol, sock=sock, backlog=config.backlog)
        server.servers.append(srv)  # uvicorn's shutdown closes it with the others

    def _problem(self, message: str) -> None:
        if message != self._last_problem:
            self._last_problem = message
            logger.error("%s", message)
