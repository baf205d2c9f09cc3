"""The SynthesizeMe engine: fit personas, judge pairs, rerank candidates.

The exports load on first use, so importing one small submodule (``synth_agent.engine.selection``,
which ``synth-agent persona`` needs) does not import the judge, the search and the LLM layer::

    from synth_agent.engine import FitConfig, Judge, Synthesizer, rank
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the lazy exports, typed for checkers (nothing is imported at run time)
    from synth_agent.engine.judge import Judge, JudgeMode, combine_orders
    from synth_agent.engine.rerank import RankResult, Strategy, bradley_terry, rank
    from synth_agent.engine.synthesize import FitConfig, FitResult, Synthesizer, split_votes

_EXPORTS = {
    "Judge": "synth_agent.engine.judge",
    "JudgeMode": "synth_agent.engine.judge",
    "combine_orders": "synth_agent.engine.judge",
    "RankResult": "synth_agent.engine.rerank",
    "Strategy": "synth_agent.engine.rerank",
    "bradley_terry": "synth_agent.engine.rerank",
    "rank": "synth_agent.engine.rerank",
    "FitConfig": "synth_agent.engine.synthesize",
    "FitResult": "synth_agent.engine.synthesize",
    "Synthesizer": "synth_agent.engine.synthesize",
    "split_votes": "synth_agent.engine.synthesize",
}

__all__ = [
    "FitConfig",
    "FitResult",
    "Judge",
    "JudgeMode",
    "RankResult",
    "Strategy",
    "Synthesizer",
    "bradley_terry",
    "combine_orders",
    "rank",
    "split_votes",
]
assert sorted(__all__) == sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'synth_agent.engine' has no attribute {name!r}")
