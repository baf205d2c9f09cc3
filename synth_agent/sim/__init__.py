"""The offline simulated world: users with hidden trait preferences, a response generator,
and a deterministic stand-in LLM (:class:`SimBrain`) that sees only prompt text.

* :mod:`~synth_agent.sim.traits` — measurable response traits and their phrase vocabulary.
* :mod:`~synth_agent.sim.generator` — prompt pool, :func:`render_response`, :func:`style_from_text`.
* :mod:`~synth_agent.sim.population` — :class:`SimUser`, :class:`Population`, votes, JSONL export.
* :mod:`~synth_agent.sim.brain` — :class:`SimBrain` answering judge / persona / insight / chat prompts.
"""

from synth_agent.sim.brain import BrainReply, SimBrain
from synth_agent.sim.generator import (
    PROMPT_POOL,
    generate_candidates,
    random_levels,
    render_response,
    style_from_text,
)
from synth_agent.sim.population import (
    Population,
    SimUser,
    decisive_votes,
    oracle_accuracy,
    simulate_votes,
    write_population_jsonl,
)
from synth_agent.sim.traits import PHRASES, TRAITS, parse_preferences, trait_vector

__all__ = [
    "PHRASES",
    "PROMPT_POOL",
    "TRAITS",
    "BrainReply",
    "Population",
    "SimBrain",
    "SimUser",
    "decisive_votes",
    "generate_candidates",
    "oracle_accuracy",
    "parse_preferences",
    "random_levels",
    "render_response",
    "simulate_votes",
    "style_from_text",
    "trait_vector",
    "write_population_jsonl",
]


def __getattr__(name: str) -> object:
    # The HTTP endpoint and in-process backend pull in FastAPI/LLM-layer imports; load on demand.
    if name == "SimEndpoint":
        from synth_agent.sim.server import SimEndpoint

        return SimEndpoint
    if name == "SimBackend":
        from synth_agent.sim.backend import SimBackend

        return SimBackend
    raise AttributeError(f"module 'synth_agent.sim' has no attribute {name!r}")
