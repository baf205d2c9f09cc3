"""What request handlers share: the caller and the app's state (one per app, never module-global)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from langgraph.store.base import BaseStore

from graphs.chat import Personalizer, TenantMemories
from synth_agent.config import Settings
from synth_agent.llm.base import ChatBackend
from synth_agent.models import PersonaProfile
from synth_agent.proxy.auth import ApiKey, AuthThrottle, KeyRing, RateLimiter
from synth_agent.proxy.errors import ProxyError
from synth_agent.proxy.metrics import ProxyMetrics
from synth_agent.proxy.schemas import ApiModels
from synth_agent.proxy.settings import ProxySettings
from synth_agent.proxy.turns import TurnBudget
from synth_agent.proxy.upstream import Upstream
from synth_agent.proxy.worker import StorePoller
from synth_agent.scheduler import SynthesisScheduler

if TYPE_CHECKING:
    from synth_agent.scale.queue import QueueScheduler

__all__ = ["Caller", "ProxyState"]


@dataclass
class Caller:
    """Who is calling: the tenant their key belongs to (``default`` in --no-auth mode)."""

    tenant: str
    key: ApiKey | None


@dataclass
class ProxyState:
    """Everything a request handler needs; built by the lifespan, kept on ``app.state.proxy``."""

    settings: Settings
    proxy: ProxySettings
    keys: KeyRing | None
    limiter: RateLimiter
    throttle: AuthThrottle
    metrics: ProxyMetrics
    models: ApiModels
    store: BaseStore | None = None
    memories: TenantMemories | None = None
    llm: ChatBackend | None = None
    upstream: Upstream | None = None
    personalizer: Personalizer | None = None
    scheduler: SynthesisScheduler | QueueScheduler | None = None  # QueueScheduler: scale-out mode
    poller: StorePoller | None = None
    checkpointer: Any = None
    local_token: str | None = None
    """The token ``synth-agent serve`` published for the local CLI (:mod:`synth_agent.local_service`)."""
    background: set[asyncio.Task[Any]] = field(default_factory=set)
    turns: TurnBudget = field(default_factory=TurnBudget)
    """Vote writes' share of each event-loop iteration (:mod:`synth_agent.proxy.turns`)."""
    _persona_reads: dict[tuple[str, str], asyncio.Future[PersonaProfile | None]] = field(default_factory=dict)

    def ready(self) -> tuple[TenantMemories, Personalizer, Upstream, ChatBackend]:
        if self.memories is None or self.personalizer is None or self.upstream is None or self.llm is None:
            raise ProxyError(503, "the proxy is starting up or shutting down; retry shortly", code="not_ready",
                             headers={"Retry-After": "1"})
        return self.memories, self.personalizer, self.upstream, self.llm

    async def persona(self, tenant: str, user: str) -> PersonaProfile | None:
        """The user's current persona through the personalizer's cache, one store read per user at a time.

        When the cached entry expires under load, every concurrent request for that user would
        otherwise read the store at once (64 connections: 64 reads queued on the thread pool);
        they share the first one's read instead. A cancelled request never cancels the shared read.
        """
        _, personalizer, _, _ = self.ready()
        hit, profile = personalizer.personas.cached(tenant, user)
        if hit:  # warm: no task, no shield, no extra turn of the event loop per chat request
            return profile
        key = (tenant, user)
        read = self._persona_reads.get(key)
        if read is None:
            read = asyncio.ensure_future(personalizer.persona(tenant, user))
            self._persona_reads[key] = read
            read.add_done_callback(lambda _: self._persona_reads.pop(key, None))
        return await asyncio.shield(read)

    def notify_vote(self, tenant: str, user: str) -> None:
        if self.scheduler is not None:
            self.scheduler.notify_vote(tenant, user)
