"""Schema-driven fuzzing of the proxy (Schemathesis, in the test process): no 5xx, schema-conformant answers.

Schemathesis reads the app's own OpenAPI schema and generates requests for every
operation: valid bodies (positive mode) and bodies that break the schema (negative
mode). Each response is checked for: no 5xx, a documented status code, a documented
content type and headers, a body matching the response schema, schema-invalid input
rejected with a 4xx, and routes that need a key refusing a request without one.
(``positive_data_acceptance`` is left out on purpose: the schema cannot express every
rule the server enforces — identical answers, look-alike user ids, a token that does
not exist — so valid-looking requests are legitimately refused.)

Beyond the checks, every rejected request must leave the store exactly as it was,
and every operation must have been answered 2xx at least once (the fuzzer reached the
handler's logic, not just the validation). The per-operation case counts are printed.

The app runs with the real stack: embedded Chroma with MiniLM embeddings, the simulator
(a real HTTP server) as upstream and judge. Requests go to the app in-process over ASGI; its
lifespan runs once, on the loop of a ``ProxyServer`` (the pinned Schemathesis would otherwise
start and stop the lifespan around every request). Examples per operation: ``FUZZ_EXAMPLES``
(default 40 per generation mode), sized for the CI budget.
"""

from __future__ import annotations

import asyncio
import os
import re
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.config._checks import NegativeDataRejectionConfig
from schemathesis.specs.openapi.checks import positive_data_acceptance

from store.chroma import ChromaStore
from store.embeddings import LazyMiniLMEmbeddings
from store.memory import PreferenceMemory
from synth_agent.config import Settings
from synth_agent.llm.client import EndpointConfig, LLMClient
from synth_agent.models import PersonaProfile
from synth_agent.proxy import ProxyServer, ProxySettings, create_app
from synth_agent.sim.server import SimEndpoint

KEY = "sk-fuzz-1"
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))
SEEDED_USER = "ana@example.com"  # the user of the schema's examples
EXAMPLE_MESSAGES = [{"role": "user", "content": "How do I start learning Python?"}]

STATS: dict[str, Counter[str]] = defaultdict(Counter)
REJECTED_CHANGED: list[str] = []
CODES: dict[str, Counter[str]] = defaultdict(Counter)


@pytest.fixture(scope="module")
def fuzz_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    home: Path = tmp_path_factory.mktemp("fuzz-home")
    with SimEndpoint() as sim:
        embeddings = LazyMiniLMEmbeddings()
        embeddings.embed_query("load the model before the clock of any request starts")
        store = ChromaStore(path=home / "chroma", embedding_function=embeddings)
        # the user of the schema's examples has a persona, so the persona routes answer 200 too
        asyncio.run(PreferenceMemory(store, "acme").save_persona(
            PersonaProfile(user_id=SEEDED_USER, persona="The user prefers short bullet lists.")))
        app = create_app(
            Settings(base_url=sim.base_url, home=home), _proxy_settings(),
            store=store,
            llm=(llm := LLMClient(EndpointConfig(base_url=sim.base_url, max_retries=1))),
        )
        with ProxyServer(app, close=[llm]) as srv:  # an injected client is the caller's to close
            TARGET.srv = srv  # every case, and every probe a check sends, reaches this app in-process
            yield {"app": app, "store": store, "sim": sim, "url": srv.url}
            TARGET.srv = None


def _proxy_settings(**kw: Any) -> ProxySettings:
    return ProxySettings(api_keys=f"acme:{KEY}", synthesis="off", default_model="sim", key_rate_limit=0,
                         auth_failure_rate=0, upstream_retries=1, upstream_backoff=0.01, **kw)


class InProcess:
    """The ASGI app Schemathesis calls: forwards each request to the real app on the loop where its lifespan
    ran once (the fixture's server), and acknowledges the test client's own per-request lifespan."""

    def __init__(self) -> None:
        self.srv: ProxyServer | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        assert self.srv is not None, "the fuzz_world fixture serves the app"
        here = asyncio.get_running_loop()

        def back(coro: Any) -> Any:
            return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, here))

        async def recv() -> Any:
            return await back(receive())

        async def snd(message: Any) -> None:
            await back(send(message))

        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self.srv.app(scope, recv, snd), self.srv.loop))


