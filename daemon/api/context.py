"""Per request: its id (``X-Request-Id`` in and out), one log line, the request metrics; and the daemon object
handed to every endpoint (``daemon: DaemonDep``)."""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Annotated

from fastapi import Depends, Request

from htrctl import protocol as P

from ..runtime import Daemon
from ..server import PEER_KEY

logger = logging.getLogger(__name__)

_RID_OK = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_PROBES = {P.PATH_LIVE, P.PATH_READY, P.PATH_METRICS, P.PATH_STATUS}
_KNOWN = {P.PATH_LIVE, P.PATH_READY, P.PATH_STATUS, P.PATH_TRANSCRIBE, P.PATH_TRANSCRIBE_BATCH, P.PATH_METRICS,
          P.PATH_OPENAPI}
NOTE_KEY = "htrd.note"  # appended to the request's log line


def daemon_of(request: Request) -> Daemon:
    """The daemon the app was built for (:func:`htrd.api.create_app`)."""
    return request.app.state.daemon


async def current_daemon(request: Request) -> Daemon:
    """:func:`daemon_of` as a dependency. ``async``: FastAPI runs a plain function dependency in its thread
    pool -- a thread hop on every request for an attribute read."""
    return daemon_of(request)


DaemonDep = Annotated[Daemon, Depends(current_daemon)]


class RequestContext:
    """ASGI middleware: request id (``X-Request-Id`` in and out), one log line, request metrics."""

    def __init__(self, app, daemon: Daemon) -> None:
        self.app = app
        self.daemon = daemon

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = None
        for k, v in scope.get("headers", []):
            if k == b"x-request-id":
                cand = v.decode("latin-1")
                rid = cand if _RID_OK.match(cand) else None
                break
        rid = rid or uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = rid
        status = {"code": 500}
        t0 = time.perf_counter()

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - t0
            path = scope.get("path", "")
            endpoint = path if path in _KNOWN else "other"
            m = self.daemon.metrics
            m.requests.labels(endpoint, str(status["code"])).inc()
            m.request_seconds.labels(endpoint).observe(elapsed)
            peer = scope.get(PEER_KEY)
            level = logging.DEBUG if path in _PROBES and status["code"] != 500 else logging.INFO
            note = scope.get(NOTE_KEY)
            logger.log(level, "request id=%s peer_uid=%s peer_pid=%s %s %s -> %d in %.1fms%s", rid,
                       peer[1] if peer else "-", peer[0] if peer else "-", scope.get("method"), path,
                       status["code"], elapsed * 1000.0, f" ({note})" if note else "")
