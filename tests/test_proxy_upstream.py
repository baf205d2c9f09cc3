"""The proxy's upstream client: bodies forwarded faithfully, streams relayed, broken streams end in an error event.

The upstream here is a small ASGI app that misbehaves on request (the body's ``mode``
field, which the proxy forwards as sent like any unknown field): it echoes what it
received, breaks a stream off, or stalls one past the proxy's upstream timeout.
"""

from __future__ import annotations

import asyncio
import gc
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from langgraph.store.memory import InMemoryStore
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from synth_agent.config import Settings
from synth_agent.llm.client import EndpointConfig, LLMClient
from synth_agent.models import PersonaProfile
from synth_agent.proxy import ProxyServer, ProxySettings, ProxyState, create_app
from synth_agent.serving import (
    ACCEPT_LISTENERS,
    SERVE_GC_GEN1,
    ThreadedServer,
    accept_listeners,
    freeze_heap_after_startup,
)

KEY = "sk-upstream"
H = {"Authorization": f"Bearer {KEY}"}
USER = "ana@example.com"


def _completion(text: str) -> dict[str, Any]:
    return {"id": "c1", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}


def _chunk(text: str) -> bytes:
    delta = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "m",
             "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
    return f"data: {json.dumps(delta)}\n\n".encode()


async def chat(request: Request) -> Any:
    raw = await request.body()
    body = json.loads(raw)
    mode = body.get("mode", "echo")
    if mode == "echo":
        return JSONResponse(_completion(raw.decode()))

    async def events() -> AsyncIterator[bytes]:
        yield _chunk("Hello")
        yield _chunk(" there")
        if mode == "done":
            yield b"data: [DONE]\n\n"
            return
        if mode == "break":
            raise RuntimeError("the upstream dies mid-stream")
        await asyncio.sleep(3)  # "stall": longer than the proxy's upstream timeout
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


async def healthz(request: Request) -> Any:
    return JSONResponse({"ok": True})


@dataclass
class World:
    srv: ProxyServer
    state: ProxyState


@pytest.fixture(scope="module", params=["lean", "aiohttp"])
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """The proxy in front of the misbehaving upstream, over each upstream transport (``lean``: the wire client)."""
    upstream_app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                                     Route("/healthz", healthz)])
    with ThreadedServer(upstream_app, name="fake-upstream") as up:
        llm = LLMClient(EndpointConfig(base_url=up.base_url))
        app = create_app(
            Settings(base_url=up.base_url, home=tmp_path_factory.mktemp("home")),
            ProxySettings(api_keys=f"acme:{KEY}", synthesis="off", key_rate_limit=0, upstream_timeout=0.5,
                          upstream_retries=0, upstream_transport=request.param),
            store=InMemoryStore(), llm=llm,
        )
        with ProxyServer(app, close=[llm]) as srv:
            state: ProxyState = app.state.proxy
            assert state.upstream is not None
            assert state.upstream.transport == ("wire" if request.param == "lean" else "aiohttp")
            srv.call(state.memories("acme").save_persona(  # type: ignore[misc]
                PersonaProfile(user_id=USER, persona="The user prefers short answers.")))
            yield World(srv, state)


