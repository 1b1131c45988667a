"""Transcription: one image (the raw body), or many (multipart parts named ``image``).

Bodies are read in chunks and refused as soon as they exceed ``limits.max_body_bytes``. A request is then
admitted on what its image headers declare, before any pixel is decoded: its pages against
``limits.max_images_per_request``, its pixels against the request and in-flight budgets of
:mod:`htrd.budget` (413 / 503); its pages are decoded one at a time, in the engine's CPU pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import anyio
import anyio._backends._asyncio  # noqa: F401 -- the backend anyio imports on its first use (~6 ms, read_body's timeout)
import anyio.streams.memory  # noqa: F401 -- imported lazily by the first request otherwise (~9 ms of its latency)
from fastapi import APIRouter, Request
from starlette.requests import ClientDisconnect

from htrctl import protocol as P

from ..api_errors import ApiError
from ..images import ImageHeader, read_header
from ..runtime import Daemon
from .context import NOTE_KEY, DaemonDep

logger = logging.getLogger(__name__)

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

router = APIRouter()


@router.post(P.PATH_TRANSCRIBE, response_model=P.TranscribeResponse, responses=_ERRORS,
             openapi_extra={"requestBody": _IMAGE_BODY},
             summary="transcribe one image (the raw body); a multi-page TIFF gives one result per page")
async def transcribe(request: Request, daemon: DaemonDep, max_new_tokens: int | None = None) -> P.TranscribeResponse:
    rid, engine = request.state.request_id, daemon.engine
    with accounted(daemon, max_new_tokens) as (deadline, new_tokens):
        data = await read_body(request, daemon.settings.limits)
        header = (await anyio.to_thread.run_sync(read_headers, daemon, [data]))[0]
        if isinstance(header, ApiError):
            raise header
        with pixels_admitted(daemon, [header]):
            prepared = await asyncio.wrap_future(engine.decode_prepare(data, header))
            items = engine.submit([p for _, p in prepared], deadline=deadline, max_new_tokens=new_tokens,
                                  request_id=rid, pages=[i for i, _ in prepared])
            outcomes = await wait(daemon, items, deadline)
        for o in outcomes:
            if isinstance(o, BaseException):
                raise o
        return P.TranscribeResponse(request_id=rid, model_digest=daemon.manifest_digest, results=outcomes)


@router.post(P.PATH_TRANSCRIBE_BATCH, response_model=P.BatchResponse, responses=_ERRORS,
             openapi_extra={"requestBody": _BATCH_BODY},
             summary="transcribe many images (multipart parts named 'image'), e.g. the lines of a page")
async def transcribe_batch(request: Request, daemon: DaemonDep, max_new_tokens: int | None = None) -> P.BatchResponse:
    rid, engine, limits = request.state.request_id, daemon.engine, daemon.settings.limits
    with accounted(daemon, max_new_tokens) as (deadline, new_tokens):
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise ApiError("bad_request", f"send multipart/form-data with parts named '{P.BATCH_PART_NAME}' "
                           f"(got content-type {ctype or 'none'})", status=415)
        data = await read_body(request, limits)
        parts = await parse_multipart(request, data, limits.max_images_per_request, limits.max_body_bytes)
        del data
        max_pages = limits.max_images_per_request
        items_out: list[P.BatchItem] = []
        accepted: list[tuple[int, bytes, ImageHeader]] = []  # (item index, bytes, header)
        total_pages = 0

        def item_error(item: P.BatchItem, err: ApiError) -> None:
            daemon.metrics.errors.labels(err.type).inc()
            item.error, item.results = err.body(), None

        # Every part's header first: what the request asks for is known before a pixel is decoded.
        headers = await anyio.to_thread.run_sync(read_headers, daemon, [blob for _, blob in parts])
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
                return await asyncio.wrap_future(engine.decode_prepare(blob, header))
            except ApiError as err:
                return err
            except Exception as exc:  # this part's own error: the other parts go on
                logger.exception("request id=%s: preparing a batch part failed", rid)
                return ApiError("internal", f"internal error preparing this image ({type(exc).__name__}); see "
                                "the daemon's log")

        with pixels_admitted(daemon, [h for _, _, h in accepted]):
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
                outcomes = await wait(daemon, queued, deadline)
                for (idx, _page, _prep), outcome in zip(flat, outcomes):
                    item = items_out[idx]
                    if isinstance(outcome, ApiError):
                        if item.error is None:
                            item_error(item, outcome)
                    elif isinstance(outcome, BaseException):
                        raise outcome
                    elif item.error is None:
                        item.results = (item.results or []) + [outcome]
        if any(i.error for i in items_out):
            daemon.state.count(errors=1)
        return P.BatchResponse(request_id=rid, model_digest=daemon.manifest_digest, items=items_out)


# -- admission ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def accounted(daemon: Daemon, max_new_tokens: int | None):
    """One transcription request: admitted only when ready, counted, its errors counted, always ended.
    Yields the request's deadline (monotonic) and how many tokens it may generate."""
    state = daemon.state
    if not state.try_begin_request():
        st, detail = state.snapshot()
        raise ApiError("not_ready", f"htrd is {st}" + (f" ({detail})" if detail else "") + "; retry later",
                       detail={"state": st}, retry_after=1 if st != "draining" else 5)
    try:
        state.count(requests=1)
        yield time.monotonic() + daemon.settings.limits.request_deadline_s, max_new(daemon, max_new_tokens)
    except ApiError as err:
        state.count(errors=1, deadline_exceeded=int(err.type == "deadline_exceeded"))
        raise
    finally:
        state.end_request()


