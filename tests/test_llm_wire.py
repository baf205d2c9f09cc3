"""The lean transport's HTTP/1.1 wire (synth_agent/llm/wire.py) against scripted raw servers.

What the simulator never does is scripted here: chunked and close-delimited answers, gzip bodies,
a keep-alive connection the server closes while it is idle, an answer that comes after its request
timed out, a malformed answer.
"""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import Awaitable, Callable

import orjson
import pytest

from synth_agent.llm.client import EndpointConfig, LLMClient
from synth_agent.llm.errors import LLMTimeoutError, UnavailableError
from synth_agent.llm.transport import LeanTransport
from synth_agent.llm.wire import WireClient, WireError, plain_http

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    line, *lines = head.split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines if x)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return line, headers, body


def completion(text: str) -> bytes:
    return orjson.dumps({"choices": [{"message": {"content": text}}], "usage": {"prompt_tokens": 3, "completion_tokens": 1}})


class Server:
    """A raw TCP server; ``handler(reader, writer, n)`` serves connection number ``n`` (from 0)."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[tuple[str, dict[str, str], bytes]] = []

    async def __aenter__(self) -> str:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            n, self.connections = self.connections, self.connections + 1
            try:
                await self.handler(reader, writer, n)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1"

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()


def keep_alive(answer: Callable[[bytes], bytes], log: list) -> Handler:
    """Answers every request on the connection with ``answer(body)`` (Content-Length framing)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            req = await read_request(reader)
            log.append(req)
            out = answer(req[2])
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(out) + out)
            await writer.drain()

    return handler


def test_plain_http_is_what_the_wire_serves() -> None:
    assert plain_http("http://localhost:8000/v1/chat/completions")
    assert plain_http("http://[::1]:8000/v1")
    assert not plain_http("https://api.openai.com/v1")
    assert not plain_http("http://user:pw@host/v1")
    assert not plain_http("http://host/v1?key=1")
    assert not plain_http("http://host:99999/v1")


async def test_sequential_requests_share_one_connection_and_send_the_headers() -> None:
    log: list = []
    srv = Server(keep_alive(lambda body: completion(orjson.loads(body)["messages"][0]["content"]), log))
    async with srv as url:
        t = LeanTransport(EndpointConfig(base_url=url, api_key="sk-9", probe_server=False))
        assert t._wire is not None
        for i in range(5):
            c = await t.chat({"messages": [{"role": "user", "content": f"q{i}"}]}, want_logprobs=False)
            assert c.text == f"q{i}" and c.prompt_tokens == 3
        await t.aclose()
    assert srv.connections == 1
    line, headers, _ = log[0]
    assert line == "POST /v1/chat/completions HTTP/1.1"
    assert headers["authorization"] == "Bearer sk-9" and headers["content-type"] == "application/json"
    assert headers["host"] == url.removeprefix("http://").removesuffix("/v1")


async def test_chunked_close_delimited_and_gzip_answers_are_read_whole() -> None:
    body = completion("x" * 5000)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        if n == 0:  # chunked, in three chunks
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for part in (body[:10], body[10:3000], body[3000:]):
                writer.write(b"%x\r\n" % len(part) + part + b"\r\n")
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            await read_request(reader)  # the connection was kept: gzip next on it
            z = gzip.compress(body)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(z) + z)
            await writer.drain()
            await reader.read()
        else:  # framed by the close
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + body)
            await writer.drain()

    srv = Server(handler)
    async with srv as url:
        wire = WireClient(url, {}, timeout=5)
        for _ in range(2):
            status, _, got = await wire.request("POST", "/v1/chat/completions", b"{}")
            assert status == 200 and got == body
        assert srv.connections == 1
        wire.close()
        wire = WireClient(url, {}, timeout=5)
        await asyncio.sleep(0.05)
        status, _, got = await wire.request("POST", "/v1/chat/completions", b"{}")
        assert status == 200 and got == body
        wire.close()


