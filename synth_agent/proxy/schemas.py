"""Request and response bodies of the proxy: one pydantic model per body, so the OpenAPI schema is exact.

Request models are strict (no silent coercion of ``"5"`` to 5 or ``0`` to false),
cap every size (text, messages, candidates, batch), refuse non-finite numbers and
text that is not valid Unicode, and say in their JSON schema what the server
enforces, so a schema-driven fuzzer (Schemathesis, in the test suite) reaches deep
and every constraint in the schema is one the server really applies. Semantic
rules that JSON Schema cannot express (one vote answer may be empty but not both,
a and b must differ, user ids must not hold invisible characters) are enforced by
validators and documented in the field descriptions.

The limits are the proxy's settings (``SYNTH_AGENT_MAX_CONTENT_CHARS``,
``SYNTH_AGENT_MAX_MESSAGES``, ...), so request models are built per :class:`Limits`
by :func:`api_models` (cached: apps with equal limits share the classes). Response
models do not depend on limits and live at module level.
"""

import functools
import sys
import unicodedata
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from synth_agent.models import (
    MAX_CONTEXT_MESSAGES,
    MAX_USER_ID_CHARS,
    MAX_VOTE_ID_CHARS,
    Judgment,
    PersonaProfile,
    Vote,
    check_text,
    parse_timestamp,
    validate_opaque_id,
    validate_user_id,
)

__all__ = [
    "ABPair",
    "ABVoteReceipt",
    "ApiModels",
    "ChatCompletion",
    "ErrorDetail",
    "ErrorResponse",
    "Health",
    "JudgmentResult",
    "Limits",
    "ModelList",
    "PersonaHistory",
    "RerankResult",
    "UserDeleted",
    "VoteBatchResult",
    "VoteList",
    "api_models",
    "user_id_pattern",
]

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


@dataclass(frozen=True)
class Limits:
    """Every size the proxy accepts (from :class:`~synth_agent.proxy.settings.ProxySettings` and Settings)."""

    max_content_chars: int = 32_000
    max_messages: int = 256
    max_candidates: int = 8
    max_batch_votes: int = 1000
    max_parts: int = 64
    """content parts per message"""
    max_tools: int = 128


# ------------------------------------------------------------------ shared field types


def _class_item(cp: int) -> str:
    ch = chr(cp)
    if cp < 0x20 or 0x7F <= cp <= 0x9F:
        return f"\\x{cp:02x}"
    if ch in "\\]^-[":
        return "\\" + ch
    return ch


def _ranges(codepoints: list[int]) -> str:
    out: list[str] = []
    start = prev = codepoints[0]
    for cp in [*codepoints[1:], -2]:
        if cp == prev + 1:
            prev = cp
            continue
        out.append(_class_item(start) if start == prev else f"{_class_item(start)}-{_class_item(prev)}")
        start = prev = cp
    return "".join(out)


@functools.cache
def user_id_pattern() -> str:
    """The rule of :func:`~synth_agent.models.validate_user_id` as a regular expression (for the schema).

    No control characters, invisible formatting characters (category Cf) or line/paragraph
    separators anywhere, and no whitespace at either end. (Lone surrogates cannot travel in
    JSON that reached a handler; the length limit is ``maxLength``.)
    """
    bad = [cp for cp in range(sys.maxunicode + 1)
           if unicodedata.category(chr(cp)) in ("Cc", "Cf", "Zl", "Zp")]
    space = [cp for cp in range(sys.maxunicode + 1) if chr(cp).isspace() and cp not in set(bad)]
    inner, edge = _ranges(bad), _ranges(sorted(bad + space))
    return f"^[^{edge}](?:[^{inner}]*[^{edge}])?$"


def _user_id(v: str) -> str:
    return validate_user_id(v)


UserId = Annotated[
    str,
    Field(min_length=1, max_length=MAX_USER_ID_CHARS, json_schema_extra={"pattern": user_id_pattern()},
          description="An opaque user id (email, UUID, any Unicode name): no surrounding whitespace, no control "
          "characters, no invisible formatting characters (Unicode category Cf: zero-width spaces, "
          "right-to-left overrides), at most 256 characters."),
    AfterValidator(_user_id),
]


