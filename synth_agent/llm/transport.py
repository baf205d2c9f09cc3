"""How one HTTP attempt reaches an OpenAI-compatible ``/chat/completions``: the lean wire client, or ChatOpenAI.

:class:`~synth_agent.llm.client.LLMClient` owns everything around an attempt
(limits, retries, cache, parsing, counters); a transport only sends one request
body and turns the answer into a :class:`~synth_agent.llm.base.Completion` or a
typed :class:`~synth_agent.llm.errors.LLMError`. Two ship:

* :class:`LeanTransport` (``EndpointConfig.transport="lean"``, the default) speaks the
  Chat Completions wire format directly with ``orjson``: over our own HTTP/1.1 client
  (:mod:`~synth_agent.llm.wire`) for ``http://`` endpoints, over ``aiohttp`` for ``https://``
  ones (and for every endpoint with ``transport="aiohttp"``). The judge and the fit make
  thousands of calls, and on a 2-core machine the client's CPU per call is the ceiling:
  ``bench/client_cpu.py`` measures it against the alternatives.
* :class:`LangChainTransport` (``transport="langchain"``) goes through langchain-openai's
  ``ChatOpenAI`` (message conversion, callbacks, the openai SDK and httpx): use it when
  you want LangChain's tracing on judge calls. Chat models users hand to the middleware
  stay LangChain models either way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import aiohttp
import orjson

from synth_agent.llm.base import Completion, TokenLogprob
from synth_agent.llm.errors import (
    LLMError,
    LLMTimeoutError,
    UnavailableError,
    UnparseableResponseError,
    error_for_status,
)
from synth_agent.llm.wire import WireClient, plain_http

if TYPE_CHECKING:
    from synth_agent.llm.client import EndpointConfig

__all__ = [
    "ChatTransport",
    "LangChainTransport",
    "LeanTransport",
    "cached_prompt_tokens",
    "make_transport",
    "normalize_messages",
    "parse_chat_completion",
]

_ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "model": "assistant",
    "ai": "assistant",
}


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """Chat messages as ``{"role", "content"}`` dicts with OpenAI roles; ValueError on an unknown role.

    Already-canonical messages are passed through as they are (no copy): this runs on every call.
    """
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        role = m.get("role")
        content = m.get("content", "")
        if role in ("system", "user", "assistant") and type(content) is str and len(m) == 2:
            out.append(m)  # type: ignore[arg-type]
            continue
        canon = _ROLES.get(str(role or "").lower())
        if canon is None:
            raise ValueError(f"message {i} has unsupported role {role!r}; use system, user or assistant")
        out.append({"role": canon, "content": "" if content is None else str(content)})
    return out


def _top_logprobs(content: Any) -> list[list[TokenLogprob]]:
    top: list[list[TokenLogprob]] = []
    for tok in content or ():
        alts = tok.get("top_logprobs") or [{"token": tok.get("token", ""), "logprob": tok.get("logprob", 0.0)}]
        top.append([TokenLogprob(str(a["token"]), float(a["logprob"])) for a in alts])
    return top


def cached_prompt_tokens(usage: Mapping[str, Any]) -> int:
    """``usage.prompt_tokens_details.cached_tokens``: prompt tokens the server read from its prefix cache.

    OpenAI, SGLang and vLLM (with ``--enable-prompt-tokens-details``) report it; servers that do not
    (llama.cpp, vLLM without the flag: ``"prompt_tokens_details": null``) count as 0.
    """
    details = usage.get("prompt_tokens_details")
    return int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0


def parse_chat_completion(obj: Any, *, default_model: str, want_logprobs: bool) -> Completion:
    """A decoded ``chat.completion`` body as a Completion; UnparseableResponseError if it is not one."""
    try:
        choice = obj["choices"][0]
        message = choice.get("message") or {}
        text = message.get("content")
        usage = obj.get("usage") or {}
        top = _top_logprobs((choice.get("logprobs") or {}).get("content")) if want_logprobs else None
        return Completion(
            text="" if text is None else str(text),
            model=str(obj.get("model") or default_model),
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            cached_prompt_tokens=cached_prompt_tokens(usage),
            top_logprobs=top,
        )
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as e:
        raise UnparseableResponseError(
            f"not a chat completion ({type(e).__name__}: {e}); body starts {str(obj)[:160]!r}"
        ) from e


class ChatTransport(Protocol):
    """Sends one chat-completion request body; raises typed :class:`LLMError` subclasses."""

    async def chat(self, body: dict[str, Any], *, want_logprobs: bool) -> Completion: ...

    async def get_json(self, url: str) -> Any:
        """GET ``url``; the decoded JSON of a 200 answer, None otherwise (used by server probes)."""
        ...

    async def aclose(self) -> None: ...

    def abandon(self) -> None:
        """Release what can be released without awaiting (the owning event loop is closed)."""
        ...


def _error_from_body(status: int, raw: bytes, headers: Mapping[str, str]) -> LLMError:
    message, code = raw[:300].decode("utf-8", "replace"), None
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            message = str(err.get("message") or err.get("detail") or message)
            raw_code = err.get("code")
            code = raw_code if isinstance(raw_code, str) else err.get("type") if isinstance(err.get("type"), str) else None
        elif isinstance(err, str):
            message = err
    return error_for_status(status, message, code=code, headers=headers)


class LeanTransport:
    """Chat Completions over our own HTTP/1.1 wire (:mod:`~synth_agent.llm.wire`) for ``http://`` endpoints,
    over one ``aiohttp`` session for the rest (``https://``) or when ``transport="aiohttp"``.

    Bound to the event loop that created it. Both paths send the same bytes as the body and the same
    ``Authorization`` and ``Content-Type`` headers, and map failures to the same :class:`LLMError` types.
    """

    def __init__(self, config: EndpointConfig) -> None:
        self.config = config
        self._url = config.base_url.rstrip("/") + "/chat/completions"
        self._headers = {"Authorization": f"Bearer {config.api_key}", "Content-Type": "application/json"}
        self._wire: WireClient | None = None
        self._session: aiohttp.ClientSession | None = None
        if config.transport != "aiohttp" and plain_http(self._url):
            self._wire = WireClient(self._url, self._headers, timeout=config.timeout)
            self._path = urlsplit(self._url).path or "/"
            self._root = _origin(self._url)
        else:
            # The headers and the total timeout are the session's defaults rather than per-call arguments:
            # aiohttp then copies one header set per request instead of merging two (~1.2 of ~1.4 us saved).
            # The URL stays a str: yarl caches parsed strings, and URL(URL) measured slower (0.56 vs 0.38 us).
            # No pool limit: the limiter decides how many requests are in flight, so a request never
            # waits for a connection after its timeout started.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300), raise_for_status=False,
                headers=self._headers, timeout=aiohttp.ClientTimeout(total=config.timeout),
            )  # fmt: skip

    async def chat(self, body: dict[str, Any], *, want_logprobs: bool) -> Completion:
        data = orjson.dumps(body)
        headers: Mapping[str, str]
        try:
            if self._wire is not None:
                status, headers, raw = await self._wire.request("POST", self._path, data)
            else:
                assert self._session is not None
                async with self._session.post(self._url, data=data) as r:
                    raw = await r.read()
                    status, headers = r.status, r.headers
        except TimeoutError as e:  # aiohttp's ServerTimeoutError / ConnectionTimeoutError are TimeoutErrors
            raise LLMTimeoutError(f"no answer within {self.config.timeout:g} s ({type(e).__name__})", cause=e) from e
        except (aiohttp.ClientError, OSError) as e:  # the wire's WireError is a ConnectionError
            raise UnavailableError(f"{type(e).__name__}: {e}"[:300], cause=e) from e
        if status >= 400:
            raise _error_from_body(status, raw, headers)
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as e:  # a truncated body: worth another try
            raise UnparseableResponseError(
                f"HTTP {status} body is not JSON: {raw[:160]!r}", cause=e, retryable=True
            ) from e
        return parse_chat_completion(obj, default_model=self.config.model, want_logprobs=want_logprobs)

    async def get_json(self, url: str) -> Any:
        timeout = min(2.0, self.config.timeout)
        try:
            if self._wire is not None:
                if _origin(url) != self._root:
                    return None  # the probes ask the endpoint's own server only
                async with asyncio.timeout(timeout):
                    status, _, raw = await self._wire.request("GET", urlsplit(url).path or "/")
                return orjson.loads(raw) if status == 200 else None
            assert self._session is not None
            async with self._session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                if r.status != 200:
                    return None
                return orjson.loads(await r.read())
        except (TimeoutError, aiohttp.ClientError, OSError, orjson.JSONDecodeError, ValueError):
            return None

    async def aclose(self) -> None:
        if self._wire is not None:
            self._wire.close()
        if self._session is not None:
            await self._session.close()

    def abandon(self) -> None:
        """Drop the connections of a transport whose event loop is gone (nothing can be awaited there)."""
        if self._wire is not None:
            self._wire.abandon()
        connector = self._session.connector if self._session is not None else None
        if connector is not None and not connector.closed:
            connector._close()  # the synchronous part of close(): the sockets' loop no longer runs


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port


class LangChainTransport:
    """Chat Completions through langchain-openai ``ChatOpenAI`` (``max_retries=0``: the client retries)."""

    _KWARGS = ("temperature", "max_tokens", "response_format", "logprobs", "top_logprobs", "seed")

    def __init__(self, config: EndpointConfig) -> None:
        import httpx
        import openai
        from langchain_openai import ChatOpenAI

        self.config = config
        self._openai = openai
        self.http = openai.DefaultAsyncHttpxClient(
            timeout=config.timeout,
            # openai's stubs name their own vendored httpx type; at run time it is httpx's Limits
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),  # type: ignore[arg-type]
        )
        self.chat_model = ChatOpenAI(
            model=config.model,
            base_url=config.base_url,
            api_key=config.api_key,  # type: ignore[arg-type]
            timeout=config.timeout,
            max_retries=0,
            http_async_client=self.http,
        )

    async def chat(self, body: dict[str, Any], *, want_logprobs: bool) -> Completion:
        from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

        kinds = {"system": SystemMessage, "user": HumanMessage, "assistant": AIMessage}
        messages = [kinds[m["role"]](content=m["content"]) for m in body["messages"]]
        kwargs = {k: body[k] for k in self._KWARGS if k in body}
        extra = {k: v for k, v in body.items() if k not in self._KWARGS and k not in ("model", "messages")}
        if extra:
            kwargs["extra_body"] = extra
        openai = self._openai
        try:
            message = await self.chat_model.ainvoke(messages, **kwargs)
        except openai.APITimeoutError as e:
            raise LLMTimeoutError(f"no answer within {self.config.timeout:g} s (APITimeoutError)", cause=e) from e
        except openai.APIConnectionError as e:
            raise UnavailableError(f"{type(e).__name__}: {e}"[:300], cause=e) from e
        except openai.APIStatusError as e:
            err = e.body.get("error", e.body) if isinstance(e.body, dict) else None
            code = err.get("code") if isinstance(err, dict) and isinstance(err.get("code"), str) else None
            raise error_for_status(e.status_code, e.message, code=code, headers=e.response.headers, cause=e) from e
        except openai.APIResponseValidationError as e:
            raise UnparseableResponseError(f"unreadable body: {e}", cause=e, retryable=True) from e
        except (ValueError, TypeError, KeyError) as e:  # langchain-openai's complaints about odd bodies
            raise UnparseableResponseError(f"not a chat completion: {e!r}", cause=e) from e
        usage: dict[str, Any] = dict(message.usage_metadata or {})
        meta = message.response_metadata or {}
        top = _top_logprobs((meta.get("logprobs") or {}).get("content")) if want_logprobs else None
        return Completion(
            text=message.content if isinstance(message.content, str) else message.text,
            model=str(meta.get("model_name") or self.config.model),
            prompt_tokens=int(usage.get("input_tokens", 0)),
            completion_tokens=int(usage.get("output_tokens", 0)),
            # langchain-openai maps usage.prompt_tokens_details.cached_tokens to input_token_details.cache_read
            cached_prompt_tokens=int((usage.get("input_token_details") or {}).get("cache_read") or 0),
            top_logprobs=top,
        )

    async def get_json(self, url: str) -> Any:
        try:
            r = await self.http.get(url, headers={"Authorization": f"Bearer {self.config.api_key}"}, timeout=2.0)
            return r.json() if r.status_code == 200 else None
        except Exception:  # noqa: BLE001 - a probe never fails the caller
            return None

    async def aclose(self) -> None:
        await self.http.aclose()

    def abandon(self) -> None:
        return None  # httpx holds nothing that needs its loop to be released


def make_transport(config: EndpointConfig) -> ChatTransport:
    if config.transport == "langchain":
        return LangChainTransport(config)
    return LeanTransport(config)
