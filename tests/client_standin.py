"""A small scripted HTTP server on a Unix socket, for client-side behaviour only.

The end-to-end tests use the real htrd (tests/daemon_harness.py). This stand-in
exists for what a real daemon cannot be made to do on demand: an exact sequence
of 503s with Retry-After, readiness states in a given order, a 4xx for one
named input. It is a real uvicorn/starlette server on a real Unix socket; the
client under test cannot tell it from htrd at the HTTP level.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import uvicorn
from helpers import wait_until
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from htrctl import protocol as P


def _err(status: int, etype: str, message: str, detail=None, retry_after: float | None = None) -> JSONResponse:
    headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else None
    return JSONResponse({"error": {"type": etype, "message": message, "detail": detail}}, status, headers=headers)


class StandIn:
    """Scripted daemon. ``ready_states``: states served by /v1/ready in order (the last repeats).
    ``transcribe_script``: a list of ``(status, type)`` answered to the next requests before normal ones.
    Bodies starting with ``b"BAD"`` get 422 bad_image; ``delay_s`` slows every transcription."""

    def __init__(self, sock: Path) -> None:
        self.sock = sock
        self.ready_states: list[str] = ["ready"]
        self.transcribe_script: list[tuple[int, str]] = []
        self.delay_s = 0.0
        self.requests = 0
        self.seen: list[str] = []  # sha256 of every successfully answered body
        self.lock = threading.Lock()
        app = Starlette(routes=[
            Route(P.PATH_READY, self.ready),
            Route(P.PATH_STATUS, self.status),
            Route(P.PATH_TRANSCRIBE, self.transcribe, methods=["POST"]),
        ])
        self.server = uvicorn.Server(uvicorn.Config(app, uds=str(sock), log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "StandIn":
        self.thread.start()
        wait_until(lambda: self.server.started, 10, "the stand-in server to start", interval=0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    async def ready(self, request: Request) -> JSONResponse:
        with self.lock:
            state = self.ready_states.pop(0) if len(self.ready_states) > 1 else self.ready_states[0]
        body = {"state": state, "detail": f"{state} (stand-in)"}
        return JSONResponse(body, 200 if state == "ready" else 503, headers=None if state == "ready" else {"Retry-After": "1"})

    async def status(self, request: Request) -> JSONResponse:
        return JSONResponse(P.StatusResponse(
            version="stand-in", state=self.ready_states[0], pid=1, uptime_s=12.5, model_dir="/m",
            gpu=P.GpuInfo(device="cpu"),
        ).model_dump(mode="json"))

    async def transcribe(self, request: Request) -> JSONResponse:
        import asyncio

        body = await request.body()
        with self.lock:
            self.requests += 1
            scripted = self.transcribe_script.pop(0) if self.transcribe_script else None
        if scripted is not None:
            status, etype = scripted
            return _err(status, etype, f"scripted {etype}", {"state": "loading"} if etype == "not_ready" else None,
                        retry_after=0.05 if status == 503 else None)
        if body.startswith(b"BAD"):
            return _err(422, "bad_image", "cannot identify image file (not PNG, JPEG, TIFF or WebP)")
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        digest = hashlib.sha256(body).hexdigest()
        with self.lock:
            self.seen.append(digest)
        pages = 2 if body.startswith(b"TWO") else 1
        resp = P.TranscribeResponse(
            request_id=request.headers.get(P.HEADER_REQUEST_ID, "r"), model_digest="sha256:standin",
            results=[P.PageResult(page=i, text=f"text of {digest[:8]} p{i}", tokens=3) for i in range(pages)],
        )
        return JSONResponse(json.loads(resp.model_dump_json()))