async def test_an_idle_connection_the_server_closed_is_replaced_without_an_error() -> None:
    log: list = []
    answer = keep_alive(lambda body: completion("ok"), log)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        if n == 0:  # answer once, then close the idle connection as a keep-alive timeout would
            req = await read_request(reader)
            log.append(req)
            out = completion("first")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(out) + out)
            await writer.drain()
            return
        await answer(reader, writer, n)

    srv = Server(handler)
    async with srv as url:
        async with LLMClient(EndpointConfig(base_url=url, probe_server=False, max_retries=0), cache=False) as llm:
            first = await llm.complete([{"role": "user", "content": "a"}])
            await asyncio.sleep(0.05)
            second = await llm.complete([{"role": "user", "content": "b"}])
            assert (first.text, second.text) == ("first", "ok")
            assert llm.stats.total().errors == 0 and llm.stats.total().retries == 0
    assert srv.connections == 2 and len(log) == 2


async def test_a_request_that_times_out_does_not_get_the_late_answer_of_another() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            _, _, body = await read_request(reader)
            text = orjson.loads(body)["messages"][0]["content"]
            if text == "slow":
                await asyncio.sleep(0.3)
            out = completion(text)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(out) + out)
            await writer.drain()

    srv = Server(handler)
    async with srv as url:
        t = LeanTransport(EndpointConfig(base_url=url, timeout=0.1, probe_server=False))
        with pytest.raises(LLMTimeoutError):
            await t.chat({"messages": [{"role": "user", "content": "slow"}]}, want_logprobs=False)
        c = await t.chat({"messages": [{"role": "user", "content": "fast"}]}, want_logprobs=False)
        assert c.text == "fast"
        await asyncio.sleep(0.3)  # the slow answer arrives on the closed connection, nowhere else
        c = await t.chat({"messages": [{"role": "user", "content": "again"}]}, want_logprobs=False)
        assert c.text == "again"
        await t.aclose()
    assert srv.connections == 2


async def test_a_cancelled_request_closes_its_connection() -> None:
    log: list = []
    srv = Server(keep_alive(lambda body: completion("ok"), log))
    gate = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        if n == 0:
            await read_request(reader)
            await gate.wait()
            return
        await keep_alive(lambda body: completion("ok"), log)(reader, writer, n)

    srv.handler = slow
    async with srv as url:
        wire = WireClient(url, {}, timeout=5)
        task = asyncio.ensure_future(wire.request("POST", "/v1/chat/completions", b"{}"))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not wire._idle and not wire._open
        status, _, _ = await wire.request("POST", "/v1/chat/completions", b"{}")
        assert status == 200 and srv.connections == 2
        gate.set()
        wire.close()


async def test_refused_reset_and_malformed_answers_are_unavailable_errors() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"SMTP ready\r\n\r\n")
        await writer.drain()

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)

    for handler in (garbage, hang_up):
        async with Server(handler) as url:
            t = LeanTransport(EndpointConfig(base_url=url, probe_server=False))
            with pytest.raises(UnavailableError):
                await t.chat({"messages": []}, want_logprobs=False)
            await t.aclose()
    with pytest.raises(WireError):
        async with Server(hang_up) as url:
            await WireClient(url, {}, timeout=5).request("GET", "/props")
    t = LeanTransport(EndpointConfig(base_url=url, probe_server=False))  # the server is gone: refused
    with pytest.raises(UnavailableError):
        await t.chat({"messages": []}, want_logprobs=False)
    await t.aclose()


