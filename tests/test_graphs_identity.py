"""Who a run acts for: LangGraph auth's signed-in user beats anything the client names; our own key otherwise.

The configurables below have the shapes the LangGraph server (langgraph-api 0.16) really gives a
graph: without auth ``langgraph_auth_user`` is None and the server's ``user_id`` is empty; with
custom auth the signed-in user sits in ``langgraph_auth_user`` while ``user_id`` is whatever the
client sent. ``tests/test_langgraph_server.py`` checks the same through a live server.
"""

from __future__ import annotations

from typing import Any

import pytest
from langgraph.store.memory import InMemoryStore

from graphs._common import TenantMemories
from graphs.chat import personalize
from graphs.identity import (
    MISSING,
    IdentityForbidden,
    IdentityMissing,
    identity,
    resolve_identity,
)
from synth_agent.models import PersonaProfile

NO_AUTH_SERVER = {"langgraph_auth_user": None, "langgraph_auth_user_id": "", "user_id": "", "langgraph_request_id": "r"}


class ProxyUserLike:
    """Attribute and item access, like langgraph-api's ProxyUser around an auth handler's dict."""

    def __init__(self, **fields: Any) -> None:
        self._fields = {"is_authenticated": True, **fields}

    def __getattr__(self, name: str) -> Any:
        try:
            return self._fields[name]
        except KeyError:
            raise AttributeError(name) from None

    def __getitem__(self, name: str) -> Any:
        return self._fields[name]


def conf(**values: Any) -> dict[str, Any]:
    return {"configurable": values}


def test_without_auth_the_server_user_id_is_not_ours_and_the_error_says_what_to_pass() -> None:
    with pytest.raises(IdentityMissing) as err:
        identity(conf(**NO_AUTH_SERVER))
    assert str(err.value) == MISSING and "synth_user_id" in MISSING and "auth" in MISSING
    assert identity(conf(**NO_AUTH_SERVER, synth_user_id="ana@example.com")) == ("default", "ana@example.com")
    assert identity(conf(**NO_AUTH_SERVER, synth_user_id="ana", tenant_id="acme")) == ("acme", "ana")
    # in process, the older key still works
    assert identity(conf(user_id="zoë", tenant_id="acme")) == ("acme", "zoë")
    assert identity(conf(user_id="old", synth_user_id="new")) == ("default", "new")
    with pytest.raises(IdentityMissing, match="synth_user_id"):
        identity(conf(synth_user_id="x" * 10_000))  # invalid ids are named by their key
    assert resolve_identity(conf(), required=False) is None
    # a graph's input can name the user (synthesis: {"user_id": ...}) when the run does not
    who = resolve_identity(conf(**NO_AUTH_SERVER), user_id="bo", tenant_id="t")
    assert who is not None and (who.tenant_id, who.user_id, who.source) == ("t", "bo", "run")


@pytest.mark.parametrize("user", [
    ProxyUserLike(identity="alice@acme.example", tenant_id="acme"),
    {"identity": "alice@acme.example", "tenant_id": "acme", "is_authenticated": True},
])
def test_signed_in_user_wins_and_cannot_be_overridden(user: Any) -> None:
    signed = {"langgraph_auth_user": user, "langgraph_auth_user_id": "alice@acme.example"}
    who = resolve_identity(conf(**signed, user_id="alice@acme.example"))  # the server's fill: same user
    assert who is not None and (who.tenant_id, who.user_id, who.source) == ("acme", "alice@acme.example", "auth")
    for attempt in (
        {"user_id": "bob@acme.example"},          # what the in-memory server lets a client set
        {"synth_user_id": "bob@acme.example"},
        {"tenant_id": "evil"},
    ):
        with pytest.raises(IdentityForbidden, match="signed in"):
            resolve_identity(conf(**signed, **attempt))
    with pytest.raises(IdentityForbidden, match="cannot act as"):
        resolve_identity(conf(**signed), user_id="bob@acme.example")  # e.g. the synthesis input
    assert resolve_identity(conf(**signed), user_id="alice@acme.example") is not None


def test_auth_user_without_tenant_uses_the_default_tenant() -> None:
    assert identity(conf(langgraph_auth_user=ProxyUserLike(identity="carol"))) == ("default", "carol")


def test_server_with_auth_refuses_runs_without_a_signed_in_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LANGGRAPH_AUTH", '{"path": "./auth.py:auth"}')
    with pytest.raises(IdentityForbidden, match="no signed-in user"):
        identity(conf(**NO_AUTH_SERVER, synth_user_id="mallory"))
    anonymous = ProxyUserLike(identity="", is_authenticated=False)
    with pytest.raises(IdentityForbidden):
        identity(conf(langgraph_auth_user=anonymous, synth_user_id="mallory"))
    # in-process use (no server keys) is unaffected by the variable
    assert identity(conf(synth_user_id="ana")) == ("default", "ana")


async def test_graphs_read_the_user_from_the_run_context() -> None:
    """LangGraph 1.x style: ``context=`` instead of ``configurable``."""
    from langchain_core.language_models.fake_chat_models import FakeListChatModel

    store = InMemoryStore()
    await TenantMemories(store)("acme").save_persona(PersonaProfile(user_id="ana", persona="Likes haiku."))
    app = personalize(FakeListChatModel(responses=["ok"]), store=store)
    out = await app.ainvoke({"messages": [("user", "hi")]}, context={"synth_user_id": "ana", "tenant_id": "acme"})
    assert out["persona_version"] == 1 and out["messages"][-1].content == "ok"
    with pytest.raises(IdentityMissing):
        await app.ainvoke({"messages": [("user", "hi")]}, context={"tenant_id": "acme"})
