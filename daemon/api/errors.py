"""Every error -- ours, 404/405 and request validation included -- as the envelope
``{"error": {"type", "message", "detail"}}``; 503s carry ``Retry-After``. A client that left, or broke the HTTP
framing, is the client's doing: one log line, ``htrd_client_disconnects_total``, never a 500."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from htrctl import protocol as P

from ..api_errors import ApiError
from ..server import PROTOCOL_ERROR_KEY
from .context import NOTE_KEY, daemon_of

logger = logging.getLogger(__name__)

CLIENT_CLOSED = 499  # nginx's "client closed request": logged and counted, never sent (nobody is listening)


def error_response(err: ApiError) -> JSONResponse:
    headers = {}
    if err.retry_after is not None:
        headers["Retry-After"] = str(int(max(1, round(err.retry_after))))
    return JSONResponse(err.envelope(), status_code=err.status, headers=headers)


async def api_error(request: Request, exc: ApiError):
    daemon_of(request).metrics.errors.labels(exc.type).inc()
    if exc.status >= 500 or exc.type in ("queue_full", "not_ready"):
        logger.warning("request id=%s failed: %s: %s", request.state.request_id, exc.type, exc.message)
    else:
        logger.info("request id=%s refused: %s: %s", request.state.request_id, exc.type, exc.message)
    return error_response(exc)


async def client_gone(request: Request, exc: ClientDisconnect):
    """The client left mid-body, or uvicorn refused its framing with 400 and closed: no traceback, no 5xx;
    the request's own log line says which (RequestContext), a counter by kind. The response goes nowhere."""
    protocol = bool(request.scope.get(PROTOCOL_ERROR_KEY))
    kind = "protocol_error" if protocol else "disconnect"
    daemon_of(request).metrics.client_errors.labels(kind).inc()
    what = "HTTP protocol error, answered 400 by the server" if protocol else "client disconnected"
    note = request.scope.get(NOTE_KEY)
    request.scope[NOTE_KEY] = what + (f" {note}" if note else "")
    return Response(status_code=400 if protocol else CLIENT_CLOSED)


async def http_error(request: Request, exc: StarletteHTTPException):
    if exc.status_code == 404:
        err = ApiError("not_found", f"no endpoint {request.url.path}; see {P.PATH_OPENAPI}", status=404)
    elif exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow") or (exc.headers or {}).get("allow") or ""
        err = ApiError("bad_request", f"method {request.method} is not allowed on {request.url.path}"
                       + (f" (allowed: {allowed})" if allowed else ""), status=405)
    else:
        err = ApiError("bad_request" if exc.status_code < 500 else "internal", str(exc.detail), status=exc.status_code)
    resp = error_response(err)
    for k, v in (exc.headers or {}).items():
        resp.headers[k] = v
    return resp


async def validation_error(request: Request, exc: RequestValidationError):
    errors = jsonable_encoder(exc.errors())
    first = errors[0] if errors else {}
    where = ".".join(str(p) for p in first.get("loc", []))
    err = ApiError("bad_request", f"invalid request: {where}: {first.get('msg', 'invalid')}", status=422,
                   detail=[{k: e.get(k) for k in ("loc", "msg", "type")} for e in errors])
    return error_response(err)


async def internal_error(request: Request, exc: Exception):
    logger.exception("request id=%s: unexpected error", getattr(request.state, "request_id", "-"))
    return error_response(ApiError("internal", f"internal error ({type(exc).__name__}); see the daemon's log"))


def install(app: FastAPI) -> None:
    """The handlers above, on *app*."""
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(ClientDisconnect, client_gone)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, internal_error)
