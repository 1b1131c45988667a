"""The HTTP API (FastAPI), built around an injected :class:`~htrd.runtime.Daemon`.

Endpoints and models come from :mod:`htrctl.protocol`. Every error -- ours,
404/405 and request validation included -- is the envelope
``{"error": {"type", "message", "detail"}}``; 503s carry ``Retry-After``.
Bodies are read in chunks and refused as soon as they exceed
``limits.max_body_bytes``. A transcription request is then admitted on what its
image headers declare, before any pixel is decoded: its pages against
``limits.max_images_per_request``, its pixels against the request and in-flight
budgets of :mod:`htrd.budget` (413 / 503); its pages are decoded one at a time.
One log line per request with its id and the peer's uid (``SO_PEERCRED``);
image bytes are never logged. A client that disconnects mid-body, or breaks the
HTTP framing, is the client's doing: one line, ``htrd_client_disconnects_total``
and the status 499 (disconnect) or 400 (protocol error), never a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import struct
import time
import uuid
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from htrctl import protocol as P

from .api_errors import ApiError
from .budget import PixelBudget, resolve_limits
from .images import ImageHeader, iter_pages, read_header
from .runtime import Daemon
from .state import READY

logger = logging.getLogger(__name__)

_RID_OK = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_PROBES = {P.PATH_LIVE, P.PATH_READY, P.PATH_METRICS, P.PATH_STATUS}
_KNOWN = {P.PATH_LIVE, P.PATH_READY, P.PATH_STATUS, P.PATH_TRANSCRIBE, P.PATH_TRANSCRIBE_BATCH, P.PATH_METRICS,
          P.PATH_OPENAPI}
PEER_KEY = "htrd.peer"
PROTOCOL_ERROR_KEY = "htrd.protocol_error"  # set on a request's scope when uvicorn answered its framing with 400
NOTE_KEY = "htrd.note"  # appended to the request's log line
CLIENT_CLOSED = 499  # nginx's "client closed request": logged and counted, never sent (nobody is listening)
BUSY_RETRY_AFTER_S = 1

_IMAGE_BODY = {
    "required": True,
    "content": {t: {"schema": {"type": "string", "format": "binary"}}
                for t in ("image/png", "image/jpeg", "image/tiff", "image/webp", "application/octet-stream")},
}
_BATCH_BODY = {
    "required": True,
    "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": [P.BATCH_PART_NAME],
        "properties": {P.BATCH_PART_NAME: {"type": "array", "items": {"type": "string", "format": "binary"}}},
    }}},
}
_ERRORS = {code: {"model": P.ErrorEnvelope} for code in (400, 404, 413, 415, 422, 500, 503, 504, 507)}


# -- the uvicorn protocol that records the peer's credentials ---------------------------------------------
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
        # protocol error (RequestContext, _client_gone), not as a disconnect or a 500.
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


# -- per-request context: id, log line, metrics ------------------------------------------------------------
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


# -- helpers ---------------------------------------------------------------------------------------------------
def _error_response(err: ApiError, request_id: str | None = None) -> JSONResponse:
    headers = {}
    if err.retry_after is not None:
        headers["Retry-After"] = str(int(max(1, round(err.retry_after))))
    return JSONResponse(err.envelope(), status_code=err.status, headers=headers)


async def _read_body(request: Request, limit: int, timeout: float | None = None) -> bytes:
    """The body, refused with 413 as soon as it exceeds *limit* (never buffered beyond it), and with 408
    when it has not fully arrived within *timeout* seconds (a trickling client must not hold the request)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError("too_large", f"the request body is {int(declared)} bytes; limits.max_body_bytes is {limit}",
                       detail={"max_body_bytes": limit})
    buf = bytearray()
    try:
        with anyio.fail_after(timeout):
            async for chunk in request.stream():
                buf += chunk
                if len(buf) > limit:
                    raise ApiError("too_large", f"the request body exceeds limits.max_body_bytes ({limit} bytes)",
                                   detail={"max_body_bytes": limit})
    except ClientDisconnect:
        request.scope[NOTE_KEY] = (f"after {len(buf)} of {declared if declared else 'an unknown number of'} "
                                   f"body bytes")
        raise
    except TimeoutError:
        raise ApiError("bad_request", f"the request body did not arrive within limits.read_timeout_s ({timeout:g}s; "
                       f"{len(buf)} bytes received); send the whole body at once", status=408) from None
    return bytes(buf)


