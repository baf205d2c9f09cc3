"""Operations: ``GET /healthz`` (liveness + a cheap store probe) and ``GET /metrics`` (Prometheus). No key needed."""

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from synth_agent.proxy.deps import State
from synth_agent.proxy.schemas import ApiModels, Health


def router(models: ApiModels) -> APIRouter:
    r = APIRouter(tags=["ops"])

    @r.get("/healthz", response_model=None,
           responses={200: {"model": Health, "description": "Serving"},
                      503: {"model": Health, "description": "Starting, or the store does not answer"}})
    async def healthz(st: State) -> JSONResponse:
        """Liveness plus a cheap store probe (503 when the store does not answer)."""
        if st.store is None or st.memories is None:
            return JSONResponse({"status": "starting"}, status_code=503)
        health = getattr(st.store, "health", None)
        h: dict[str, object] = {}
        if callable(health):  # ChromaStore: in-memory state only, never waits on Chroma or a commit
            h = health()
            if not h["ok"]:
                return JSONResponse({"status": "degraded", "store": h.get("error", "unhealthy")}, status_code=503)
        else:
            try:
                await st.store.alist_namespaces(limit=1)
            except Exception as exc:
                return JSONResponse({"status": "degraded", "store": f"{type(exc).__name__}"}, status_code=503)
        return JSONResponse({
            "status": "ok",
            "auth": st.keys is not None,
            "synthesis": st.proxy.synthesis,
            "synthesis_in_flight": st.scheduler.stats.in_flight if st.scheduler else 0,
            **({"pending_votes": h["intake_pending"]} if "intake_pending" in h else {}),
        })

    @r.get("/metrics", response_model=None,
           responses={200: {"description": "Prometheus text exposition (no tenant or user labels)",
                            "content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def metrics(st: State) -> Response:
        """Prometheus exposition (no tenant or user labels)."""
        return Response(st.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return r
