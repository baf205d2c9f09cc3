"""What the store writes into Chroma instead of user data: opaque ids, keyed tokens, sealed blobs.

* **Ids and tokens.** An item's Chroma id and the filter tokens of its namespace levels
  are ``HMAC-SHA256(secret, ...)``, so a user id or a namespace label never appears in
  Chroma, yet a namespace filter stays one indexed equality. Without a ledger (a
  shared Chroma server) the secret is empty: the values are plain SHA-256, stable
  across every process that talks to that server.
* **Blobs.** An item (namespace, key, value, timestamps) is one JSON document, sealed
  with AES-256-GCM under the item's own data key (the item id is the associated data,
  so a blob cannot be moved to another item), or stored as plain JSON when the store
  has no ledger. The first character says which: ``s`` sealed, ``p`` plain.

>>> c = Codec(secret=b"k" * 32)
>>> c.token("p", "abc") == c.token("p", "abc") != Codec(secret=b"j" * 32).token("p", "abc")
True
>>> key = bytes(32)
>>> blob = c.seal("item-1", {"text": "hello"}, key)
>>> blob[0], c.open("item-1", blob, key)
('s', {'text': 'hello'})
>>> c.open("item-1", c.seal("item-1", {"a": 1}, None), None)
{'a': 1}
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from collections.abc import Sequence
from typing import Any

_NONCE = 12


class SealError(ValueError):
    """A blob that cannot be opened: wrong or destroyed key, or damaged data."""


class Codec:
    """Tokens, ids and (un)sealing for one store; ``secret=b""`` means plain (no ledger)."""

    def __init__(self, secret: bytes = b"") -> None:
        self.secret = secret
        self.sealed = bool(secret)
        self._aead: Any
        if self.sealed:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM

            self._aead = AESGCM
        else:
            self._aead = None

    def token(self, kind: str, text: str) -> str:
        """A 128-bit keyed digest, url-safe base64 (22 characters)."""
        data = f"{kind}\x00{text}".encode()
        digest = (
            hmac.new(self.secret, data, hashlib.sha256).digest() if self.secret else hashlib.sha256(data).digest()
        )
        return base64.urlsafe_b64encode(digest[:16]).decode().rstrip("=")

    def seal(self, rid: str, doc: dict[str, Any], key: bytes | None) -> str:
        if key is None:
            if self.sealed:
                raise SealError(f"no data key for record {rid}")
            return "p" + _dumps(doc)
        return _sealed(self._aead(key), os.urandom(_NONCE), rid, doc)

    def seal_many(self, docs: Sequence[tuple[str, dict[str, Any]]], key: bytes | None) -> list[str]:
        """``[seal(rid, doc, key) for rid, doc in docs]``, with one cipher and one read of the OS's randomness.

        Why: :meth:`seal` reads its nonce with ``os.urandom``, a system call that releases the GIL;
        the intake journal's appender seals a whole group of rows (~100 under a write burst) while
        the event loop is busy, and each release cost it a wait for the GIL to come back (up to the
        switch interval). The nonces are the same: 96 random bits each, from one ``os.urandom`` call.
        """
        if key is None or not docs:
            return [self.seal(rid, doc, key) for rid, doc in docs]
        aead = self._aead(key)
        nonces = os.urandom(_NONCE * len(docs))
        return [_sealed(aead, nonces[i * _NONCE : (i + 1) * _NONCE], rid, doc) for i, (rid, doc) in enumerate(docs)]

    def open(self, rid: str, blob: str, key: bytes | None) -> dict[str, Any]:
        if not blob:
            raise SealError(f"record {rid} has no data")
        if blob[0] == "p":
            return json.loads(blob[1:])  # type: ignore[no-any-return]
        if blob[0] != "s" or self._aead is None:
            raise SealError(f"record {rid} is sealed, but this store has no ledger with its key")
        if key is None:
            raise SealError(f"the data key of record {rid} is gone (the record was deleted)")
        raw = base64.b64decode(blob[1:])
        try:
            plain = self._aead(key).decrypt(raw[:_NONCE], raw[_NONCE:], rid.encode())
        except Exception as exc:  # cryptography's InvalidTag carries no message
            raise SealError(f"record {rid} does not open with its key ({type(exc).__name__})") from None
        return json.loads(plain)  # type: ignore[no-any-return]


__all__ = ["Codec", "SealError"]


def _dumps(doc: dict[str, Any]) -> str:
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":"))


def _sealed(aead: Any, nonce: bytes, rid: str, doc: dict[str, Any]) -> str:
    """One sealed blob: ``doc`` as compact JSON, encrypted under ``nonce`` with ``rid`` as associated data."""
    ct = aead.encrypt(nonce, _dumps(doc).encode("utf-8"), rid.encode())
    return "s" + base64.b64encode(nonce + ct).decode()
