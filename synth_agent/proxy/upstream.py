"""Forward Chat Completions to the upstream endpoint, faithfully, with bounded retries.

The body is forwarded as the client's JSON (plus the persona message and the
mapped model name), not re-modelled through LangChain, so any field the upstream
understands (tools, logprobs, response_format, vendor extras) survives. Transient
failures (429, 408, 5xx, timeouts, dropped connections) are retried with jittered
exponential backoff that honours ``Retry-After``; when retries run out the caller
gets a :class:`~synth_agent.proxy.errors.ProxyError` 502 (504 if the last failure
was a timeout). A stream is retried only before its first byte reaches the client.

The HTTP client is one ``aiohttp`` session per app (opened on the server's event loop),
with ``orjson`` for the body: at 64 concurrent connections httpx's connection pool
(which scans every pooled connection on each request) cost about half of the proxy's
CPU; ``bench/proxy_overhead.py`` measures the whole path.
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

import aiohttp
import orjson

from synth_agent.proxy.errors import ProxyError, error_body

__all__ = ["Upstream", "UpstreamConfig", "UpstreamResponse", "upstream_message"]

_RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class UpstreamConfig:
    base_url: str
    api_key: str
    timeout: float = 60.0
    retries: int = 3
    backoff: float = 0.05
    backoff_max: float = 2.0


class UpstreamResponse:
    """The upstream's answer: status, headers and, once read (always, unless streaming), the body."""

    def __init__(self, raw: aiohttp.ClientResponse) -> None:
        self.raw = raw
        self.status_code = raw.status
        self.headers: Mapping[str, str] = raw.headers
        self.content = b""

    async def aread(self) -> bytes:
        try:
            self.content = await self.raw.read()
        finally:
            self.raw.release()
        return self.content

    async def aclose(self) -> None:
        self.raw.release()

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
        self._on_retry = on_retry or (lambda _: None)
        self._on_error = on_error or (lambda _: None)
        self._rng = random.Random()
        # the timeout bounds connecting and each wait for bytes (a long stream is fine while it flows)
        self._timeout = aiohttp.ClientTimeout(total=None, connect=min(10.0, config.timeout),
                                              sock_read=config.timeout)
        self._headers = {"Authorization": f"Bearer {config.api_key}", "Accept": "application/json"}
        self._json_headers = {**self._headers, "Content-Type": "application/json"}
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=512, ttl_dns_cache=300), timeout=self._timeout,
                raise_for_status=False, trace_configs=self._trace_configs or None,
            )
        return self._session

    async def aclose(self) -> None:
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
        url = self.base_url + path
        data = _dumps(body) if body is not None else None
        headers = self._json_headers if body is not None else self._headers
        last_reason = kind = ""
        for attempt in range(1, attempts + 1):
            resp: UpstreamResponse | None = None
            try:
                resp = UpstreamResponse(await self.session.request(method, url, data=data, headers=headers))
                if resp.status_code not in _RETRY_STATUS:
                    if not stream:
                        await resp.aread()
                    return resp
                await resp.aread()  # the error's message; releases the connection
                kind, last_reason = str(resp.status_code), f"HTTP {resp.status_code}: {upstream_message(resp)}"
            except TimeoutError:  # aiohttp's connect/read timeouts are TimeoutErrors
                kind = last_reason = "timeout"
            except aiohttp.ClientError as exc:
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

    async def request_json(self, method: str, path: str, body: dict[str, Any] | None = None) -> UpstreamResponse:
        """Non-streaming call; returns the upstream's final response (2xx, or a non-retryable 4xx), body read."""
        return await self._send(method, path, body, stream=False)

    async def open_stream(self, path: str, body: dict[str, Any]) -> UpstreamResponse:
        """Start a streaming call; the caller must ``aclose()`` the returned response (``relay`` does)."""
        return await self._send("POST", path, body, stream=True)

    async def relay(self, resp: UpstreamResponse) -> AsyncIterator[bytes]:
        """Pass the upstream's SSE bytes through; a mid-stream failure ends with an OpenAI error event."""
        try:
            async for chunk in resp.raw.content.iter_any():
                yield chunk
        except (TimeoutError, aiohttp.ClientError) as exc:
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
