"""htrd's HTTP API (FastAPI), built around an injected :class:`~htrd.runtime.Daemon`.

Endpoints and models come from :mod:`htrctl.protocol`; each concern is a module with its router, whose
endpoints take the daemon as a parameter (``daemon: DaemonDep``): :mod:`.status` (liveness, readiness,
status), :mod:`.metrics`, :mod:`.transcribe` (reading bodies, admission by declared pixels, decoding,
waiting on the engine). :mod:`.errors` answers every error as the envelope
``{"error": {"type", "message", "detail"}}``; :mod:`.context` gives each request its id, one log line
with the peer's uid (``SO_PEERCRED``, recorded by :mod:`htrd.server`) and its metrics; image bytes are
never logged.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI

from htrctl import protocol as P

from ..runtime import Daemon
from . import errors, metrics, status, transcribe
from .context import RequestContext

logger = logging.getLogger(__name__)


def create_app(daemon: Daemon) -> FastAPI:
    """The FastAPI app for *daemon* (metrics registry, state, engine and pixel budget are the daemon's)."""
    app = FastAPI(
        title="htrd",
        version=daemon.version,
        description="Handwritten-text recognition (Qwen3-VL + LoRA) on one GPU, over a Unix socket.",
        docs_url=None,
        redoc_url=None,
        openapi_url=P.PATH_OPENAPI,
    )
    app.state.daemon = daemon
    logger.info("%s", daemon.pixel_limits.describe())
    errors.install(app)
    for router in (status.router, metrics.router, transcribe.router):
        app.include_router(router)
    app.add_middleware(RequestContext, daemon=daemon)
    return app
