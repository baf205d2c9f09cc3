"""Custom auth for synth-agent's graphs under the LangGraph server: who the user is comes from the token.

Add to ``langgraph.json`` (docs/langgraph.md shows the whole file)::

    "auth": {"path": "./examples/langgraph_server/auth.py:auth"}

Then every request needs ``Authorization: Bearer <token>``; the graphs take the user from
the signed-in identity (and the tenant from its ``tenant_id``) and refuse runs that name
anyone else. Tokens here come from ``SYNTH_AGENT_LANGGRAPH_TOKENS``, a JSON object
``{"<token>": {"identity": "<user id>", "tenant_id": "<tenant>"}}``, so the example runs as
is; in production replace :func:`lookup` with your identity provider (verify a JWT, call
your session service...). Besides signing users in it keeps each user to their own data:
threads carry an ``owner`` and are only visible to it, and the store API only reaches the
caller's own synth-agent namespace.
"""

from __future__ import annotations

import hmac
import json
import os
from typing import Any

from langgraph_sdk import Auth

from store.memory import ROOT, encode_label

auth = Auth()


def lookup(token: str) -> dict[str, Any] | None:
    """The user a bearer token belongs to, or None. Compares every known token in constant time."""
    try:
        table = json.loads(os.environ.get("SYNTH_AGENT_LANGGRAPH_TOKENS") or "{}")
    except json.JSONDecodeError:
        return None
    found = None
    for known, user in table.items():
        if hmac.compare_digest(known.encode(), token.encode()):
            found = user
    return found


@auth.authenticate
async def authenticate(authorization: str | None) -> Auth.types.MinimalUserDict:
    scheme, _, token = (authorization or "").partition(" ")
    user = lookup(token) if scheme.lower() == "bearer" and token else None
    if not user or not user.get("identity"):
        raise Auth.exceptions.HTTPException(status_code=401, detail="a valid bearer token is required")
    return {"identity": str(user["identity"]), "tenant_id": str(user.get("tenant_id") or "default")}  # type: ignore[typeddict-unknown-key]


@auth.on.threads
async def own_threads(ctx: Auth.types.AuthContext, value: Any) -> Auth.types.FilterType:
    """A thread belongs to whoever created it; others cannot read, run, update or delete it.

    Stateless runs (``thread_id=None``) get a temporary thread from the run's metadata, so runs are
    stamped too; an update cannot hand a thread to someone else.
    """
    if isinstance(value, dict) and ctx.action in ("create", "create_run", "update"):
        if value.get("metadata") is None:
            value["metadata"] = {}
        value["metadata"]["owner"] = ctx.user.identity  # in place: the server keeps its reference
    return {"owner": ctx.user.identity}


@auth.on.crons
async def no_crons(ctx: Auth.types.AuthContext, value: Any) -> bool:
    """synth-agent does not use crons (background synthesis is vote-triggered); keep them off."""
    return False


def _tenant(user: Any) -> str:
    try:
        return str(user["tenant_id"] or "default")
    except (KeyError, TypeError):
        return "default"


@auth.on.store
async def own_namespace(ctx: Auth.types.AuthContext, value: Any) -> bool:
    """The store API reaches only the caller's own votes, personas and pending A/B pairs."""
    tenant = _tenant(ctx.user)
    mine = (ROOT, encode_label(tenant), "user", encode_label(ctx.user.identity))
    namespace = tuple(value.get("namespace") or ())
    if namespace[: len(mine)] != mine:
        raise Auth.exceptions.HTTPException(status_code=403, detail="outside your own synth-agent namespace")
    return True