def _vote_id(v: str | int) -> str | int:
    if isinstance(v, str):
        validate_opaque_id(v, "id", max_chars=MAX_VOTE_ID_CHARS)
    return v


VoteId = Annotated[
    Annotated[str, Field(min_length=1, max_length=MAX_VOTE_ID_CHARS,
                         json_schema_extra={"pattern": user_id_pattern()})] | Annotated[int, Field(ge=0)],
    AfterValidator(_vote_id),
    Field(description="Your id for the vote (same rules as user ids); without one a content hash is used, "
          "so re-sending a vote never stores it twice."),
]

Seed = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]

_STRICT = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")
_OPEN = ConfigDict(strict=True, allow_inf_nan=False, extra="allow")


def _text_type(max_chars: int, *, min_length: int = 0, description: str | None = None) -> Any:
    return Annotated[
        str,
        Field(min_length=min_length, max_length=max_chars, description=description),
        AfterValidator(check_text),
    ]


# ------------------------------------------------------------------ response bodies (limit-free)


class ErrorDetail(BaseModel):
    message: str = Field(description="What went wrong and what to do about it.")
    type: str = Field(description="invalid_request_error, authentication_error, permission_error, "
                      "not_found_error, conflict_error, rate_limit_error, upstream_error or server_error")
    param: str | None = Field(default=None, description="The offending field, when there is one.")
    code: str | None = Field(default=None, description="A stable machine-readable code.")


class ErrorResponse(BaseModel):
    """Every error, in the OpenAI format (SDKs raise their usual exceptions)."""

    error: ErrorDetail
    request_id: str | None = Field(default=None, description="Also in the X-Request-ID header and the log.")


class VoteBatchResult(BaseModel):
    object: Literal["vote.batch"] = "vote.batch"
    added: int = Field(ge=0, description="votes newly stored")
    duplicates: int = Field(ge=0, description="votes that were stored already (same id or content)")
    users: list[str] = Field(description="the users the votes belong to")


class ABPair(BaseModel):
    object: Literal["ab.pair"] = "ab.pair"
    a: str
    b: str
    personalized: Literal["a", "b"] | None = Field(description="which answer had the persona (null: neither)")
    persona_version: int = Field(ge=0)
    token: str | None = Field(description="redeem with POST /v1/ab/{token}/vote; null when both answers were "
                              "identical")
    reason: str | None = None


class ABVoteReceipt(BaseModel):
    object: Literal["ab.vote"] = "ab.vote"
    ok: bool
    vote_id: str
    choice: Literal["a", "b"]
    chose_personalized: bool | None
    persona_version: int = Field(ge=0)


class RerankResult(BaseModel):
    object: Literal["rerank"] = "rerank"
    winner: int = Field(ge=0, description="index of the best candidate")
    best: str
    scores: list[float]
    order: list[int] = Field(description="candidate indexes, best first")
    strategy: Literal["knockout", "round_robin"]
    personalized_judge: bool
    persona_version: int = Field(ge=0)
    candidates: list[str]


class JudgmentResult(Judgment):
    object: Literal["judgment"] = "judgment"
    personalized: bool
    persona_version: int = Field(ge=0)


class PersonaHistory(BaseModel):
    object: Literal["list"] = "list"
    data: list[PersonaProfile]


class VoteList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Vote] = Field(description="the user's votes in time order (timestamp if given, else arrival)")


class UserDeleted(BaseModel):
    object: Literal["user.deleted"] = "user.deleted"
    deleted: dict[str, int] = Field(description="items deleted per kind (votes, personas, traces, ...)")


class Health(BaseModel):
    status: Literal["ok", "starting", "degraded"]
    auth: bool | None = None
    synthesis: Literal["inline", "off"] | None = None
    synthesis_in_flight: int | None = None
    pending_votes: int | None = Field(default=None, description="writes acknowledged and not yet "
                                      "searchable (votes, and new users' registrations) in the store's intake journal")
    store: str | None = Field(default=None, description="the store's error type when degraded")


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    object: str = "model"


