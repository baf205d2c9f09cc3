"""Forward Chat Completions to the upstream endpoint, faithfully, with bounded retries.

The body is forwarded as the client's JSON (plus the persona message and the
mapped model name), not re-modelled through LangChain, so any field the upstream
understands (tools, logprobs, response_format, vendor extras) survives. Transient
failures (429, 408, 5xx, timeouts, dropped connections) are retried with jittered
exponential backoff that honours ``Retry-After``; when retries run out the caller
gets a :class:`~synth_agent.proxy.errors.ProxyError` 502 (504 if the last failure
was a timeout). A stream is retried only before its first byte reaches the client.

The HTTP client (opened on the server's event loop, ``orjson`` for the body) is, for a plain
``http://`` upstream, the project's own HTTP/1.1 client (:class:`~synth_agent.llm.wire.WireClient`,
the LLM client's lean wire: keep-alive pool, ``httptools`` parser, bodies streamed for SSE) and
otherwise one ``aiohttp`` session: for ``https://``, with ``upstream_transport="aiohttp"``, and when
aiohttp trace configs are given (they hook aiohttp's request machinery). At 64 concurrent connections
httpx's connection pool (which scans every pooled connection on each request) once cost about half of
the proxy's CPU, and aiohttp's request machinery ~0.2 ms per proxied chat; ``bench/proxy_overhead.py``
measures the whole path.

Both clients bound a request the same way where it matters: connecting and each wait for the answer's
bytes (a long stream is fine while it flows) within ``timeout``; the wire client bounds the wait for a
non-streamed answer as a whole (its headers and body come together once the model is done), and a
stream's wait for its headers. Both keep at most 512 upstream connections.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
from multidict import CIMultiDict

from synth_agent.llm.wire import WireClient, WireStream, plain_http
from synth_agent.proxy.errors import ProxyError, error_body

__all__ = ["Upstream", "UpstreamConfig", "UpstreamResponse", "upstream_message"]

_RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
MAX_CONNECTIONS = 512
"""Upstream connections open at once, at most (either client); more requests wait for one."""


@dataclass(frozen=True)
class UpstreamConfig:
    base_url: str
    api_key: str
    timeout: float = 60.0
    retries: int = 3
    backoff: float = 0.05
    backoff_max: float = 2.0
    transport: str = "lean"  # "lean": the wire client for http:// upstreams, aiohttp for the rest; "aiohttp"


class UpstreamResponse:
    """The upstream's answer: status, headers (case-insensitive names) and, once read (always, unless
    streaming), the body. A streamed one is read with :meth:`chunks` or :meth:`aread`, and closed with
    :meth:`aclose`."""

    def __init__(
        self, status_code: int, headers: Mapping[str, str], content: bytes = b"",
        body: aiohttp.ClientResponse | WireStream | None = None,
    ) -> None:  # fmt: skip
        self.status_code = status_code
        self.headers = headers
        self.content = content
        self._body = body  # an unread body (streaming)

    async def aread(self) -> bytes:
        body = self._body
        if body is not None:
            try:
                self.content = await body.read()
            finally:
                await self.aclose()
        return self.content

    def chunks(self) -> AsyncIterator[bytes]:
        """The unread body's bytes as they arrive (TimeoutError, aiohttp.ClientError or OSError if it breaks)."""
        body = self._body
        if body is None:
            raise RuntimeError("the body was read or closed")
        return body.chunks() if isinstance(body, WireStream) else body.content.iter_any()

    async def aclose(self) -> None:
        body, self._body = self._body, None
        if isinstance(body, WireStream):
            body.close()
        elif body is not None:
            body.release()

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return orjson.loads(self.content)


def _retry_after(resp: UpstreamResponse) -> float | None:
    try:
        if (ms := resp.headers.get("retry-after-ms")) is not None:
            return max(0.0, float(ms) / 1000)
        raw = resp.headers.get("retry-after")
        if raw is None:
            return None
        try:
            return max(0.0, float(raw))
        except ValueError:
            return max(0.0, email.utils.parsedate_to_datetime(raw).timestamp() - time.time())
    except (TypeError, ValueError, OverflowError):
        return None


