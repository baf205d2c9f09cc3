"""Public data types: messages, votes, personas, judgments.

Every type here is a pydantic v2 model. Validation is strict on purpose: a vote
that is ambiguous (both answers empty, identical answers, unknown roles, oversize
content, unusable user id) is rejected with a message that says what to fix, so
nothing half-valid ever reaches the store. Anything a backend could refuse is
refused here first: text that is not encodable as UTF-8 (lone surrogates such as
``"\\ud800"``, which JSON can carry), timestamps outside 1970–9999, ids that are
empty, padded, over 256 characters or hold control/invisible characters, and
non-finite numbers in metadata.

One answer of a vote may be empty (models do return nothing, and an empty answer
is a real losing candidate); judges see it as an explicit empty response
(:data:`synth_agent.prompts.EMPTY_RESPONSE`).

Size limits are configurable per call through pydantic's validation context::

    >>> Vote.model_validate(
    ...     {"user_id": "ana@example.com", "context": [{"role": "user", "content": "hi"}],
    ...      "chosen": "Hello!", "rejected": "Go away."},
    ...     context={"max_content_chars": 10_000},
    ... ).chosen
    'Hello!'
"""

from __future__ import annotations

import hashlib
import json
import math
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

# re-exported: the id and text rules live in a module the CLI can import without pydantic
from synth_agent.ids import MAX_USER_ID_CHARS as MAX_USER_ID_CHARS
from synth_agent.ids import check_text as check_text
from synth_agent.ids import validate_opaque_id as validate_opaque_id
from synth_agent.ids import validate_user_id as validate_user_id
from synth_agent.safejson import unsafe_value

Role = Literal["system", "user", "assistant"]
"""Roles we accept. ``model`` (PersonalRewardBench) and ``bot`` are aliases of ``assistant``."""

ROLE_ALIASES: dict[str, str] = {"model": "assistant", "bot": "assistant", "human": "user"}

DEFAULT_MAX_CONTENT_CHARS = 32_000
"""Default upper bound on one message's content; override with validation context ``max_content_chars``."""

MAX_VOTE_ID_CHARS = 256
MAX_CONTEXT_MESSAGES = 200

MIN_TIMESTAMP = datetime(1970, 1, 1, tzinfo=UTC)
MAX_TIMESTAMP = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
"""Accepted vote times: what every backend (and ``datetime``) can hold and order."""
_MAX_EPOCH_SECONDS = MAX_TIMESTAMP.timestamp()
_MAX_EPOCH_MS = _MAX_EPOCH_SECONDS * 1000.0


def utcnow() -> datetime:
    return datetime.now(UTC)


def _max_chars(info: ValidationInfo | None) -> int:
    ctx = info.context if info is not None and info.context else {}
    return int(ctx.get("max_content_chars", DEFAULT_MAX_CONTENT_CHARS))