class ModelList(BaseModel):
    model_config = ConfigDict(extra="allow")
    object: Literal["list"] = "list"
    data: list[ModelCard]


class CompletionMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | None = None


class CompletionChoice(BaseModel):
    model_config = ConfigDict(extra="allow")
    index: int
    message: CompletionMessage
    finish_reason: str | None = None


class ChatCompletion(BaseModel):
    """The upstream's chat completion, passed through (vendor fields included)."""

    model_config = ConfigDict(extra="allow")
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: dict[str, Any] | None = None


# ------------------------------------------------------------------ request bodies (per limits)


@dataclass(frozen=True)
class ApiModels:
    """The request models for one set of :class:`Limits`."""

    limits: Limits
    ChatCompletionRequest: type[BaseModel]
    ABRequest: type[BaseModel]
    ABVoteRequest: type[BaseModel]
    RerankRequest: type[BaseModel]
    JudgeRequest: type[BaseModel]
    VoteIn: type[BaseModel]
    VotesBody: Any


def _vote_kind(v: Any) -> str:
    if isinstance(v, list):
        return "vote-list"
    if isinstance(v, dict) and "votes" in v:
        return "vote-batch"
    return "one-vote"


def _timestamp(v: str | float) -> str | float:
    parse_timestamp(v)  # range (1970-9999) and ISO-8601 checks, with the same messages as the JSONL reader
    return v