def create_app(daemon: Daemon) -> FastAPI:
    """The FastAPI app for *daemon* (metrics registry, state and engine are the daemon's)."""
    settings = daemon.settings
    limits = settings.limits
    engine = daemon.engine
    state = daemon.state

    app = FastAPI(
        title="htrd",
        version=daemon.version,
        description="Handwritten-text recognition (Qwen3-VL + LoRA) on one GPU, over a Unix socket.",
        docs_url=None,
        redoc_url=None,
        openapi_url=P.PATH_OPENAPI,
    )
    app.state.daemon = daemon
    pixel_limits = resolve_limits(limits)
    budget = PixelBudget(pixel_limits.in_flight_pixels, on_change=daemon.metrics.pixels_in_flight.set)
    for scope, value in (("image", pixel_limits.image_pixels), ("request", pixel_limits.request_pixels),
                         ("in_flight", pixel_limits.in_flight_pixels)):
        daemon.metrics.pixel_limit.labels(scope).set(value)
    app.state.pixel_budget = budget
    logger.info("%s", pixel_limits.describe())

    # -- error envelope for everything ---------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        daemon.metrics.errors.labels(exc.type).inc()
        if exc.status >= 500 or exc.type in ("queue_full", "not_ready"):
            logger.warning("request id=%s failed: %s: %s", request.state.request_id, exc.type, exc.message)
        else:
            logger.info("request id=%s refused: %s: %s", request.state.request_id, exc.type, exc.message)
        return _error_response(exc)

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, exc: ClientDisconnect):
        """The client left mid-body, or uvicorn refused its framing with 400 and closed: no traceback, no 5xx;
        the request's own log line says which (RequestContext), a counter by kind. The response goes nowhere."""
        protocol = bool(request.scope.get(PROTOCOL_ERROR_KEY))
        kind = "protocol_error" if protocol else "disconnect"
        daemon.metrics.client_errors.labels(kind).inc()
        what = "HTTP protocol error, answered 400 by the server" if protocol else "client disconnected"
        note = request.scope.get(NOTE_KEY)
        request.scope[NOTE_KEY] = what + (f" {note}" if note else "")
        return Response(status_code=400 if protocol else CLIENT_CLOSED)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            err = ApiError("not_found", f"no endpoint {request.url.path}; see {P.PATH_OPENAPI}", status=404)
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow") or (exc.headers or {}).get("allow") or ""
            err = ApiError("bad_request", f"method {request.method} is not allowed on {request.url.path}"
                           + (f" (allowed: {allowed})" if allowed else ""), status=405)
        else:
            err = ApiError("bad_request" if exc.status_code < 500 else "internal", str(exc.detail), status=exc.status_code)
        resp = _error_response(err)
        for k, v in (exc.headers or {}).items():
            resp.headers[k] = v
        return resp

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = jsonable_encoder(exc.errors())
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", []))
        err = ApiError("bad_request", f"invalid request: {where}: {first.get('msg', 'invalid')}", status=422,
                       detail=[{k: e.get(k) for k in ("loc", "msg", "type")} for e in errors])
        return _error_response(err)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        logger.exception("request id=%s: unexpected error", getattr(request.state, "request_id", "-"))
        return _error_response(ApiError("internal", f"internal error ({type(exc).__name__}); see the daemon's log"))

    # -- probes ------------------------------------------------------------------------------------------------
    @app.get(P.PATH_LIVE, summary="liveness: the process answers")
    async def live() -> dict[str, Any]:
        return {"status": "alive", "state": state.snapshot()[0]}

    @app.get(P.PATH_READY, summary="readiness: 200 only when ready, else 503 with the state",
             response_model=P.ReadyResponse, responses={503: {"model": P.ErrorEnvelope}})
    async def ready():
        st, detail = state.snapshot()
        if st == READY:
            return JSONResponse({"state": st, "detail": detail})
        body = {"state": st, "detail": detail,
                "error": {"type": "not_ready", "message": f"htrd is {st}" + (f": {detail}" if detail else ""),
                          "detail": {"state": st}}}
        return JSONResponse(body, status_code=503, headers={"Retry-After": "1" if st != "failed" else "10"})

    @app.get(P.PATH_STATUS, response_model=P.StatusResponse, summary="model, GPU, queue, counters, uptime")
    async def status() -> P.StatusResponse:
        st, detail = state.snapshot()
        mem = engine.memory()
        gpu = daemon.gpu
        return P.StatusResponse(
            version=daemon.version,
            state=st,
            detail=detail,
            pid=daemon.pid,
            uptime_s=round(state.uptime(), 3),
            model_dir=str(settings.model.dir),
            model_variant=engine.variant,
            manifest_digest=daemon.manifest_digest,
            gpu=P.GpuInfo(
                device=engine.device,
                uuid=getattr(gpu, "uuid", None),
                name=getattr(gpu, "name", None),
                memory_total_bytes=mem.get("total") or getattr(gpu, "memory_total", None),
                memory_allocated_bytes=mem.get("allocated"),
                memory_reserved_bytes=mem.get("reserved"),
            ),
            queue_depth=engine.queue_depth(),
            queue_capacity=engine.capacity,
            in_flight=state.in_flight,
            batch_sizes=engine.batch_sizes,
            counters=state.counters_copy(),
            engine=P.EngineInfo(**engine.slots_info()),
        )

    @app.get(P.PATH_METRICS, summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        m = daemon.metrics
        m.queue_depth.set(engine.queue_depth())
        m.queue_capacity.set(engine.capacity)
        m.in_flight.set(state.in_flight)
        m.state.state(state.snapshot()[0])
        for kind, value in engine.memory().items():
            if value is not None:
                m.gpu_memory.labels(kind).set(value)
        data, ctype = m.exposition()
        return Response(data, media_type=ctype)

    # -- transcription -----------------------------------------------------------------------------------------
    def _admit() -> None:
        if not state.try_begin_request():
            st, detail = state.snapshot()
            raise ApiError("not_ready", f"htrd is {st}" + (f" ({detail})" if detail else "") + "; retry later",
                           detail={"state": st}, retry_after=1 if st != "draining" else 5)

    @contextlib.contextmanager
    def _accounted():
        """One transcription request: admitted only when ready, counted, its errors counted, always ended.
        Yields the request's deadline (monotonic)."""
        _admit()
        try:
            state.count(requests=1)
            yield time.monotonic() + limits.request_deadline_s
        except ApiError as err:
            state.count(errors=1, deadline_exceeded=int(err.type == "deadline_exceeded"))
            raise
        finally:
            state.end_request()

    def _max_new(requested: int | None) -> int:
        cap = settings.generation.max_new_tokens
        if requested is None:
            return cap
        if requested < 1 or requested > cap:
            raise ApiError("bad_request", f"max_new_tokens must be between 1 and generation.max_new_tokens ({cap})",
                           status=400)
        return requested

    def _read_headers(blobs: list[bytes]) -> list[ImageHeader | ApiError]:
        """Every image's header (page sizes, page count), or its error; not a pixel decoded."""
        out: list[ImageHeader | ApiError] = []
        for blob in blobs:
            try:
                out.append(read_header(blob, max_pixels=pixel_limits.image_pixels,
                                       max_pages=limits.max_images_per_request))
            except ApiError as err:
                out.append(err)
        return out

    @contextlib.contextmanager
    def _pixels_admitted(headers: list[ImageHeader]):
        """The declared pixels of a request's images, checked against limits.max_request_pixels (413) and held
        in the daemon-wide budget (503 + Retry-After when they do not fit now) until the request ends:
        decoding, preprocessing, the queue and generation all happen inside."""
        pixels = sum(h.pixels for h in headers)
        pages = sum(h.pages for h in headers)
        if pixels > pixel_limits.request_pixels:
            raise ApiError(
                "too_large", f"this request's images declare {pixels} pixels in {pages} image(s) and page(s); at most "
                f"{pixel_limits.request_pixels} per request (limits.max_request_pixels); send fewer or smaller "
                "images per request", detail={"pixels": pixels, "pages": pages,
                                              "max_request_pixels": pixel_limits.request_pixels})
        if not budget.try_acquire(pixels):
            raise ApiError(
                "queue_full", f"htrd is busy: the requests being served hold {budget.in_use} of {budget.capacity} "
                f"pixels (limits.max_pixels_in_flight) and this one declares {pixels}; retry later",
                detail={"pixels": pixels, "pixels_in_flight": budget.in_use, "max_pixels_in_flight": budget.capacity},
                retry_after=BUSY_RETRY_AFTER_S)
        try:
            yield pixels
        finally:
            budget.release(pixels)

    def _decode_prepare(data: bytes, header: ImageHeader):
        """Decode and preprocess one image, a page at a time: each decoded page is dropped once prepared."""
        out = []
        with contextlib.closing(iter_pages(data, header)) as pages:
            for page in pages:
                try:
                    out.append((page.index, engine.prepare(page.image)))
                except ValueError as exc:  # the model's image processor refuses this geometry (e.g. smart_resize)
                    w, h = page.image.size
                    where = f" (page {page.index})" if page.index else ""
                    raise ApiError("bad_image", f"the model cannot take this {w}x{h} image{where}: "
                                   f"{str(exc).splitlines()[0][:200]}") from None
                del page
        return out

    async def _wait(items, deadline: float):
        futures = [asyncio.wrap_future(i.future) for i in items]
        try:
            return await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True),
                                          timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            for i in items:
                i.future.cancel()
            raise ApiError("deadline_exceeded", f"not done within limits.request_deadline_s "
                           f"({limits.request_deadline_s:g}s); retry later or raise the limit") from None

    @app.post(P.PATH_TRANSCRIBE, response_model=P.TranscribeResponse, responses=_ERRORS,
              openapi_extra={"requestBody": _IMAGE_BODY},
              summary="transcribe one image (the raw body); a multi-page TIFF gives one result per page")
    async def transcribe(request: Request, max_new_tokens: int | None = None) -> P.TranscribeResponse:
        rid = request.state.request_id
        with _accounted() as deadline:
            new_tokens = _max_new(max_new_tokens)
            data = await _read_body(request, limits.max_body_bytes, limits.read_timeout_s)
            header = (await anyio.to_thread.run_sync(_read_headers, [data]))[0]
            if isinstance(header, ApiError):
                raise header
            with _pixels_admitted([header]):
                prepared = await asyncio.wrap_future(engine.run_cpu(_decode_prepare, data, header))
                items = engine.submit([p for _, p in prepared], deadline=deadline, max_new_tokens=new_tokens,
                                      request_id=rid, pages=[i for i, _ in prepared])
                outcomes = await _wait(items, deadline)
            for o in outcomes:
                if isinstance(o, BaseException):
                    raise o
            return P.TranscribeResponse(request_id=rid, model_digest=daemon.manifest_digest, results=outcomes)

    @app.post(P.PATH_TRANSCRIBE_BATCH, response_model=P.BatchResponse, responses=_ERRORS,
              openapi_extra={"requestBody": _BATCH_BODY},
              summary="transcribe many images (multipart parts named 'image'), e.g. the lines of a page")
    async def transcribe_batch(request: Request, max_new_tokens: int | None = None) -> P.BatchResponse:
        rid = request.state.request_id
        with _accounted() as deadline:
            new_tokens = _max_new(max_new_tokens)
            ctype = request.headers.get("content-type", "")
            if not ctype.startswith("multipart/form-data"):
                raise ApiError("bad_request", f"send multipart/form-data with parts named '{P.BATCH_PART_NAME}' "
                               f"(got content-type {ctype or 'none'})", status=415)
            data = await _read_body(request, limits.max_body_bytes, limits.read_timeout_s)
            parts = await _parse_multipart(request, data, limits.max_images_per_request, limits.max_body_bytes)
            del data
            max_pages = limits.max_images_per_request
            items_out: list[P.BatchItem] = []
            accepted: list[tuple[int, bytes, ImageHeader]] = []  # (item index, bytes, header)
            total_pages = 0

            def item_error(item: P.BatchItem, err: ApiError) -> None:
                daemon.metrics.errors.labels(err.type).inc()
                item.error, item.results = err.body(), None

            # Every part's header first: what the request asks for is known before a pixel is decoded.
            headers = await anyio.to_thread.run_sync(_read_headers, [blob for _, blob in parts])
            for index, ((filename, blob), header) in enumerate(zip(parts, headers)):
                items_out.append(P.BatchItem(index=index, filename=filename))
                if not isinstance(header, ApiError) and total_pages + header.pages > max_pages:
                    header = ApiError("too_large", f"this request carries more than limits.max_images_per_request "
                                      f"({max_pages}) images and pages; this part is not transcribed",
                                      detail={"max_images_per_request": max_pages})
                if isinstance(header, ApiError):
                    item_error(items_out[-1], header)
                    continue
                total_pages += header.pages
                accepted.append((index, blob, header))
            del parts

            async def decode_one(blob: bytes, header: ImageHeader):
                try:
                    return await asyncio.wrap_future(engine.run_cpu(_decode_prepare, blob, header))
                except ApiError as err:
                    return err
                except Exception as exc:  # this part's own error: the other parts go on
                    logger.exception("request id=%s: preparing a batch part failed", rid)
                    return ApiError("internal", f"internal error preparing this image ({type(exc).__name__}); see "
                                    "the daemon's log")

            with _pixels_admitted([h for _, _, h in accepted]):
                # The accepted parts are decoded and preprocessed concurrently, in the engine's CPU pool.
                decoded = await asyncio.gather(*(decode_one(blob, header) for _, blob, header in accepted))
                work: list[tuple[int, list]] = []  # (item index, [(page, prepared)])
                for (index, _blob, _header), prepared in zip(accepted, decoded):
                    if isinstance(prepared, ApiError):
                        item_error(items_out[index], prepared)
                    else:
                        work.append((index, prepared))
                del accepted, decoded
                flat = [(idx, page, prep) for idx, prepared in work for page, prep in prepared]
                if flat:
                    queued = engine.submit([p for _, _, p in flat], deadline=deadline, max_new_tokens=new_tokens,
                                           request_id=rid, pages=[pg for _, pg, _ in flat])
                    outcomes = await _wait(queued, deadline)
                    for (idx, _page, _prep), outcome in zip(flat, outcomes):
                        item = items_out[idx]
                        if isinstance(outcome, ApiError):
                            if item.error is None:
                                daemon.metrics.errors.labels(outcome.type).inc()
                                item.error = outcome.body()
                                item.results = None
                        elif isinstance(outcome, BaseException):
                            raise outcome
                        elif item.error is None:
                            item.results = (item.results or []) + [outcome]
            if any(i.error for i in items_out):
                state.count(errors=1)
            return P.BatchResponse(request_id=rid, model_digest=daemon.manifest_digest, items=items_out)

    app.add_middleware(RequestContext, daemon=daemon)
    return app


