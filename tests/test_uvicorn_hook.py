"""htrd's hook into uvicorn's private ``H11Protocol`` still works (issue 15, row 9).

``daemon/server.py::PeerCredH11Protocol`` subclasses a class uvicorn does not
promise to keep stable, so pyproject pins uvicorn to the tested range. This test
is what a new uvicorn must pass before that range is widened: the peer's
SO_PEERCRED credentials reach the ASGI scope, and a connection whose request
headers do not arrive in time is closed (at its opening and after a response).
Real uvicorn server, real Unix socket, no daemon, no model.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from importlib.metadata import version

import pytest
from helpers import wait_until

uvicorn = pytest.importorskip("uvicorn")
from htrd.server import PEER_KEY, PROTOCOL_ERROR_KEY, peercred_protocol  # noqa: E402

HEADER_TIMEOUT_S = 0.5


async def echo_peer(scope, receive, send):
    assert scope["type"] == "http"
    body = json.dumps(scope.get(PEER_KEY)).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


DISCONNECTS: list = []  # what body_reader saw: the scope's protocol-error mark when its body ended in a disconnect


async def body_reader(scope, receive, send):
    """Reads the whole body; on a disconnect records whether the protocol marked the scope (issue 14)."""
    if scope["type"] != "http":
        return
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            DISCONNECTS.append(scope.get(PROTOCOL_ERROR_KEY, False))
            return
        if not msg.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture
def server(tmp_path):
    yield from _serve(tmp_path, echo_peer)


@pytest.fixture
def reading_server(tmp_path):
    DISCONNECTS.clear()
    yield from _serve(tmp_path, body_reader)


def _serve(tmp_path, app):
    path = tmp_path / "s.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    config = uvicorn.Config(app, http=peercred_protocol(HEADER_TIMEOUT_S), lifespan="off", log_config=None,
                            access_log=False, timeout_keep_alive=60)
    srv = uvicorn.Server(config)
    srv.install_signal_handlers = lambda: None  # not the main thread
    t = threading.Thread(target=lambda: asyncio.run(srv.serve(sockets=[sock])), daemon=True)
    t.start()

    def started() -> bool:
        assert t.is_alive(), "uvicorn exited before it started"
        return srv.started

    wait_until(started, 30, "uvicorn to start", interval=0.01)
    yield path
    srv.should_exit = True
    t.join(30)
    sock.close()


def _connect(path) -> socket.socket:
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(20)  # bounded: a hook that no longer closes the connection fails, it does not hang
    c.connect(str(path))
    return c


def _response(c: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += c.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    n = int([ln.split(b":")[1] for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")][0])
    while len(body) < n:
        body += c.recv(4096)
    return body


def test_uvicorn_is_in_the_pinned_range():
    major, minor = (int(x) for x in version("uvicorn").split(".")[:2])
    assert (0, 30) <= (major, minor) < (0, 55), "widen pyproject's uvicorn range only after this file passes"


def test_peer_credentials_reach_the_scope(server):
    with _connect(server) as c:
        c.sendall(b"GET / HTTP/1.1\r\nHost: htr\r\n\r\n")
        assert json.loads(_response(c)) == [os.getpid(), os.getuid(), os.getgid()]


def test_incomplete_headers_are_closed_after_the_timeout(server):
    with _connect(server) as c:
        t0 = time.monotonic()
        c.sendall(b"GET / HTTP/1.1\r\nHost: ht")  # a slowloris: never finishes its headers
        assert c.recv(4096) == b""  # closed by the server
        assert HEADER_TIMEOUT_S * 0.8 <= time.monotonic() - t0 < 15


def test_an_idle_keepalive_connection_is_closed_after_the_timeout(server):
    with _connect(server) as c:
        c.sendall(b"GET / HTTP/1.1\r\nHost: htr\r\n\r\n")
        assert json.loads(_response(c))[0] == os.getpid()
        t0 = time.monotonic()
        assert c.recv(4096) == b""  # timeout_keep_alive is 60 s: only the re-armed header timer closes it
        assert time.monotonic() - t0 < 15


def _wait_for_disconnects(n: int) -> None:
    wait_until(lambda: len(DISCONNECTS) >= n, 15, f"{n} disconnects", interval=0.01)


def test_a_framing_error_mid_body_marks_the_scope_and_a_plain_disconnect_does_not(reading_server):
    """uvicorn answers a bad chunk-size line with 400 itself and the app sees a disconnect: the hook marks the
    request's scope so htrd counts a client protocol error (400), not a disconnect (499) or a 500."""
    with _connect(reading_server) as c:
        c.sendall(b"POST / HTTP/1.1\r\nHost: htr\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabcde\r\nzz\r\n")
        assert c.recv(4096).startswith(b"HTTP/1.1 400 ")
    _wait_for_disconnects(1)
    with _connect(reading_server) as c:  # 3 of 100 bytes, then gone
        c.sendall(b"POST / HTTP/1.1\r\nHost: htr\r\nContent-Length: 100\r\n\r\nabc")
    _wait_for_disconnects(2)
    assert DISCONNECTS == [True, False]
