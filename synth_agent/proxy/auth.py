"""API keys → tenants, a token-bucket rate limit per key, and failed-auth throttling per client address.

Keys are kept only as SHA-256 digests, so a leaked key file or a heap dump does
not reveal usable keys, and a presented key is checked against every digest with
:func:`hmac.compare_digest` (no early exit), so response timing says nothing about
which keys exist.

Sources, merged: ``SYNTH_AGENT_API_KEYS`` (``tenantA:key1,tenantB:key2``) and a key
file, JSON or TOML, listing ``keys`` entries with ``tenant`` and either ``key``
(plain text) or ``sha256`` (hex digest, preferred: ``synth_agent.proxy.auth.hash_key``)::

    # keys.toml
    [[keys]]
    tenant = "acme"
    sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    rate_limit = 50      # optional, requests/second for this key
    burst = 100          # optional
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import time
import tomllib
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from synth_agent.models import validate_user_id

__all__ = ["ApiKey", "AuthThrottle", "KeyRing", "RateLimiter", "TokenBucket", "hash_key"]


def hash_key(key: str) -> str:
    """The stored form of an API key (hex SHA-256)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    """One accepted key: its digest, its tenant, and optional per-key limits."""

    digest: str
    tenant: str
    rate_limit: float | None = None
    burst: int | None = None

    @property
    def key_id(self) -> str:
        """A short, non-secret handle for logs and rate-limit buckets."""
        return self.digest[:12]


def _check_tenant(tenant: Any, where: str) -> str:
    try:
        return validate_user_id(tenant)
    except ValueError as exc:
        raise ValueError(f"{where}: invalid tenant: {str(exc).replace('user_id', 'tenant')}") from None


class KeyRing:
    """The set of accepted keys. Immutable after construction; look-ups are constant time per key."""

    def __init__(self, keys: Iterable[ApiKey] = ()) -> None:
        self.keys: tuple[ApiKey, ...] = tuple(keys)
        digests = [k.digest for k in self.keys]
        if len(set(digests)) != len(digests):
            raise ValueError("the same API key is configured twice")

    def __len__(self) -> int:
        return len(self.keys)

    def lookup(self, presented: str) -> ApiKey | None:
        """The key matching ``presented``, comparing against every digest in constant time."""
        digest = hash_key(presented).encode()
        found: ApiKey | None = None
        for k in self.keys:
            if hmac.compare_digest(digest, k.digest.encode()):
                found = k
        return found

    def tenants(self) -> set[str]:
        return {k.tenant for k in self.keys}

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_env_string(cls, spec: str) -> KeyRing:
        """``tenantA:key1,tenantB:key2`` (keys may contain ':'; the tenant is before the first one)."""
        out: list[ApiKey] = []
        for i, part in enumerate(p.strip() for p in spec.split(",")):
            if not part:
                continue
            tenant, sep, key = part.partition(":")
            if not sep or not key:
                raise ValueError(f"SYNTH_AGENT_API_KEYS entry {i + 1} must look like tenant:key")
            out.append(ApiKey(hash_key(key), _check_tenant(tenant, f"SYNTH_AGENT_API_KEYS entry {i + 1}")))
        return cls(out)

    @classmethod
    def from_file(cls, path: str | Path) -> KeyRing:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"no such key file: {p}")
        text = p.read_text(encoding="utf-8")
        try:
            data = tomllib.loads(text) if p.suffix.lower() == ".toml" else json.loads(text)
        except (ValueError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"key file {p} is not valid {'TOML' if p.suffix == '.toml' else 'JSON'}: {exc}") from None
        entries = data.get("keys") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise ValueError(f"key file {p} needs a 'keys' list of {{tenant, key | sha256}} entries")
        out: list[ApiKey] = []
        for i, e in enumerate(entries):
            where = f"key file {p} entry {i + 1}"
            if not isinstance(e, dict):
                raise ValueError(f"{where}: must be an object with tenant and key/sha256")
            tenant = _check_tenant(e.get("tenant"), where)
            if ("key" in e) == ("sha256" in e):
                raise ValueError(f"{where}: give exactly one of 'key' and 'sha256'")
            if "key" in e:
                if not isinstance(e["key"], str) or not e["key"]:
                    raise ValueError(f"{where}: key must be a non-empty string")
                digest = hash_key(e["key"])
            else:
                digest = str(e["sha256"]).lower()
                if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                    raise ValueError(f"{where}: sha256 must be 64 hex digits")
            rate, burst = e.get("rate_limit"), e.get("burst")
            out.append(
                ApiKey(
                    digest,
                    tenant,
                    float(rate) if rate is not None else None,
                    int(burst) if burst is not None else None,
                )
            )
        return cls(out)

    @classmethod
    def load(cls, *, env_spec: str | None = None, path: str | Path | None = None) -> KeyRing:
        keys: list[ApiKey] = []
        if env_spec:
            keys += cls.from_env_string(env_spec).keys
        if path:
            keys += cls.from_file(path).keys
        return cls(keys)