async def test_error_answers_keep_their_status_and_retry_after() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        out = orjson.dumps({"error": {"message": "slow down", "code": "rate_limited"}})
        writer.write(b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 3\r\nContent-Length: %d\r\n\r\n" % len(out) + out)
        await writer.drain()
        await reader.read()

    async with Server(handler) as url:
        t = LeanTransport(EndpointConfig(base_url=url, probe_server=False))
        with pytest.raises(Exception) as info:
            await t.chat({"messages": []}, want_logprobs=False)
        await t.aclose()
    err = info.value
    assert getattr(err, "status", None) == 429 and getattr(err, "retry_after", None) == 3.0
    assert "slow down" in str(err)


def test_https_and_the_aiohttp_setting_keep_aiohttp() -> None:
    async def make(**kw: object) -> tuple[bool, bool]:
        t = LeanTransport(EndpointConfig(**kw))  # type: ignore[arg-type]
        out = t._wire is not None, t._session is not None
        await t.aclose()
        return out

    assert asyncio.run(make(base_url="https://api.example.com/v1")) == (False, True)
    assert asyncio.run(make(base_url="http://localhost:1/v1", transport="aiohttp")) == (False, True)
    assert asyncio.run(make(base_url="http://localhost:1/v1")) == (True, False)


async def test_a_second_answer_to_one_request_is_never_read_as_the_next_ones() -> None:
    log: list = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        if n == 0:  # two answers to the first request, in one write
            await read_request(reader)
            a, b = completion("first"), completion("stray")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(a) + a
                         + b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(b) + b)  # fmt: skip
            await writer.drain()
            await reader.read()
            return
        await keep_alive(lambda body: completion(orjson.loads(body)["messages"][0]["content"]), log)(reader, writer, n)

    srv = Server(handler)
    async with srv as url:
        t = LeanTransport(EndpointConfig(base_url=url, probe_server=False))
        texts = [(await t.chat({"messages": [{"role": "user", "content": q}]}, want_logprobs=False)).text
                 for q in ("q1", "q2", "q3")]  # fmt: skip
        await t.aclose()
    assert texts == ["first", "q2", "q3"] and srv.connections == 2


async def test_a_ramp_up_of_new_connections_resolves_the_host_once() -> None:
    log: list = []
    srv = Server(keep_alive(lambda body: completion("ok"), log))
    loop = asyncio.get_running_loop()
    calls: list[str] = []
    real = loop.getaddrinfo

    async def counting(host, *args, **kw):  # type: ignore[no-untyped-def]
        calls.append(host)
        return await real(host, *args, **kw)

    loop.getaddrinfo = counting  # type: ignore[method-assign]
    try:
        async with srv as url:
            wire = WireClient(url.replace("127.0.0.1", "localhost"), {}, timeout=5)
            got = await asyncio.gather(*(wire.request("POST", "/v1/chat/completions", b"{}") for _ in range(16)))
            wire.close()
    finally:
        del loop.getaddrinfo
    assert [g[0] for g in got] == [200] * 16 and srv.connections == 16
    assert calls == ["localhost"]


# ---------------------------------------------------------------- streamed bodies (the proxy's SSE relay)


def sse(text: str) -> bytes:
    return b"data: " + orjson.dumps({"choices": [{"delta": {"content": text}}]}) + b"\n\n"


async def test_a_stream_is_read_as_it_arrives_and_its_connection_is_reused() -> None:
    go_on = asyncio.Event()
    log: list = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        log.append(await read_request(reader))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        first = sse("Hello")
        writer.write(b"%x\r\n" % len(first) + first + b"\r\n")
        await writer.drain()
        await go_on.wait()  # the client must have the first event before the server sends more
        for part in (sse(" there"), b"data: [DONE]\n\n"):
            writer.write(b"%x\r\n" % len(part) + part + b"\r\n")
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        await keep_alive(lambda body: completion("after"), log)(reader, writer, n)

    srv = Server(handler)
    async with srv as url:
        wire = WireClient(url, {"Authorization": "Bearer k"}, timeout=5, body_headers={"Content-Type": "application/json"})
        answer = await wire.stream("POST", "/v1/chat/completions", b'{"stream": true}')
        assert answer.status == 200 and answer.headers["content-type"] == "text/event-stream"
        got = []
        async for chunk in answer.chunks():
            got.append(chunk)
            go_on.set()
        assert got[0] == sse("Hello") and b"".join(got) == sse("Hello") + sse(" there") + b"data: [DONE]\n\n"
        assert len(wire._idle) == 1  # read to its end: back in the pool
        status, _, body = await wire.request("POST", "/v1/chat/completions", b"{}")
        assert status == 200 and body == completion("after")
        status, _, _ = await wire.request("GET", "/v1/models")
        wire.close()
    assert srv.connections == 1
    line, headers, _ = log[0]
    assert line == "POST /v1/chat/completions HTTP/1.1" and headers["content-type"] == "application/json"
    assert headers["authorization"] == "Bearer k" and headers["content-length"] == "16"
    line, headers, _ = log[2]  # a GET carries neither a body nor the body's headers
    assert line == "GET /v1/models HTTP/1.1" and "content-type" not in headers and "content-length" not in headers