class Message(BaseModel):
    """One chat message. ``model``/``bot`` roles are read as ``assistant``."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    role: Role
    content: str

    @field_validator("role", mode="before")
    @classmethod
    def _alias_role(cls, v: Any) -> Any:
        if isinstance(v, str):
            low = v.strip().lower()
            low = ROLE_ALIASES.get(low, low)
            if low not in ("system", "user", "assistant"):
                raise ValueError(
                    f"unknown role {v!r}; use one of 'system', 'user', 'assistant' (or 'model' for assistant)"
                )
            return low
        return v

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, v: Any, info: ValidationInfo) -> Any:
        if v is None:
            raise ValueError("message content is missing")
        if not isinstance(v, str):
            raise ValueError(f"message content must be a string, got {type(v).__name__}")
        limit = _max_chars(info)
        if len(v) > limit:
            raise ValueError(f"message content is {len(v)} characters; the limit is {limit}")
        return check_text(v, "message content")


def _response_text(v: Any, field: str, info: ValidationInfo) -> str:
    """Accept a response as str, a {role, content} dict, or a list of messages (PersonalRewardBench).

    An empty answer is allowed here (the vote checks that the other one is not empty).
    """
    if v is None:
        raise ValueError(f"{field} is missing")
    if isinstance(v, Message):
        text = v.content
    elif isinstance(v, dict):
        if "content" not in v:
            raise ValueError(f"{field} must be a string or a {{role, content}} message")
        msg = Message.model_validate(v, context=info.context)
        if msg.role != "assistant":
            raise ValueError(f"{field} must be an assistant/model message, got role {msg.role!r}")
        text = msg.content
    elif isinstance(v, list):
        msgs = [Message.model_validate(m, context=info.context) for m in v]
        replies = [m.content for m in msgs if m.role == "assistant"]
        if not replies:
            raise ValueError(f"{field} as a list must contain at least one assistant/model message")
        text = "\n\n".join(replies)
    elif isinstance(v, str):
        text = v
    else:
        raise ValueError(f"{field} must be a string or a message, got {type(v).__name__}")
    limit = _max_chars(info)
    if len(text) > limit:
        raise ValueError(f"{field} is {len(text)} characters; the limit is {limit}")
    return check_text(text, field)


_RANGE_HINT = "timestamps must lie between 1970-01-01 and 9999-12-31 (UTC)"


def _in_range(dt: datetime) -> datetime:
    try:
        utc = dt.astimezone(UTC)
    except (OverflowError, ValueError):
        raise ValueError(f"timestamp {dt.isoformat()} is out of range: {_RANGE_HINT}") from None
    if not MIN_TIMESTAMP <= utc <= MAX_TIMESTAMP:
        raise ValueError(f"timestamp {dt.isoformat()} is out of range: {_RANGE_HINT}")
    return dt


def vote_checks(vote: Vote) -> Vote:
    """The vote-level checks (answers not both empty nor identical, a context with text) and the content-hash
    id: ``Vote``'s own after-validator, also applied by a caller that builds a ``Vote`` from fields it has
    already checked (``Vote.model_construct``; the proxy's vote route). Raises ``ValueError``."""
    if not vote.chosen.strip() and not vote.rejected.strip():
        raise ValueError("chosen and rejected are both empty; at most one answer of a vote may be empty")
    if vote.chosen.strip() == vote.rejected.strip():
        raise ValueError("chosen and rejected are identical; a vote needs two different responses")
    if not any(m.content.strip() for m in vote.context):
        raise ValueError("context has no non-empty message")
    if not vote.id:
        vote.id = vote_fingerprint(vote.user_id, vote.context, vote.chosen, vote.rejected, vote.timestamp)
    return vote


def parse_timestamp(v: Any) -> datetime | None:
    """A vote time from ISO-8601 text, epoch seconds or milliseconds (or a datetime), in 1970–9999; None if empty."""
    if v is None or v == "":
        return None
    if isinstance(v, datetime):
        return _in_range(v if v.tzinfo else v.replace(tzinfo=UTC))
    if isinstance(v, bool):
        raise ValueError("timestamp must be ISO-8601 text or a number of seconds since the epoch")
    if isinstance(v, int | float):
        if not math.isfinite(v):
            raise ValueError("timestamp must be finite")
        if v < 0 or v > _MAX_EPOCH_MS:
            raise ValueError(
                f"timestamp {v} is out of range: give seconds (or milliseconds) since 1970-01-01, "
                "up to the year 9999"
            )
        # milliseconds are common in exports; seconds past 1e11 would be after the year 5138
        seconds = v / 1000.0 if v > 1e11 else float(v)
        return _in_range(datetime.fromtimestamp(min(seconds, _MAX_EPOCH_SECONDS), UTC))
    if isinstance(v, str):
        check_text(v, "timestamp")
        try:
            dt = datetime.fromisoformat(v.replace("Z", "+00:00"))
        except ValueError as exc:
            raise ValueError(f"timestamp {v!r} is not ISO-8601") from exc
        return _in_range(dt if dt.tzinfo else dt.replace(tzinfo=UTC))
    raise ValueError("timestamp must be ISO-8601 text or a number of seconds since the epoch")


def vote_fingerprint(
    user_id: str, context: list[Message], chosen: str, rejected: str, timestamp: datetime | None
) -> str:
    """Content address of a vote, used as its id when the input gives none (makes re-ingest idempotent)."""
    payload = json.dumps(
        {
            "u": user_id,
            "c": [[m.role, m.content] for m in context],
            "a": chosen,
            "b": rejected,
            "t": timestamp.isoformat() if timestamp else None,
        },
        ensure_ascii=False,
        sort_keys=True,
    )
    return "v_" + hashlib.sha256(payload.encode()).hexdigest()[:24]


class Vote(BaseModel):
    """One pairwise preference: in ``context`` the user preferred ``chosen`` over ``rejected``.

    ``id`` defaults to a content hash, so ingesting the same file twice adds nothing.
    ``timestamp`` orders a user's votes; votes without one keep their arrival order.
    """

    model_config = ConfigDict(extra="ignore")

    id: str = ""
    user_id: str
    context: list[Message] = Field(min_length=1)
    chosen: str
    rejected: str
    timestamp: datetime | None = None
    split: Literal["train", "val", "test"] | None = None

    @field_validator("user_id", mode="before")
    @classmethod
    def _uid(cls, v: Any) -> str:
        return validate_user_id(v)

    @field_validator("context", mode="before")
    @classmethod
    def _ctx(cls, v: Any) -> Any:
        if v is None:
            raise ValueError("context is missing: give the conversation as a list of {role, content} messages")
        if isinstance(v, str):
            v = [{"role": "user", "content": v}]
        if not isinstance(v, list):
            raise ValueError("context must be a list of {role, content} messages")
        if not v:
            raise ValueError("context is empty: it needs at least the user's message")
        if len(v) > MAX_CONTEXT_MESSAGES:
            raise ValueError(f"context has {len(v)} messages; the limit is {MAX_CONTEXT_MESSAGES}")
        return v

    @field_validator("chosen", mode="before")
    @classmethod
    def _chosen(cls, v: Any, info: ValidationInfo) -> str:
        return _response_text(v, "chosen", info)

    @field_validator("rejected", mode="before")
    @classmethod
    def _rejected(cls, v: Any, info: ValidationInfo) -> str:
        return _response_text(v, "rejected", info)

    @field_validator("timestamp", mode="before")
    @classmethod
    def _ts(cls, v: Any) -> datetime | None:
        return parse_timestamp(v)

    @field_validator("id", mode="before")
    @classmethod
    def _id(cls, v: Any) -> str:
        if v is None or v == "":
            return ""  # no id: a content hash is used
        if isinstance(v, int) and not isinstance(v, bool):
            v = str(v)
        if not isinstance(v, str):
            raise ValueError("id must be a string")
        return validate_opaque_id(v, "id", max_chars=MAX_VOTE_ID_CHARS)

    @model_validator(mode="after")
    def _check(self) -> Vote:
        return vote_checks(self)

    @property
    def query_text(self) -> str:
        """The last user turn: what we embed to find a user's relevant past votes."""
        for m in reversed(self.context):
            if m.role == "user" and m.content.strip():
                return m.content
        return self.context[-1].content


def as_messages(context: Any) -> list[Message]:
    """Accept a context as Message objects, ``{"role", "content"}`` dicts or a bare user string."""
    if isinstance(context, str):
        return [Message(role="user", content=context)]
    return [m if isinstance(m, Message) else Message.model_validate(m) for m in context]


class Demo(BaseModel):
    """A few-shot example for the judge: a past vote shown in a fixed presentation order.

    ``chosen_first`` says whether the chosen response is shown as A. A demo with
    ``reasoning=None`` is a *label-only* demo.
    """

    model_config = ConfigDict(frozen=True)

    vote_id: str
    context: list[Message]
    chosen: str
    rejected: str
    chosen_first: bool = True
    reasoning: str | None = None

    @property
    def first(self) -> str:
        return self.chosen if self.chosen_first else self.rejected

    @property
    def second(self) -> str:
        return self.rejected if self.chosen_first else self.chosen

    @property
    def label(self) -> Literal["A", "B"]:
        return "A" if self.chosen_first else "B"


class Trace(BaseModel):
    """A bootstrapped chain-of-thought judgment of one train vote, by a judge without user info.

    ``verified`` is True when the judge's prediction matched the user's real vote.
    Traces are kept per user so that a refit reuses them instead of paying again.
    """

    model_config = ConfigDict(frozen=True)

    vote_id: str
    chosen_first: bool
    reasoning: str
    predicted: Literal["A", "B", "tie"]
    """"tie": no readable answer (never verified, never a demo)."""
    verified: bool
    model: str = ""

    @model_validator(mode="after")
    def _storable(self) -> Trace:
        problem = unsafe_value(self.model_dump(mode="python"))
        if problem is not None:
            raise ValueError(f"the trace cannot be stored: {problem}")
        return self


class PersonaProfile(BaseModel):
    """What SynthesizeMe learned about one user: a persona and the judge's demos.

    Saved as a new version on every fit; earlier versions are kept as history.
    """

    user_id: str
    persona: str
    demos: list[Demo] = Field(default_factory=list)
    version: int = 0
    val_accuracy: float | None = None
    """The served demos' accuracy on the validation votes (one order each). The persona is written from every
    context vote, validation votes included, so this is an in-sample figure; the held-out evidence is
    ``meta["selection"]`` (cross-validated, see docs/personalization.md)."""
    model: str = ""
    prompt_version: str = ""
    vote_ids: list[str] = Field(default_factory=list)
    created_at: datetime = Field(default_factory=utcnow)
    meta: dict[str, Any] = Field(default_factory=dict)

    @field_validator("user_id", mode="before")
    @classmethod
    def _uid(cls, v: Any) -> str:
        return validate_user_id(v)

    @field_validator("persona")
    @classmethod
    def _persona(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("persona text is empty")
        return check_text(v, "persona")

    @model_validator(mode="after")
    def _storable(self) -> PersonaProfile:
        """Everything saved must be storable: no lone surrogates anywhere, finite numbers in meta."""
        problem = unsafe_value(self.model_dump(mode="python", exclude={"created_at"}))
        if problem is not None:
            raise ValueError(f"the profile cannot be stored: {problem}")
        return self

    def same_fit(self, other: PersonaProfile) -> bool:
        """Whether both are results of the same fit input: the same votes and split, settings and model
        (``meta["fit_key"]``, see ``Synthesizer.fit_key``); a profile without a key matches nothing."""
        key = self.meta.get("fit_key")
        return bool(key) and key == other.meta.get("fit_key")


Preference = Literal["A", "B", "tie"]


class OrderJudgment(BaseModel):
    """The judge's verdict in one presentation order, mapped back to the caller's A/B."""

    swapped: bool
    preferred: Literal["A", "B", "tie"]
    """"tie": the model gave no readable answer in this order (it counts as P(A) = 0.5)."""
    reasoning: str = ""
    p_a: float | None = None
    """P(caller's A preferred) when the judge exposes probabilities (log-prob mode)."""


class Judgment(BaseModel):
    """A judge's decision between the caller's responses A and B, both orders combined.

    ``confidence`` is in [0, 1]; the two orders disagreeing gives ``preferred='tie'``.
    """

    preferred: Preference
    confidence: float = Field(ge=0.0, le=1.0)
    reasoning: str = ""
    p_a: float = Field(default=0.5, ge=0.0, le=1.0)
    orders: list[OrderJudgment] = Field(default_factory=list)


class ValidationIssue(BaseModel):
    """One rejected input line: where, and why."""

    line: int
    error: str