async def _parse_multipart(request: Request, data: bytes, max_parts: int, max_bytes: int) -> list[tuple[str | None, bytes]]:
    """The ``image`` parts of a multipart body already read (and size-checked) into *data*."""
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException

    sent = False

    async def replay():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": data, "more_body": False}

    replayed = Request(request.scope, replay)
    try:
        form = await replayed.form(max_files=max_parts + 1, max_fields=max_parts + 1, max_part_size=max_bytes)
    except MultiPartException as exc:
        raise ApiError("bad_request", f"malformed multipart body: {exc.message}", status=400) from None
    try:
        names = set(form.keys())
        if not names:
            raise ApiError("bad_request", f"the multipart body has no parts; send one part named "
                           f"'{P.BATCH_PART_NAME}' per image", status=400)
        unknown = sorted(names - {P.BATCH_PART_NAME})
        if unknown:
            raise ApiError("bad_request", f"unexpected multipart part(s) {unknown}; name every image part "
                           f"'{P.BATCH_PART_NAME}'", status=400)
        values = form.getlist(P.BATCH_PART_NAME)
        if len(values) > max_parts:
            raise ApiError("too_large", f"{len(values)} images in one request; limits.max_images_per_request is "
                           f"{max_parts}", detail={"max_images_per_request": max_parts})
        out = []
        for v in values:
            if isinstance(v, UploadFile):
                out.append((v.filename, await v.read()))
            else:
                out.append((None, v.encode("latin-1") if isinstance(v, str) else bytes(v)))
        return out
    finally:
        await form.close()
