"""Prometheus metrics on a per-app ``CollectorRegistry`` (two apps in one process never share counters).

Request counters and latency histograms are labelled by route *template* (never
by user id, so cardinality stays bounded and no user data leaks into metrics).
Synthesis and LLM figures are read at scrape time from the scheduler's and the
LLM client's own counters, so there is one source of truth.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from synth_agent.lift import TenantLift
from synth_agent.llm.base import LLMStats
from synth_agent.scheduler import SchedulerStats

__all__ = ["MetricsMiddleware", "ProxyMetrics"]

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _StatsCollector(Collector):
    """Scheduler and LLM counters, read when Prometheus scrapes."""

    def __init__(
        self,
        scheduler_stats: Callable[[], SchedulerStats | None],
        llm_stats: Callable[[], LLMStats | None],
        lift: Callable[[], TenantLift | None] = lambda: None,
    ) -> None:
        self._sched = scheduler_stats
        self._llm = llm_stats
        self._lift = lift

    def collect(self) -> Iterator[Metric]:
        s = self._sched()
        if s is not None:
            for name, value, doc in (
                ("runs_started", s.runs_started, "synthesis runs started"),
                ("runs_succeeded", s.runs_succeeded, "synthesis runs finished (fitted or not enough votes)"),
                ("failures", s.failures, "synthesis runs or checks that failed (retried with backoff)"),
                ("gave_up", s.gave_up, "users whose synthesis failed past the retry budget"),
                ("votes_notified", s.votes_notified, "vote notifications received"),
            ):
                c = CounterMetricFamily(f"synth_proxy_synthesis_{name}", doc)
                c.add_metric([], float(value))
                yield c
            for name, value, doc in (
                ("in_flight", s.in_flight, "synthesis runs in flight"),
                ("pending_users", s.pending_users, "users with a synthesis check pending or running"),
            ):
                g = GaugeMetricFamily(f"synth_proxy_synthesis_{name}", doc)
                g.add_metric([], float(value))
                yield g
        stats = self._llm()
        if stats is not None:
            fams = {
                "requests": CounterMetricFamily("synth_proxy_llm_requests", "judge/synthesis LLM HTTP attempts", labels=["call_site"]),
                "errors": CounterMetricFamily("synth_proxy_llm_errors", "judge/synthesis LLM calls that failed", labels=["call_site"]),
                "cache_hits": CounterMetricFamily("synth_proxy_llm_cache_hits", "LLM answers served from cache", labels=["call_site"]),
                "prompt_tokens": CounterMetricFamily("synth_proxy_llm_prompt_tokens", "LLM prompt tokens", labels=["call_site"]),
                "completion_tokens": CounterMetricFamily("synth_proxy_llm_completion_tokens", "LLM completion tokens", labels=["call_site"]),
                "cached_prompt_tokens": CounterMetricFamily(
                    "synth_proxy_llm_cached_prompt_tokens", "LLM prompt tokens the server read from its prefix cache",
                    labels=["call_site"]),
                "unparseable": CounterMetricFamily("synth_proxy_llm_unparseable", "LLM answers the call site could not read", labels=["call_site"]),
            }
            for site, st in sorted(stats.by_site.items()):
                for attr, fam in fams.items():
                    fam.add_metric([site], float(getattr(st, attr)))
            yield from fams.values()
        lift = self._lift()
        if lift is not None:
            yield from _lift_metrics(lift)


def _lift_metrics(lift: TenantLift) -> Iterator[Metric]:
    """Live lift per tenant (A/B votes personalized vs plain since this process started); no user ids."""
    votes = CounterMetricFamily("synth_proxy_ab_votes", "A/B votes between a personalized and a plain answer",
                                labels=["tenant", "winner"])
    rate = GaugeMetricFamily("synth_proxy_ab_personalized_win_rate",
                             "share of A/B votes won by the personalized answer", labels=["tenant"])
    low = GaugeMetricFamily("synth_proxy_ab_personalized_win_rate_ci_low",
                            "95% Wilson interval of that share, lower end", labels=["tenant"])
    high = GaugeMetricFamily("synth_proxy_ab_personalized_win_rate_ci_high",
                             "95% Wilson interval of that share, upper end", labels=["tenant"])
    demoted = CounterMetricFamily("synth_proxy_persona_demotions",
                                  "persona versions demoted because they kept losing A/B votes", labels=["tenant"])
    for tenant, win in lift.snapshot().items():
        votes.add_metric([tenant, "personalized"], float(win.wins))
        votes.add_metric([tenant, "plain"], float(win.n - win.wins))
        lo, hi = win.interval()
        rate.add_metric([tenant], float(win.rate or 0.0))
        low.add_metric([tenant], lo)
        high.add_metric([tenant], hi)
    for tenant, n in sorted(lift.demotions.items()):
        demoted.add_metric([tenant], float(n))
    yield from (votes, rate, low, high, demoted)


class ProxyMetrics:
    """Everything ``/metrics`` exposes, on its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("synth_proxy_requests", "HTTP requests", ["route", "method", "status"], registry=r)
        self.latency = Histogram(
            "synth_proxy_request_seconds", "HTTP request latency (to the last byte)", ["route", "method"],
            buckets=_BUCKETS, registry=r,
        )
        self.upstream_errors = Counter(
            "synth_proxy_upstream_errors", "failed upstream attempts by kind (status, timeout, connection)",
            ["kind"], registry=r,
        )
        self.upstream_retries = Counter("synth_proxy_upstream_retries", "upstream attempts retried", registry=r)
        self.persona_injections = Counter(
            "synth_proxy_persona_injections", "chat requests that got a persona system message", registry=r
        )
        self.votes = Counter("synth_proxy_votes_stored", "votes newly stored", registry=r)
        self.rate_limited = Counter("synth_proxy_rate_limited", "requests refused by the per-key rate limit", registry=r)
        self._stats: _StatsCollector | None = None

    def watch(
        self,
        scheduler_stats: Callable[[], SchedulerStats | None],
        llm_stats: Callable[[], LLMStats | None],
        lift: Callable[[], TenantLift | None] = lambda: None,
    ) -> None:
        """Expose scheduler, LLM and live-lift counters (called once the lifespan has built them)."""
        if self._stats is None:
            self._stats = _StatsCollector(scheduler_stats, llm_stats, lift)
            self.registry.register(self._stats)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI middleware (BaseHTTPMiddleware would buffer streams and hide disconnects).

    Latency is measured to the end of the response body, so a streamed answer counts in full.
    """

    def __init__(self, app: Any, metrics: ProxyMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(label, method, str(status)).inc()
            self.metrics.latency.labels(label, method).observe(time.perf_counter() - start)
