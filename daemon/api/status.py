"""Probes and status: liveness, readiness (503 with the state until ready), and what htrd serves with."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from htrctl import protocol as P

from ..state import READY
from .context import DaemonDep

router = APIRouter()


@router.get(P.PATH_LIVE, summary="liveness: the process answers")
async def live(daemon: DaemonDep) -> dict[str, Any]:
    return {"status": "alive", "state": daemon.state.snapshot()[0]}


@router.get(P.PATH_READY, summary="readiness: 200 only when ready, else 503 with the state",
            response_model=P.ReadyResponse, responses={503: {"model": P.ErrorEnvelope}})
async def ready(daemon: DaemonDep):
    st, detail = daemon.state.snapshot()
    if st == READY:
        return JSONResponse({"state": st, "detail": detail})
    body = {"state": st, "detail": detail,
            "error": {"type": "not_ready", "message": f"htrd is {st}" + (f": {detail}" if detail else ""),
                      "detail": {"state": st}}}
    return JSONResponse(body, status_code=503, headers={"Retry-After": "1" if st != "failed" else "10"})


@router.get(P.PATH_STATUS, response_model=P.StatusResponse, summary="model, GPU, queue, counters, uptime")
async def status(daemon: DaemonDep) -> P.StatusResponse:
    state, engine, gpu = daemon.state, daemon.engine, daemon.gpu
    st, detail = state.snapshot()
    mem = engine.memory()
    return P.StatusResponse(
        version=daemon.version,
        state=st,
        detail=detail,
        pid=daemon.pid,
        uptime_s=round(state.uptime(), 3),
        model_dir=str(daemon.settings.model.dir),
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