async def test_a_close_delimited_and_a_gzip_stream_are_read_whole() -> None:
    events = b"".join(sse(w) for w in ("a", "b", "c")) + b"data: [DONE]\n\n"

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        if n == 0:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n" + events)
            await writer.drain()
            return  # the close ends the answer
        z = gzip.compress(events)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(z))
        for i in range(0, len(z), 7):  # a few bytes at a time
            writer.write(z[i:i + 7])
            await writer.drain()
        await reader.read()

    async with Server(handler) as url:
        wire = WireClient(url, {}, timeout=5)
        for _ in range(2):
            answer = await wire.stream("POST", "/v1/chat/completions", b"{}")
            assert answer.status == 200 and await answer.read() == events
        assert len(wire._idle) == 1  # the gzip answer's connection (framed, kept); the first closed
        wire.close()


async def test_a_stream_that_breaks_off_or_stalls_fails_and_closes_its_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        part = sse("Hello")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % len(part) + part + b"\r\n")
        await writer.drain()
        if n == 0:
            return  # closed mid-answer: no last chunk
        await asyncio.sleep(1)  # stalls past the client's timeout

    async with Server(handler) as url:
        wire = WireClient(url, {}, timeout=0.2)
        for error in (WireError, TimeoutError):
            answer = await wire.stream("POST", "/v1/chat/completions", b"{}")
            got = []
            with pytest.raises(error):
                async for chunk in answer.chunks():
                    got.append(chunk)
            assert got == [sse("Hello")]
            assert not wire._idle and not wire._open
        wire.close()


async def test_a_stream_closed_before_its_end_drops_its_connection() -> None:
    log: list = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        if n == 0:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
            await writer.drain()
            await reader.read()
            return
        await keep_alive(lambda body: completion("ok"), log)(reader, writer, n)

    srv = Server(handler)
    async with srv as url:
        wire = WireClient(url, {}, timeout=5)
        answer = await wire.stream("POST", "/v1/chat/completions", b"{}")
        answer.close()  # the client went away: the rest of the answer must not meet the next request
        answer.close()
        assert not wire._idle and not wire._open
        status, _, body = await wire.request("POST", "/v1/chat/completions", b"{}")
        assert status == 200 and body == completion("ok") and srv.connections == 2
        wire.close()


async def test_a_slow_reader_pauses_the_connection_and_still_gets_every_byte() -> None:
    from synth_agent.llm import wire as wire_module

    size = 4 * wire_module.STREAM_BUFFER

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        for i in range(size // 4096):
            writer.write(bytes([i % 251]) * 4096)
        await writer.drain()
        await reader.read()

    async with Server(handler) as url:
        wire = WireClient(url, {}, timeout=5)
        answer = await wire.stream("GET", "/big")
        await asyncio.sleep(0.2)  # everything sent; the client stopped reading past STREAM_BUFFER (plus one read)
        conn = answer._conn
        assert conn is not None and conn._paused and wire_module.STREAM_BUFFER < conn._buffered < size
        body = await answer.read()
        assert len(body) == size and body == b"".join(bytes([i % 251]) * 4096 for i in range(size // 4096))
        wire.close()


async def test_a_limit_bounds_the_connections_and_a_waiting_request_times_out() -> None:
    release = asyncio.Event()
    log: list = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await release.wait()
        await keep_alive(lambda body: completion("ok"), log)(reader, writer, n)

    srv = Server(handler)
    async with srv as url:
        wire = WireClient(url, {}, timeout=5, limit=2)
        tasks = [asyncio.ensure_future(wire.request("POST", "/v1/chat/completions", b"{}")) for _ in range(6)]
        await asyncio.sleep(0.1)
        assert len(wire._open) == 2
        release.set()
        assert [t[0] for t in await asyncio.gather(*tasks)] == [200] * 6
        assert srv.connections == 2
        stream = await wire.stream("POST", "/v1/chat/completions", b"{}")
        other = await wire.stream("POST", "/v1/chat/completions", b"{}")  # both slots are taken until closed
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await wire.request("POST", "/v1/chat/completions", b"{}")
        stream.close()
        await other.read()
        status, _, _ = await wire.request("POST", "/v1/chat/completions", b"{}")
        assert status == 200
        wire.close()