def test_the_body_is_forwarded_as_sent_plus_the_persona(world: World) -> None:
    big = 2**70  # valid JSON, beyond 64 bits: passed through exactly
    body = {"model": "m", "user": USER, "messages": [{"role": "user", "content": "Grüß dich 👋"}],
            "vendor_extra": {"big": big, "list": [1, 2.5, None, True]}}
    r = httpx.post(f"{world.srv.base_url}/chat/completions", headers=H, json=body, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["x-synth-persona-version"] == "1"
    sent = json.loads(r.json()["choices"][0]["message"]["content"])
    assert sent["vendor_extra"] == {"big": big, "list": [1, 2.5, None, True]}
    assert sent["messages"][0]["role"] == "system" and "short answers" in sent["messages"][0]["content"]
    assert sent["messages"][1:] == body["messages"]


@pytest.mark.parametrize(("mode", "code"), [("break", "upstream_stream_broken"), ("stall", "upstream_timeout")])
def test_a_stream_that_breaks_off_ends_with_an_error_event(world: World, mode: str, code: str) -> None:
    body = {"model": "m", "user": USER, "stream": True, "mode": mode,
            "messages": [{"role": "user", "content": "hi"}]}
    with httpx.stream("POST", f"{world.srv.base_url}/chat/completions", headers=H, json=body, timeout=10) as r:
        assert r.status_code == 200
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    texts = [json.loads(e)["choices"][0]["delta"]["content"] for e in events[:-1]]
    assert texts == ["Hello", " there"]  # what arrived was relayed as it came
    assert json.loads(events[-1])["error"]["code"] == code
    # the proxy keeps serving, and counts the failure
    assert httpx.get(f"{world.srv.url}/healthz").status_code == 200
    metrics = httpx.get(f"{world.srv.url}/metrics").text
    kind = code.removeprefix("upstream_")
    assert any(line.startswith(f'synth_proxy_upstream_errors_total{{kind="{kind}"}}') for line in metrics.splitlines())


def test_streams_and_answers_reuse_upstream_connections(world: World) -> None:
    upstream = world.state.upstream
    assert upstream is not None
    body = {"model": "m", "user": USER, "messages": [{"role": "user", "content": "hi"}]}
    for stream in (False, True, False, True):
        with httpx.stream("POST", f"{world.srv.base_url}/chat/completions", headers=H, timeout=10,
                          json={**body, "stream": stream, "mode": "echo" if not stream else "done"}) as r:
            assert r.status_code == 200
            text = r.read().decode()
        if stream:
            assert text.endswith("data: [DONE]\n\n") and '"error"' not in text
    if upstream._wire is not None:  # one request at a time: one connection, kept between them
        assert len(upstream._wire._open) == 1 and len(upstream._wire._idle) == 1


@pytest.mark.parametrize("transport", ["lean", "aiohttp"])
def test_shutdown_closes_the_upstream_connections(transport: str, tmp_path: Any) -> None:
    upstream_app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/healthz", healthz)])
    with ThreadedServer(upstream_app, name="fake-upstream") as up:
        llm = LLMClient(EndpointConfig(base_url=up.base_url))
        app = create_app(
            Settings(base_url=up.base_url, home=tmp_path),
            ProxySettings(api_keys=f"acme:{KEY}", synthesis="off", upstream_transport=transport),
            store=InMemoryStore(), llm=llm,
        )
        with ProxyServer(app, close=[llm]) as srv:
            r = httpx.post(f"{srv.base_url}/chat/completions", headers=H, timeout=10,
                           json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200
            upstream = app.state.proxy.upstream
            assert upstream is not None
            wire, session = upstream._wire, upstream._session
            assert (wire is not None and len(wire._open) == 1) if transport == "lean" else session is not None
        if wire is not None:
            assert wire.closed and not wire._open
        else:
            assert session is not None and session.closed


@pytest.mark.parametrize("setting", ["lean", "aiohttp"])
def test_the_upstream_transport_follows_the_url_the_setting_and_traces(setting: str) -> None:
    import aiohttp

    from synth_agent.proxy.upstream import Upstream, UpstreamConfig

    def which(url: str, **kw: Any) -> str:
        return Upstream(UpstreamConfig(base_url=url, api_key="k", transport=setting), **kw).transport

    lean = setting == "lean"
    assert which("http://127.0.0.1:8000/v1") == ("wire" if lean else "aiohttp")
    assert which("https://api.openai.com/v1") == "aiohttp"
    assert which("http://127.0.0.1:8000/v1", trace_configs=[aiohttp.TraceConfig()]) == "aiohttp"
    with pytest.raises(ValueError, match="transport"):
        Upstream(UpstreamConfig(base_url="http://x/v1", api_key="k", transport="h2"))
    assert ProxySettings(upstream_transport=setting).upstream_transport == setting  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ProxySettings(upstream_transport="h2")  # type: ignore[arg-type]


def test_concurrent_persona_misses_share_one_store_read(world: World) -> None:
    state = world.state
    personalizer = state.personalizer
    assert personalizer is not None
    personalizer.invalidate("acme", USER)  # a miss: a warm entry is answered without any read
    reads = 0
    real = personalizer.persona

    async def slow_read(tenant: str, user: str, store: Any = None) -> Any:
        nonlocal reads
        reads += 1
        await asyncio.sleep(0.2)
        return await real(tenant, user)

    async def go() -> list[Any]:
        personalizer.persona = slow_read  # type: ignore[method-assign]
        try:
            first = asyncio.ensure_future(state.persona("acme", USER))
            await asyncio.sleep(0.01)
            first.cancel()  # a caller that goes away does not cancel the read the others wait for
            return await asyncio.gather(*(state.persona("acme", USER) for _ in range(20)))
        finally:
            personalizer.persona = real  # type: ignore[method-assign]

    profiles = world.srv.call(go())
    assert reads == 1
    assert {p.version for p in profiles} == {1}
    assert not state._persona_reads  # nothing left behind once the read is done


def _loop_turns_to_accept(n_listeners: int, clients: int = 12) -> int:
    """Connect ``clients`` at once to a uvloop server on ``accept_listeners(sock, n_listeners)`` whose loop
    does 5 ms of work per turn; the loop turn by which the last connection was accepted."""
    import socket
    import time

    import uvloop

    from synth_agent.local_service import bind

    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    listeners = accept_listeners(sock, n_listeners)

    async def main() -> int:
        loop = asyncio.get_running_loop()
        turn = 0
        made: list[int] = []

        class Record(asyncio.Protocol):
            def connection_made(self, transport: Any) -> None:
                made.append(turn)

        for listener in listeners:
            await loop.create_server(Record, sock=listener, backlog=128)
        conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(clients)]  # the kernel's handshakes

        done = loop.create_future()

        def busy() -> None:  # one callback per loop turn: a loop serving a burst
            nonlocal turn
            turn += 1
            time.sleep(0.005)
            if len(made) < clients and turn < 500:
                loop.call_soon(busy)
            else:
                done.set_result(None)

        loop.call_soon(busy)
        await done
        for c in conns:
            c.close()
        assert len(made) == clients
        return max(made)

    try:
        return uvloop.run(main())
    finally:
        for listener in listeners:
            listener.close()


def test_a_serving_loop_accepts_a_wave_of_connections_in_one_turn_not_one_per_turn() -> None:
    """libuv accepts one connection per loop turn and listening handle: 12 clients connecting at once waited
    12 turns of a busy loop (the first wave of a write burst waited up to 1.5 s). With the listening socket's
    descriptor duplicated (``accept_listeners``) they are all accepted in the first turn."""
    assert _loop_turns_to_accept(1) == 12  # libuv's one accept per turn, which the duplicates work around
    assert _loop_turns_to_accept(16) <= 1


def test_a_serving_loop_accepts_sixty_connections_in_one_turn() -> None:
    """The first wave of a 200-writer burst: with 16 descriptors 60 clients took 4 turns of a busy loop."""
    assert _loop_turns_to_accept(ACCEPT_LISTENERS, clients=60) <= 1


def test_accept_listeners_share_one_socket_and_the_port_stays_exclusive() -> None:
    import socket

    from synth_agent.local_service import bind

    sock = bind("127.0.0.1", 0)
    listeners = accept_listeners(sock, 4)
    try:
        assert len(listeners) == 4 and listeners[0] is sock
        assert len({s.fileno() for s in listeners}) == 4
        assert {s.getsockname() for s in listeners} == {sock.getsockname()}
        sock.listen(16)
        with pytest.raises(OSError):  # no SO_REUSEPORT: a second server on the port still fails to bind
            bind("127.0.0.1", sock.getsockname()[1]).close()
        with socket.create_connection(sock.getsockname()):
            conn, _ = listeners[3].accept()  # any descriptor takes from the one accept queue
            conn.close()
    finally:
        for s in listeners:
            s.close()


def test_freeze_heap_after_startup_passes_the_lifespan_through() -> None:
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])
        if scope["type"] == "lifespan":
            await receive()
            await send({"type": "lifespan.startup.complete"})

    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "lifespan.startup"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    before, thresholds = gc.get_freeze_count(), gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)  # Python's defaults
        asyncio.run(freeze_heap_after_startup(app)({"type": "lifespan"}, receive, send))
        assert sent == [{"type": "lifespan.startup.complete"}] and seen == ["lifespan"]
        assert gc.get_freeze_count() > before  # the heap built during startup is out of the collector's way
        # requests in flight are not walked by a generation-1 pass every 10 generation-0 passes
        assert gc.get_threshold() == (700, SERVE_GC_GEN1, 10) and SERVE_GC_GEN1 > 10
        asyncio.run(freeze_heap_after_startup(app)({"type": "http"}, receive, send))
        assert seen == ["lifespan", "http"]
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
