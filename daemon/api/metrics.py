"""Prometheus metrics of this daemon (its own registry, :mod:`htrd.metrics`), the gauges read when scraped."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from htrctl import protocol as P

from .context import DaemonDep

router = APIRouter()


@router.get(P.PATH_METRICS, summary="Prometheus metrics", response_class=Response)
async def metrics(daemon: DaemonDep) -> Response:
    m, engine, state = daemon.metrics, daemon.engine, daemon.state
    m.queue_depth.set(engine.queue_depth())
    m.queue_capacity.set(engine.capacity)
    m.in_flight.set(state.in_flight)
    m.state.state(state.snapshot()[0])
    for kind, value in engine.memory().items():
        if value is not None:
            m.gpu_memory.labels(kind).set(value)
    data, ctype = m.exposition()
    return Response(data, media_type=ctype)