@functools.cache
def api_models(limits: Limits = Limits()) -> ApiModels:  # noqa: B008 - frozen, hashable default
    """Build (once per ``limits``) the request models; see the module docstring."""
    L = limits
    Text = _text_type(L.max_content_chars)

    # -------------------------------------------------------------- chat (OpenAI format)

    class ContentPart(BaseModel):
        """One part of a message's content; only ``text`` parts reach judges and stored votes."""

        model_config = _OPEN
        type: str = Field(min_length=1, max_length=64, description="text, image_url, input_audio, ...")
        text: Text | None = None  # type: ignore[valid-type]

    class ChatMessage(BaseModel):
        """A Chat Completions message; unknown fields (tool calls, names...) are forwarded as sent."""

        model_config = _OPEN
        role: Literal["system", "developer", "user", "assistant", "tool", "function"]
        content: Text | Annotated[list[ContentPart], Field(max_length=L.max_parts)] | None = None  # type: ignore[valid-type]
        name: str | None = Field(default=None, max_length=256)

    Messages = Annotated[list[ChatMessage], Field(min_length=1, max_length=L.max_messages,
                                                  description="the conversation, OpenAI chat format")]

    class GenerationParams(BaseModel):
        """The generation parameters the proxy knows; any other field is forwarded to the upstream as sent."""

        model_config = _OPEN
        temperature: float | None = Field(default=None, ge=0, le=2)
        top_p: float | None = Field(default=None, ge=0, le=1)
        max_tokens: int | None = Field(default=None, ge=1, le=2**31 - 1)
        max_completion_tokens: int | None = Field(default=None, ge=1, le=2**31 - 1)
        presence_penalty: float | None = Field(default=None, ge=-2, le=2)
        frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
        stop: Annotated[str, Field(max_length=256)] | Annotated[
            list[Annotated[str, Field(max_length=256)]], Field(max_length=4)] | None = None
        logprobs: bool | None = None
        top_logprobs: int | None = Field(default=None, ge=0, le=20)
        response_format: dict[str, Any] | None = None
        logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(default=None, max_length=300)
        metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(default=None, max_length=16)

    class ChatCompletionRequest(GenerationParams):
        """Chat Completions; the user's persona is prepended as a system message."""

        model: str = Field(min_length=1, max_length=256)
        messages: Messages
        user: UserId | None = Field(default=None, description="personalize for this user (or X-Synth-User)")
        stream: bool = False
        stream_options: dict[str, Any] | None = None
        n: int | None = Field(default=None, ge=1, le=128)
        seed: Seed | None = None
        tools: Annotated[list[dict[str, Any]], Field(max_length=L.max_tools)] | None = None
        tool_choice: str | dict[str, Any] | None = None
        parallel_tool_calls: bool | None = None

    class ABRequest(GenerationParams):
        """Two candidate answers (with and without the persona once one exists) and a vote token."""

        user: UserId | None = Field(default=None, description="the user (or X-Synth-User)")
        model: str | None = Field(default=None, min_length=1, max_length=256,
                                  description="client model name (mapped like chat completions; default: the "
                                  "proxy's default model)")
        messages: Messages
        seed: Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX - 1)] | None = Field(
            default=None, description="the second plain variant uses seed + 1")

    class ABVoteRequest(BaseModel):
        model_config = _STRICT
        user: UserId | None = Field(default=None, description="the user (or X-Synth-User)")
        choice: Literal["a", "b", "A", "B"] = Field(description="the candidate the user picked")

    def _candidate(v: str) -> str:
        if not v.strip():
            raise ValueError("every candidate must be non-empty text")
        return v

    class RerankRequest(GenerationParams):
        """Best of n for the user: give ``candidates``, or ``n`` to have them generated with the persona."""

        user: UserId | None = Field(default=None, description="the user (or X-Synth-User)")
        model: str | None = Field(default=None, min_length=1, max_length=256)
        messages: Messages
        candidates: Annotated[
            list[Annotated[_text_type(L.max_content_chars, min_length=1), AfterValidator(_candidate)]],  # type: ignore[misc, valid-type]
            Field(min_length=2, max_length=L.max_candidates),
        ] | None = Field(default=None, description="answers to rank (non-empty text); generated when omitted")
        n: int | None = Field(default=None, ge=2, le=L.max_candidates,
                              description="how many to generate when candidates are omitted (default 4)")
        strategy: Literal["knockout", "round_robin"] = "knockout"
        seed: Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX - L.max_candidates)] | None = Field(
            default=None, description="candidate i is generated with seed + i")

    class JudgeRequest(BaseModel):
        """Which of ``a`` and ``b`` this user prefers. One of them may be empty (shown to the judge as an
        explicit empty response); both empty or identical is refused."""

        model_config = _STRICT
        user: UserId | None = Field(default=None, description="the user (or X-Synth-User)")
        messages: Messages
        a: Text  # type: ignore[valid-type]
        b: Text  # type: ignore[valid-type]

        @model_validator(mode="after")
        def _pair(self) -> Self:
            a, b = str(self.a), str(self.b)
            if not a.strip() and not b.strip():
                raise ValueError("a and b are both empty; nothing to judge")
            if a.strip() == b.strip():
                raise ValueError("a and b are identical; nothing to judge")
            return self

    # -------------------------------------------------------------- votes

    class VoteMessage(BaseModel):
        """A conversation turn of a vote (``model``, ``bot`` and ``human`` are read as assistant/user)."""

        model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")
        role: Literal["system", "user", "assistant", "model", "bot", "human"]
        content: Text  # type: ignore[valid-type]

    Response = Annotated[
        Text | VoteMessage | Annotated[list[VoteMessage], Field(min_length=1, max_length=MAX_CONTEXT_MESSAGES)],  # type: ignore[valid-type]
        Field(description="the answer: text (may be empty on one side of the vote), an assistant message, or "
              "a list of messages (PersonalRewardBench)"),
    ]

    class VoteIn(BaseModel):
        """One vote: in ``context`` the user preferred ``chosen`` over ``rejected``.

        At most one answer may be empty; identical answers are refused; unknown fields are refused.
        """

        model_config = _STRICT
        id: VoteId | None = None
        user_id: UserId | None = Field(default=None, description="the user (may come from X-Synth-User)")
        context: Text | Annotated[  # type: ignore[valid-type]
            list[VoteMessage], Field(min_length=1, max_length=MAX_CONTEXT_MESSAGES)
        ] = Field(description="the conversation, or just the user's message as text")
        chosen: Response
        rejected: Response
        timestamp: Annotated[
            Annotated[str, Field(max_length=64, description="ISO-8601 (e.g. 2025-01-01T10:00:00Z)")]
            | Annotated[float, Field(ge=0, le=253402300799999, description="seconds (or milliseconds) since 1970")],
            AfterValidator(_timestamp),
        ] | None = Field(default=None, description="when the vote was cast (1970 to 9999); orders a user's votes")
        split: Literal["train", "val", "test"] | None = None

    Votes = Annotated[list[VoteIn], Field(min_length=1, max_length=L.max_batch_votes)]

    class VoteBatch(BaseModel):
        model_config = _STRICT
        votes: Votes

    VotesBody = Annotated[
        Annotated[VoteIn, Tag("one-vote")] | Annotated[Votes, Tag("vote-list")] | Annotated[VoteBatch, Tag("vote-batch")],
        Discriminator(_vote_kind),
    ]

    return ApiModels(
        limits=L, ChatCompletionRequest=ChatCompletionRequest, ABRequest=ABRequest, ABVoteRequest=ABVoteRequest,
        RerankRequest=RerankRequest, JudgeRequest=JudgeRequest, VoteIn=VoteIn, VotesBody=VotesBody,
    )