TARGET = InProcess()
# The schema comes from an app built the same way (nothing is started until its lifespan runs).
schema = schemathesis.openapi.from_dict(create_app(Settings(), _proxy_settings()).openapi())
schema.app = TARGET
# schema-invalid input is rejected with one of these (413: a body over the size limit)
schema.config.checks.negative_data_rejection = NegativeDataRejectionConfig(
    expected_statuses=[400, 401, 403, 404, 405, 409, 413, 415, 429])


def _open_pair(base_url: str, user: str) -> str | None:
    """A real A/B token of ``user`` (through the app itself), or None if /v1/ab refuses."""
    r = httpx.post(f"{base_url}/v1/ab", json={"user": user, "messages": EXAMPLE_MESSAGES},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    return r.json().get("token") if r.status_code == 200 else None


_SENDABLE = re.compile(r"^(?:[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?)?$")


def _steer(case: Any, base_url: str) -> None:
    """Header values no HTTP client can send (control characters, non-ASCII) are percent-encoded, as the
    API asks of clients. Then most cases name the caller's own tenant and a consistent pinned user, so
    they get past the checks that random header values would always fail (403) and reach the handlers;
    half of the A/B votes get a real token of their user. One case in eight keeps what the fuzzer drew."""
    headers = case.headers or {}
    for name, value in list(headers.items()):  # what no HTTP client can send is sent percent-encoded
        if isinstance(value, str) and not _SENDABLE.match(value):
            headers[name] = quote(value, safe="")
    draw = zlib.crc32(case.id.encode())
    if draw % 8 == 0:
        return
    if "X-Synth-Tenant" in headers:
        headers["X-Synth-Tenant"] = "acme"
    body = case.body if isinstance(case.body, dict) else None
    named = body.get("user", body.get("user_id")) if body else None
    if "X-Synth-User" in headers and isinstance(named, str):
        headers["X-Synth-User"] = quote(named, safe="")
    if case.operation.path == "/v1/ab/{token}/vote" and draw % 2 == 0:
        user = named if isinstance(named, str) else unquote(headers.get("X-Synth-User", ""))
        token = _open_pair(base_url, user) if user else None
        if token is not None:
            case.path_parameters["token"] = token


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
def test_no_5xx_and_schema_conformant_responses(case: Any, fuzz_world: dict[str, Any]) -> None:
    store: ChromaStore = fuzz_world["store"]
    _steer(case, fuzz_world["url"])
    before = store.count()
    response = case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                                      excluded_checks=[positive_data_acceptance])
    label = f"{case.operation.method.upper()} {case.operation.path}"
    STATS[label]["cases"] += 1
    STATS[label][f"{response.status_code // 100}xx"] += 1
    if response.status_code >= 400:
        try:
            code = response.json()["error"]["code"]
        except Exception:
            code = "?"
        CODES[label][f"{response.status_code}:{code}"] += 1
        if os.environ.get("FUZZ_DEBUG") and CODES[label][f"{response.status_code}:{code}"] <= 2:
            print("DEBUG", label, response.status_code, response.text[:300])
    if response.status_code >= 400 and store.count() != before:
        REJECTED_CHANGED.append(f"{label} -> {response.status_code}")
    assert store.count() == before or response.status_code < 400, "a rejected request changed the store"


def test_fuzzing_reached_every_operation(capsys: pytest.CaptureFixture[str]) -> None:
    """Runs after the fuzz test (file order): every operation was exercised, and answered 2xx at least once."""
    if not STATS:
        pytest.skip("the fuzz test did not run (deselected)")
    with capsys.disabled():
        print("\nSchemathesis cases per operation (status classes):")
        for label, c in sorted(STATS.items()):
            print(f"  {label:45s} {c['cases']:5d} cases   " + "  ".join(f"{k}={c[k]}" for k in ("2xx", "4xx", "5xx")))
            print("      ", CODES[label].most_common(6))
        print(f"  total {sum(c['cases'] for c in STATS.values())} cases")
    assert not REJECTED_CHANGED, REJECTED_CHANGED
    operations = {f"{m.upper()} {p}" for p, ops in schema.raw_schema["paths"].items() for m in ops}
    assert set(STATS) == operations
    never_ok = sorted(label for label, c in STATS.items() if c["2xx"] == 0)
    assert not never_ok, f"the fuzzer never got past validation on: {never_ok}"
    assert all(c["5xx"] == 0 for c in STATS.values())
