"""synth-agent: personalize chat agents from their users' A/B votes (SynthesizeMe, as a service)."""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from synth_agent.models import Demo, Judgment, Message, PersonaProfile, Trace, Vote

__all__ = ["Demo", "Judgment", "Message", "PersonaProfile", "Trace", "Vote"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # The models load on first use: `synth-agent --help` and argument errors never import pydantic.
    if name in __all__:
        from synth_agent import models

        return getattr(models, name)
    raise AttributeError(f"module 'synth_agent' has no attribute {name!r}")
