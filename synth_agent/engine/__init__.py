"""The SynthesizeMe engine: fit personas, judge pairs, rerank candidates."""

from synth_agent.engine.judge import Judge, JudgeMode, combine_orders
from synth_agent.engine.rerank import RankResult, Strategy, bradley_terry, rank
from synth_agent.engine.synthesize import FitConfig, FitResult, Synthesizer, split_votes

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
