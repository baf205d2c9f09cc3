"""Settings of the scale-out mode, read by ``serve --queue`` and ``worker --queue`` (env or flags).

| variable | meaning | default |
|---|---|---|
| ``SYNTH_AGENT_QUEUE`` | Postgres DSN of the job queue, checkpoints and version counters; set = scale-out mode | unset |
| ``SYNTH_AGENT_FIRST_FIT`` | votes before a user's first fit | ``5`` |
| ``SYNTH_AGENT_REFIT_GROWTH`` | refit when the count reaches the next ``first_fit * growth**k`` | ``2`` |
| ``SYNTH_AGENT_REFIT_EVERY`` | ... or after this many new votes (``0``: off) | ``50`` |
| ``SYNTH_AGENT_DEBOUNCE`` | seconds a queued fit waits, so a burst of votes is one fit | ``2`` |
| ``SYNTH_AGENT_FIT_TRIALS`` / ``SYNTH_AGENT_FIT_DEMO_CANDIDATES`` | fit budgets (``FitConfig.n_trials`` / ``n_demo_candidates``) | engine defaults |
| ``SYNTH_AGENT_FORGET_PURGE`` | a forget rewrites the touched tables and retires the WAL (:mod:`~synth_agent.scale.erasure`); ``0``: rows only | ``1`` |
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:  # imported where used: `synth-agent forget` reads only `queue` and never needs the engine
    from synth_agent.engine.synthesize import FitConfig
    from synth_agent.scheduler import SynthesisPolicy

__all__ = ["ScaleSettings", "check_scale_config", "redact_dsn"]


def redact_dsn(dsn: str) -> str:
    """The DSN without its password, for messages and logs."""
    try:
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        parts = conninfo_to_dict(dsn)
    except Exception:
        return "<unparsable DSN>"
    if parts.get("password"):
        parts["password"] = "***"
    return make_conninfo(**{k: str(v) for k, v in parts.items()})


def check_scale_config(dsn: str, chroma_host: str | None, *, timeout: float = 10.0) -> None:
    """Refuse a scale-out process that could not work, with one line saying what to do (ValueError)."""
    if not chroma_host:
        raise ValueError("the scale-out mode (--queue / SYNTH_AGENT_QUEUE) needs the shared Chroma server: "
                         "set CHROMA_HOST (and CHROMA_PORT), or --chroma-host; see docs/deploy.md")
    import psycopg

    try:
        psycopg.connect(dsn, connect_timeout=max(1, int(timeout))).close()
    except (psycopg.Error, ValueError) as exc:
        first = (str(exc).strip().splitlines() or ["?"])[0]
        raise ValueError(f"cannot connect to the queue's Postgres at {redact_dsn(dsn)}: {first}") from None


class ScaleSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SYNTH_AGENT_", extra="ignore")

    queue: str | None = None
    first_fit: int = Field(default=5, ge=2)
    refit_growth: float = Field(default=2.0, gt=1.0)
    refit_every: int = Field(default=50, ge=0)
    debounce: float = Field(default=2.0, ge=0)
    fit_trials: int | None = Field(default=None, ge=1)
    fit_demo_candidates: int | None = Field(default=None, ge=1)
    forget_purge: bool = True

    def policy(self) -> SynthesisPolicy:
        from synth_agent.scheduler import SynthesisPolicy

        return SynthesisPolicy(first_fit=self.first_fit, growth=self.refit_growth,
                               refit_every=self.refit_every or None, debounce=self.debounce)

    def fit_config(self) -> FitConfig | None:
        if self.fit_trials is None and self.fit_demo_candidates is None:
            return None
        from synth_agent.engine.synthesize import FitConfig

        base = FitConfig()
        return replace(base, n_trials=self.fit_trials or base.n_trials,
                       n_demo_candidates=self.fit_demo_candidates or base.n_demo_candidates)