@dataclass
class TokenBucket:
    """Classic token bucket: ``rate`` tokens/second, at most ``burst`` saved up."""

    rate: float
    burst: int
    clock: Callable[[], float] = time.monotonic
    tokens: float = field(init=False)
    updated: float = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = float(self.burst)
        self.updated = self.clock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(float(self.burst), self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def take(self) -> float:
        """Spend one token; returns 0 when allowed, else the seconds until one is available."""
        if self.rate <= 0:
            return 0.0
        self._refill()
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate

    def wait(self) -> float:
        """Seconds until a token is available (0 now), without spending one."""
        if self.rate <= 0:
            return 0.0
        self._refill()
        return 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / self.rate

    def spend(self) -> None:
        """Spend a token even if none is left (the balance may go negative: repeated abuse waits longer)."""
        if self.rate > 0:
            self._refill()
            self.tokens = max(self.tokens - 1.0, -float(self.burst))

    @property
    def full(self) -> bool:
        self._refill()
        return self.tokens >= self.burst


class RateLimiter:
    """One bucket per API key (keys are few and configured, so the map is bounded)."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    def check(self, key: ApiKey) -> int | None:
        """None when allowed, else the Retry-After in whole seconds (at least 1)."""
        bucket = self._buckets.get(key.digest)
        if bucket is None:
            rate = key.rate_limit if key.rate_limit is not None else self.rate
            burst = key.burst if key.burst is not None else self.burst
            bucket = self._buckets[key.digest] = TokenBucket(rate, burst, self.clock)
        wait = bucket.take()
        return None if wait <= 0 else max(1, math.ceil(wait))


class AuthThrottle:
    """Failed authentications per client address: ``burst`` failures, then ``rate`` per second.

    While an address is over its budget, every request from it that needs a key gets 429
    with ``Retry-After`` *before* its key is checked, so guessing keys is slow no matter
    what is sent. Valid keys from other addresses are unaffected. At most ``max_clients``
    addresses are tracked (least recently failing first out, after those already refilled),
    so a flood of spoofed addresses cannot grow memory.
    """

    def __init__(
        self, rate: float, burst: int, *, max_clients: int = 10_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.max_clients = max_clients
        self.clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def retry_after(self, client: str) -> int | None:
        """None when ``client`` may try a key now, else the Retry-After in whole seconds (at least 1)."""
        bucket = self._buckets.get(client)
        if bucket is None or self.rate <= 0:
            return None
        wait = bucket.wait()
        return None if wait <= 0 else max(1, math.ceil(wait))

    def failed(self, client: str) -> None:
        """Record a failed authentication from ``client``."""
        if self.rate <= 0:
            return
        bucket = self._buckets.get(client)
        if bucket is None:
            self._evict()
            bucket = self._buckets[client] = TokenBucket(self.rate, self.burst, self.clock)
        else:
            self._buckets.move_to_end(client)
        bucket.spend()

    def _evict(self) -> None:
        if len(self._buckets) < self.max_clients:
            return
        for addr in [a for a, b in self._buckets.items() if b.full]:
            del self._buckets[addr]
        while len(self._buckets) >= self.max_clients:
            self._buckets.popitem(last=False)