def upstream_message(resp: UpstreamResponse) -> str:
    """The upstream's error message (OpenAI, vLLM or FastAPI style), shortened to one line."""
    try:
        body = resp.json()
        if isinstance(body, dict) and isinstance(body.get("detail"), list | str):  # FastAPI-style 422
            return " ".join(str(body["detail"]).split())[:300]
    except ValueError:
        pass
    try:
        err = resp.json().get("error", {})
        msg = err.get("message") if isinstance(err, dict) else err
        return str(msg or resp.text)[:300]
    except (ValueError, AttributeError):
        return resp.text[:300]


def _dumps(body: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(body)
    except TypeError:  # integers beyond 64 bits (valid JSON, passed through as sent)
        return json.dumps(body, ensure_ascii=False).encode()


class Upstream:
    """One upstream endpoint. ``on_retry(reason)`` / ``on_error(reason)`` feed the metrics.

    The HTTP session is opened on first use, on the event loop that serves the app.
    """

    def __init__(
        self,
        config: UpstreamConfig,
        *,
        on_retry: Callable[[str], None] | None = None,
        on_error: Callable[[str], None] | None = None,
        trace_configs: Sequence[aiohttp.TraceConfig] = (),
    ) -> None:
        self.config = config
        self._trace_configs = list(trace_configs)  # aiohttp request tracing (observability, tests)
        self.base_url = config.base_url.rstrip("/")
        if config.transport not in ("lean", "aiohttp"):
            raise ValueError(f"upstream transport must be 'lean' or 'aiohttp', not {config.transport!r}")
        self._on_retry = on_retry or (lambda _: None)
        self._on_error = on_error or (lambda _: None)
        self._rng = random.Random()
        # the timeout bounds connecting and each wait for bytes (a long stream is fine while it flows)
        self._timeout = aiohttp.ClientTimeout(total=None, connect=min(10.0, config.timeout),
                                              sock_read=config.timeout)
        self._headers = {"Authorization": f"Bearer {config.api_key}", "Accept": "application/json"}
        self._json_headers = {**self._headers, "Content-Type": "application/json"}
        self._session: aiohttp.ClientSession | None = None
        self._wire: WireClient | None = None
        self._path = ""  # the base URL's path, for the wire client's request lines
        if config.transport == "lean" and not self._trace_configs and plain_http(self.base_url):
            self._wire = WireClient(
                self.base_url, self._headers, timeout=config.timeout,
                body_headers={"Content-Type": "application/json"}, limit=MAX_CONNECTIONS,
            )  # fmt: skip
            self._path = urlsplit(self.base_url).path.rstrip("/")

    @property
    def transport(self) -> str:
        """Which client carries the requests: ``"wire"`` or ``"aiohttp"``."""
        return "wire" if self._wire is not None else "aiohttp"

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS, ttl_dns_cache=300), timeout=self._timeout,
                raise_for_status=False, trace_configs=self._trace_configs or None,
            )
        return self._session

    async def aclose(self) -> None:
        if self._wire is not None:
            self._wire.close()
        if self._session is not None:
            await self._session.close()

    def _delay(self, attempt: int, resp: UpstreamResponse | None) -> float:
        server = _retry_after(resp) if resp is not None else None
        if server is not None:
            return min(server, self.config.backoff_max)
        base = min(self.config.backoff_max, self.config.backoff * 2 ** (attempt - 1))
        return base * (0.5 + 0.5 * self._rng.random())

    async def _send(
        self, method: str, path: str, body: dict[str, Any] | None, *, stream: bool
    ) -> UpstreamResponse:
        """A response that is final: success, or an error not worth retrying. Raises ProxyError when out of retries.

        Unless ``stream``, the body has been read (``.content``) and the connection released.
        """
        attempts = self.config.retries + 1
        data = _dumps(body) if body is not None else None
        last_reason = kind = ""
        for attempt in range(1, attempts + 1):
            resp: UpstreamResponse | None = None
            try:
                resp = await self._attempt(method, path, data, stream=stream)
                if resp.status_code not in _RETRY_STATUS:
                    if not stream:
                        await resp.aread()
                    return resp
                await resp.aread()  # the error's message; releases the connection
                kind, last_reason = str(resp.status_code), f"HTTP {resp.status_code}: {upstream_message(resp)}"
            except TimeoutError:  # aiohttp's connect/read timeouts are TimeoutErrors, so are the wire client's
                kind = last_reason = "timeout"
            except (aiohttp.ClientError, OSError) as exc:  # the wire client's WireError is a ConnectionError
                kind, last_reason = "connection", f"connection ({type(exc).__name__})"
            self._on_error(kind)
            if attempt < attempts:
                self._on_retry(last_reason)
                await asyncio.sleep(self._delay(attempt, resp))
        if kind == "timeout":
            raise ProxyError(
                504,
                f"the upstream model endpoint did not answer within {self.config.timeout:g}s "
                f"({attempts} attempts); try again later",
                code="upstream_timeout",
            )
        raise ProxyError(
            502,
            f"the upstream model endpoint failed {attempts} times; last error: {last_reason}",
            code="upstream_unavailable",
        )

    async def _attempt(self, method: str, path: str, data: bytes | None, *, stream: bool) -> UpstreamResponse:
        """One request; unless ``stream`` over the wire client, the body is not read yet."""
        wire = self._wire
        if wire is None:
            headers = self._json_headers if data is not None else self._headers
            raw = await self.session.request(method, self.base_url + path, data=data, headers=headers)
            return UpstreamResponse(raw.status, raw.headers, body=raw)
        if stream:
            answer = await wire.stream(method, self._path + path, data)
            return UpstreamResponse(answer.status, CIMultiDict(answer.headers), body=answer)
        status, headers, content = await wire.request(method, self._path + path, data)
        return UpstreamResponse(status, CIMultiDict(headers), content)

    async def request_json(self, method: str, path: str, body: dict[str, Any] | None = None) -> UpstreamResponse:
        """Non-streaming call; returns the upstream's final response (2xx, or a non-retryable 4xx), body read."""
        return await self._send(method, path, body, stream=False)

    async def open_stream(self, path: str, body: dict[str, Any]) -> UpstreamResponse:
        """Start a streaming call; the caller must ``aclose()`` the returned response (``relay`` does)."""
        return await self._send("POST", path, body, stream=True)

    async def relay(self, resp: UpstreamResponse) -> AsyncIterator[bytes]:
        """Pass the upstream's SSE bytes through; a mid-stream failure ends with an OpenAI error event."""
        try:
            async for chunk in resp.chunks():
                yield chunk
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            kind = "timeout" if isinstance(exc, TimeoutError) else "stream_broken"
            self._on_error(kind)
            err = error_body(
                f"the upstream stream broke off ({type(exc).__name__}); the answer is incomplete",
                type="upstream_error", code=f"upstream_{kind}",
            )
            yield f"data: {json.dumps(err)}\n\n".encode()
        finally:
            await resp.aclose()

    async def chat_text(self, body: dict[str, Any]) -> str:
        """A non-streaming completion's text, for A/B and rerank candidates."""
        resp = await self.request_json("POST", "/chat/completions", {**body, "stream": False})
        if resp.status_code in (401, 403):
            raise ProxyError(502, "the upstream refused the proxy's credentials; check SYNTH_AGENT_UPSTREAM_API_KEY",
                             code="upstream_auth")
        if resp.status_code >= 400:
            raise ProxyError(
                resp.status_code if resp.status_code in (400, 404, 413) else 400 if resp.status_code < 500 else 502,
                f"the upstream model rejected the request: {upstream_message(resp)}",
                code="upstream_rejected",
            )
        try:
            content = resp.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ProxyError(502, "the upstream answer is not a chat completion", code="upstream_bad_response") from None
        if not isinstance(content, str) or not content.strip():
            raise ProxyError(502, "the upstream returned an empty answer", code="upstream_empty")
        return content
