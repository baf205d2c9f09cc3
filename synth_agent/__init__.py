"""synth-agent: personalize chat agents from their users' A/B votes (SynthesizeMe, as a service)."""

from synth_agent.models import Demo, Judgment, Message, PersonaProfile, Trace, Vote

__all__ = ["Demo", "Judgment", "Message", "PersonaProfile", "Trace", "Vote"]
__version__ = "0.1.0"
