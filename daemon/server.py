"""The uvicorn side of htrd's HTTP server: the h11 protocol, plus the peer's credentials and a header timeout.

The application it serves -- endpoints, error envelope, admission -- is :mod:`htrd.api`.
"""

from __future__ import annotations

import logging
import socket
import struct

from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)

PEER_KEY = "htrd.peer"
PROTOCOL_ERROR_KEY = "htrd.protocol_error"  # set on a request's scope when uvicorn answered its framing with 400


class PeerCredH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus ``scope["htrd.peer"] = (pid, uid, gid)`` from SO_PEERCRED.

    It also closes a connection whose request headers are not complete within
    :attr:`header_timeout_s` of its opening (or of the previous response):
    uvicorn itself has no such timeout, so a client that trickles its headers
    (slowloris) or sends nothing would hold the connection forever.
    """

    header_timeout_s: float = 30.0  # limits.read_timeout_s, set by :func:`peercred_protocol`
    _header_timer = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()
        creds = None
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family == socket.AF_UNIX:
            try:
                creds = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
            except OSError:
                creds = None
        app = self.app

        async def with_peer(scope, receive, send):
            self._disarm_header_timer()  # the headers are complete
            scope[PEER_KEY] = creds
            await app(scope, receive, send)

        self.app = with_peer
        self._peer = creds

    def send_400_response(self, msg: str) -> None:
        # h11 refused the bytes (a bad chunk-size line, ...): uvicorn answers 400 and closes; the app, if it is
        # reading this request's body, sees a disconnect -- mark the scope so it is counted as the client's
        # protocol error (htrd.api.context, htrd.api.errors), not as a disconnect or a 500.
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.scope[PROTOCOL_ERROR_KEY] = True
        super().send_400_response(msg)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_timer()  # the next request on this connection gets the same time

    def connection_lost(self, exc) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        if self.header_timeout_s > 0:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._on_header_timeout)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return  # closed already, or a request is being served
        peer = getattr(self, "_peer", None)
        logger.info("closing a connection from peer_uid=%s: no complete request within limits.read_timeout_s (%gs)",
                    peer[1] if peer else "-", self.header_timeout_s)
        self.transport.close()


def peercred_protocol(header_timeout_s: float) -> type[PeerCredH11Protocol]:
    """:class:`PeerCredH11Protocol` with *header_timeout_s* (``limits.read_timeout_s``)."""
    return type("PeerCredH11Protocol", (PeerCredH11Protocol,), {"header_timeout_s": float(header_timeout_s)})