# ------------------------------------------------------------------ examples (the /docs page; the fuzzer starts from them)

_CONVO = [{"role": "user", "content": "How do I start learning Python?"}]

EXAMPLES: dict[str, dict[str, dict[str, Any]]] = {
    "chat": {
        "personalized": {"summary": "personalized for a user", "value": {
            "model": "gpt-4o-mini", "user": "ana@example.com", "messages": _CONVO}},
        "streaming": {"summary": "streamed, with usage", "value": {
            "model": "gpt-4o-mini", "user": "ana@example.com", "messages": _CONVO, "stream": True,
            "stream_options": {"include_usage": True}}},
        "anonymous": {"summary": "no user: forwarded untouched", "value": {
            "model": "gpt-4o-mini", "messages": _CONVO, "temperature": 0.2, "max_tokens": 200}},
    },
    "votes": {
        "one": {"summary": "one vote", "value": {
            "user_id": "ana@example.com", "context": [{"role": "user", "content": "hi"}],
            "chosen": "Hello! How can I help?", "rejected": "Go away.", "timestamp": "2025-01-01T10:00:00Z"}},
        "batch": {"summary": "a batch (all or nothing); one answer may be empty", "value": {"votes": [
            {"user_id": "ana@example.com", "id": "v-1", "context": "Name a fruit.", "chosen": "Apple.",
             "rejected": ""},
            {"user_id": "ana@example.com", "id": "v-2", "context": [{"role": "user", "content": "Name a color."}],
             "chosen": {"role": "assistant", "content": "Blue."}, "rejected": "Red.", "timestamp": 1735725600},
        ]}},
    },
    "ab": {
        "pair": {"summary": "two answers to vote on", "value": {"user": "ana@example.com", "messages": _CONVO}},
    },
    "ab_vote": {
        "vote": {"summary": "the user picked a", "value": {"user": "ana@example.com", "choice": "a"}},
    },
    "rerank": {
        "given": {"summary": "rank given candidates", "value": {
            "user": "ana@example.com", "messages": _CONVO,
            "candidates": ["Read a book.", "- Install Python\n- Do a tutorial\n- Build something small"]}},
        "generated": {"summary": "generate 3 candidates with the persona, then rank", "value": {
            "user": "ana@example.com", "messages": _CONVO, "n": 3, "strategy": "round_robin"}},
    },
    "judge": {
        "pair": {"summary": "a vs b", "value": {
            "user": "ana@example.com", "messages": _CONVO, "a": "Read a book.",
            "b": "- Install Python\n- Do a tutorial"}},
        "empty": {"summary": "one answer empty", "value": {
            "user": "ana@example.com", "messages": _CONVO, "a": "", "b": "Start with the official tutorial."}},
    },
}
"""Request examples per route, shown in /docs (``openapi_examples``); every one is valid."""
