"""Forward Chat Completions to the upstream endpoint, faithfully, with bounded retries.

The body is forwarded as the client's JSON (plus the persona message and the
mapped model name), not re-modelled through LangChain, so any field the upstream
understands (tools, logprobs, response_format, vendor extras) survives. Transient
failures (429, 408, 5xx, timeouts, dropped connections) are retried with jittered
exponential backoff that honours ``Retry-After``; when retries run out the caller
gets a :class:`~synth_agent.proxy.errors.ProxyError` 502 (504 if the last failure
was a timeout). A stream is retried only before its first byte reaches the client.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx

from synth_agent.proxy.errors import ProxyError, error_body

__all__ = ["Upstream", "UpstreamConfig", "upstream_message"]

_RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class UpstreamConfig:
    base_url: str
    api_key: str
    timeout: float = 60.0
    retries: int = 3
    backoff: float = 0.05
    backoff_max: float = 2.0


def _retry_after(resp: httpx.Response) -> float | None:
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


def upstream_message(resp: httpx.Response) -> str:
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


class Upstream:
    """One upstream endpoint. ``on_retry(reason)`` / ``on_error(reason)`` feed the metrics."""

    def __init__(
        self,
        config: UpstreamConfig,
        *,
        on_retry: Callable[[str], None] | None = None,
        on_error: Callable[[str], None] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.config = config
        self.base_url = config.base_url.rstrip("/")
        self._on_retry = on_retry or (lambda _: None)
        self._on_error = on_error or (lambda _: None)
        self._rng = random.Random()
        limits = httpx.Limits(max_connections=512, max_keepalive_connections=128)
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(config.timeout, connect=min(10.0, config.timeout)),
            limits=limits,
            transport=transport,
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.config.api_key}", "Accept": "application/json"}

    def _delay(self, attempt: int, resp: httpx.Response | None) -> float:
        server = _retry_after(resp) if resp is not None else None
        if server is not None:
            return min(server, self.config.backoff_max)
        base = min(self.config.backoff_max, self.config.backoff * 2 ** (attempt - 1))
        return base * (0.5 + 0.5 * self._rng.random())

    async def _send(self, method: str, path: str, body: dict[str, Any] | None, *, stream: bool) -> httpx.Response:
        """A response that is final: success, or an error not worth retrying. Raises ProxyError when out of retries."""
        attempts = self.config.retries + 1
        last_reason = ""
        timed_out = False
        for attempt in range(1, attempts + 1):
            resp: httpx.Response | None = None
            try:
                req = self.client.build_request(
                    method, self.base_url + path, headers=self._headers(),
                    content=json.dumps(body, ensure_ascii=False).encode() if body is not None else None,
                )
                if body is not None:
                    req.headers["Content-Type"] = "application/json"
                resp = await self.client.send(req, stream=stream)
            except httpx.TimeoutException:
                timed_out, last_reason = True, "timeout"
            except httpx.TransportError as exc:
                timed_out, last_reason = False, f"connection ({type(exc).__name__})"
            else:
                if resp.status_code not in _RETRY_STATUS:
                    return resp
                if stream:
                    await resp.aread()
                    await resp.aclose()
                timed_out, last_reason = False, f"HTTP {resp.status_code}: {upstream_message(resp)}"
            self._on_error("timeout" if timed_out else str(resp.status_code) if resp is not None else "connection")
            if attempt < attempts:
                self._on_retry(last_reason)
                await asyncio.sleep(self._delay(attempt, resp))
        if timed_out:
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

    async def request_json(self, method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        """Non-streaming call; returns the upstream's final response (2xx, or a non-retryable 4xx)."""
        return await self._send(method, path, body, stream=False)

    async def open_stream(self, path: str, body: dict[str, Any]) -> httpx.Response:
        """Start a streaming call; the caller must ``aclose()`` the returned response."""
        return await self._send("POST", path, body, stream=True)

    async def relay(self, resp: httpx.Response) -> AsyncIterator[bytes]:
        """Pass the upstream's SSE bytes through; a mid-stream failure ends with an OpenAI error event."""
        try:
            async for chunk in resp.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:
            kind = "timeout" if isinstance(exc, httpx.TimeoutException) else "stream_broken"
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
