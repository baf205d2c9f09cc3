"""Who a graph run acts for: the user LangGraph auth signed in, else the run's own ``synth_user_id``.

Three ways a run reaches our graphs, and where the user comes from in each:

* **LangGraph server with custom auth** (``langgraph.json`` ``"auth"``): the server puts the
  signed-in user in ``config["configurable"]["langgraph_auth_user"]``, a reserved key no client
  can set. That identity is the user; the tenant is the ``tenant_id`` field your auth handler
  returns (``"default"`` without one). A run that also names a user or tenant (``synth_user_id``,
  ``user_id``, ``tenant_id``, or the synthesis graph's input) must name the same one, or it fails
  with :class:`IdentityForbidden`: a client cannot act as another user. A server with custom auth
  refuses runs without a signed-in user.
* **LangGraph server without auth** (plain ``langgraph dev``): the server fills its own
  ``configurable["user_id"]`` with the authenticated user, which is empty here, so our key is
  ``synth_user_id`` (context or configurable), with ``tenant_id``.
* **In process** (``graph.ainvoke(..., config)`` or ``context=``): ``synth_user_id``; the older
  ``user_id`` is still accepted when ``synth_user_id`` is absent.

A run without a user fails with :class:`IdentityMissing`, whose message says what to pass.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from langchain_core.runnables import RunnableConfig
from langgraph.runtime import get_runtime
from pydantic import Field
from typing_extensions import TypedDict

from synth_agent.models import validate_user_id

__all__ = [
    "AUTH_USER_KEY",
    "DEFAULT_TENANT",
    "TENANT_KEY",
    "USER_KEY",
    "Identity",
    "IdentityContext",
    "IdentityForbidden",
    "IdentityMissing",
    "identity",
    "resolve_identity",
    "run_values",
]

DEFAULT_TENANT = "default"
USER_KEY = "synth_user_id"
"""Our key for the user (context or configurable). Not ``user_id``: the LangGraph server owns that one."""
LEGACY_USER_KEY = "user_id"
TENANT_KEY = "tenant_id"
AUTH_USER_KEY = "langgraph_auth_user"
"""Reserved configurable key where the LangGraph server puts the user its auth handler signed in."""


class IdentityContext(TypedDict, total=False):
    """Who the run is for. Under LangGraph auth both come from the signed-in user instead."""

    synth_user_id: Annotated[
        str,
        Field(description="The end user whose votes and persona this run uses (any non-empty string). "
                          "Ignored, and must match if given, when LangGraph auth signs the user in."),
    ]
    tenant_id: Annotated[
        str,
        Field(description="The tenant (customer) the user belongs to; default 'default'. Under LangGraph "
                          "auth it is the signed-in user's tenant_id."),
    ]


class IdentityMissing(ValueError):
    """The run names no user (and no LangGraph auth signed one in)."""


class IdentityForbidden(PermissionError, ValueError):
    """The run asks to act as a user or tenant other than the one LangGraph auth signed in.

    Also a ValueError: the LangGraph server shows the messages of ValueErrors to the client and
    replaces others' with "An internal error occurred".
    """


MISSING = (
    f"no user for this run: pass {USER_KEY!r} (and optionally {TENANT_KEY!r}) in the run context, "
    f'e.g. context={{"{USER_KEY}": "ana@example.com"}} (or config["configurable"]), or configure '
    "LangGraph auth so the signed-in user is used (see docs/langgraph.md). Under the LangGraph server "
    "'user_id' is the server's own key (the authenticated user, empty without auth)."
)


@dataclass(frozen=True)
class Identity:
    """A resolved (tenant, user) and where it came from."""

    tenant_id: str
    user_id: str
    source: Literal["auth", "run"]


def run_values(config: RunnableConfig | None) -> dict[str, Any]:
    """The run's settings: ``config["configurable"]`` overlaid with the run context (``context=...``).

    LangGraph 1.x passes per-run settings as ``context``; the LangGraph server mirrors context into
    ``configurable``; older code passes ``configurable``. Reading both serves all three.
    """
    values = dict((config or {}).get("configurable") or {})
    try:
        ctx = get_runtime().context
    except RuntimeError:  # not inside a graph run (e.g. the proxy calling Personalizer directly)
        ctx = None
    if isinstance(ctx, Mapping):
        values.update({k: v for k, v in ctx.items() if v is not None and k != AUTH_USER_KEY})
    return values


def _field(user: Any, name: str) -> Any:
    if isinstance(user, Mapping):
        return user.get(name)
    try:
        return user[name]
    except (TypeError, KeyError, AttributeError, NotImplementedError):
        pass
    try:
        return getattr(user, name, None)
    except NotImplementedError:
        return None


def signed_in(config: RunnableConfig | None) -> tuple[str, str | None] | None:
    """(identity, tenant_id or None) of the user LangGraph auth signed in for this run, if any."""
    user = ((config or {}).get("configurable") or {}).get(AUTH_USER_KEY)
    if user is None or _field(user, "is_authenticated") is False:
        return None
    ident = _field(user, "identity")
    if not isinstance(ident, str) or not ident:
        return None
    tenant = _field(user, TENANT_KEY)
    return ident, (str(tenant) if tenant else None)


def server_uses_auth() -> bool:
    """True inside a LangGraph API server that has custom auth configured (``langgraph.json`` ``auth``)."""
    cfg = sys.modules.get("langgraph_api.config")
    if cfg is not None and hasattr(cfg, "USES_CUSTOM_AUTH"):
        return bool(cfg.USES_CUSTOM_AUTH)
    return bool(os.environ.get("LANGGRAPH_AUTH"))


def _valid(value: Any, what: str) -> str:
    try:
        return validate_user_id(value)
    except ValueError as exc:
        raise IdentityMissing(f"invalid {what}: " + str(exc).replace("user_id", what)) from exc


def resolve_identity(
    config: RunnableConfig | None,
    *,
    user_id: str | None = None,
    tenant_id: str | None = None,
    required: bool = True,
) -> Identity | None:
    """The run's identity; ``user_id``/``tenant_id``: what the run's input asked for, if anything.

    Raises :class:`IdentityForbidden` when a signed-in run names someone else, and
    :class:`IdentityMissing` when there is no user (unless ``required=False``, which returns None).
    """
    values = run_values(config)
    named_users = {
        k: v for k, v in ((USER_KEY, values.get(USER_KEY)), (LEGACY_USER_KEY, values.get(LEGACY_USER_KEY)),
                          ("input user_id", user_id)) if v not in (None, "")
    }
    named_tenants = {
        k: v for k, v in ((TENANT_KEY, values.get(TENANT_KEY)), ("input tenant_id", tenant_id)) if v not in (None, "")
    }
    auth = signed_in(config)
    if auth is not None:
        user, tenant = auth[0], auth[1] or DEFAULT_TENANT
        for key, value in named_users.items():
            if value != user:
                raise IdentityForbidden(
                    f"this run is signed in as {user!r} by LangGraph auth and cannot act as {key}={value!r}; "
                    "drop it: the user comes from auth"
                )
        for key, value in named_tenants.items():
            if value != tenant:
                raise IdentityForbidden(
                    f"this run is signed in to tenant {tenant!r} by LangGraph auth and cannot use {key}={value!r}; "
                    "the tenant comes from the auth handler's tenant_id"
                )
        return Identity(_valid(tenant, "tenant_id"), _valid(user, "user_id"), "auth")
    conf = (config or {}).get("configurable") or {}
    if AUTH_USER_KEY in conf and server_uses_auth():
        raise IdentityForbidden(
            "this LangGraph server has custom auth configured but the run carries no signed-in user; "
            "authenticate the request (the user comes from auth)"
        )
    run_user = values.get(USER_KEY) or values.get(LEGACY_USER_KEY) or user_id
    if not run_user:
        if required:
            raise IdentityMissing(MISSING)
        return None
    key = USER_KEY if values.get(USER_KEY) else LEGACY_USER_KEY if values.get(LEGACY_USER_KEY) else "user_id"
    run_tenant = values.get(TENANT_KEY) or tenant_id or DEFAULT_TENANT
    return Identity(_valid(run_tenant, "tenant_id"), _valid(run_user, key), "run")


def identity(config: RunnableConfig | None) -> tuple[str, str]:
    """(tenant_id, user_id) of the run; see :func:`resolve_identity`."""
    who = resolve_identity(config)
    assert who is not None
    return who.tenant_id, who.user_id
