"""Operations: ``GET /healthz`` (liveness + a cheap store probe) and ``GET /metrics`` (Prometheus). No key needed."""

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from synth_agent.proxy.deps import State
from synth_agent.proxy.schemas import ApiModels, Health
from synth_agent.proxy.state import ProxyState


async def health(st: ProxyState) -> tuple[int, dict[str, Any]]:
    """``/healthz``'s status and body (also answered by :class:`synth_agent.proxy.app.ProxyApp` before
    the middleware stack, so a saturated server still answers its probe quickly)."""
    if st.store is None or st.memories is None:
        return 503, {"status": "starting"}
    probe = getattr(st.store, "health", None)
    h: dict[str, Any] = {}
    if callable(probe):  # ChromaStore: in-memory state only, never waits on Chroma or a commit
        h = probe()
        if not h["ok"]:
            return 503, {"status": "degraded", "store": h.get("error", "unhealthy")}
    else:
        try:
            await st.store.alist_namespaces(limit=1)
        except Exception as exc:
            return 503, {"status": "degraded", "store": f"{type(exc).__name__}"}
    return 200, {
        "status": "ok",
        "auth": st.keys is not None,
        "synthesis": st.proxy.synthesis,
        "synthesis_in_flight": st.scheduler.stats.in_flight if st.scheduler else 0,
        **({"pending_votes": h["intake_pending"]} if "intake_pending" in h else {}),
    }


def router(models: ApiModels) -> APIRouter:
    r = APIRouter(tags=["ops"])

    @r.get("/healthz", response_model=None,
           responses={200: {"model": Health, "description": "Serving"},
                      503: {"model": Health, "description": "Starting, or the store does not answer"}})
    async def healthz(st: State) -> JSONResponse:
        """Liveness plus a cheap store probe (503 when the store does not answer)."""
        status, body = await health(st)
        return JSONResponse(body, status_code=status)

    @r.get("/metrics", response_model=None,
           responses={200: {"description": "Prometheus text exposition (no tenant or user labels)",
                            "content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def metrics(st: State) -> Response:
        """Prometheus exposition (no tenant or user labels)."""
        return Response(st.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return r