def max_new(daemon: Daemon, requested: int | None) -> int:
    cap = daemon.settings.generation.max_new_tokens
    if requested is None:
        return cap
    if requested < 1 or requested > cap:
        raise ApiError("bad_request", f"max_new_tokens must be between 1 and generation.max_new_tokens ({cap})",
                       status=400)
    return requested


def read_headers(daemon: Daemon, blobs: list[bytes]) -> list[ImageHeader | ApiError]:
    """Every image's header (page sizes, page count), or its error; not a pixel decoded."""
    out: list[ImageHeader | ApiError] = []
    for blob in blobs:
        try:
            out.append(read_header(blob, max_pixels=daemon.pixel_limits.image_pixels,
                                   max_pages=daemon.settings.limits.max_images_per_request))
        except ApiError as err:
            out.append(err)
    return out


@contextlib.contextmanager
def pixels_admitted(daemon: Daemon, headers: list[ImageHeader]):
    """The declared pixels of a request's images, checked against limits.max_request_pixels (413) and held
    in the daemon-wide budget (503 + Retry-After when they do not fit now) until the request ends:
    decoding, preprocessing, the queue and generation all happen inside."""
    budget, request_pixels = daemon.pixel_budget, daemon.pixel_limits.request_pixels
    pixels = sum(h.pixels for h in headers)
    pages = sum(h.pages for h in headers)
    if pixels > request_pixels:
        raise ApiError(
            "too_large", f"this request's images declare {pixels} pixels in {pages} image(s) and page(s); at most "
            f"{request_pixels} per request (limits.max_request_pixels); send fewer or smaller "
            "images per request", detail={"pixels": pixels, "pages": pages, "max_request_pixels": request_pixels})
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


# -- decoding and waiting ---------------------------------------------------------------------------------
async def wait(daemon: Daemon, items, deadline: float):
    futures = [asyncio.wrap_future(i.future) for i in items]
    try:
        return await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True),
                                      timeout=max(0.0, deadline - time.monotonic()))
    except asyncio.TimeoutError:
        for i in items:
            i.future.cancel()
        raise ApiError("deadline_exceeded", f"not done within limits.request_deadline_s "
                       f"({daemon.settings.limits.request_deadline_s:g}s); retry later or raise the limit") from None


# -- the body -------------------------------------------------------------------------------------------------
async def read_body(request: Request, limits) -> bytes:
    """The body, refused with 413 as soon as it exceeds ``limits.max_body_bytes`` (never buffered beyond it),
    and with 408 when it has not fully arrived within ``limits.read_timeout_s`` (a trickling client must not
    hold the request)."""
    limit, timeout = limits.max_body_bytes, limits.read_timeout_s
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


async def parse_multipart(request: Request, data: bytes, max_parts: int,
                          max_bytes: int) -> list[tuple[str | None, bytes]]:
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
