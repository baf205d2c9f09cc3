"""Store commands through a running ``synth-agent serve``: its HTTP API, on loopback, with a per-run token.

Why: a store command (``votes``, ``persona``, ``export-prompt``, ``forget``) that opens the store
in its own process first imports chromadb and LangGraph and starts a Chroma client, about 1 s of
CPU before it reads a byte (docs/cli.md, "Start-up time"). When ``synth-agent serve`` already
owns the home, the command asks it over the API it serves anyway (``/v1/users/{user}/...``):
nothing heavy is imported, and the answer comes from the process that owns the data, so a CLI
never races the server.

How the two find each other: ``serve`` binds its port, then writes ``<home>/serve.json``
(:data:`STATE_FILE`) with a loopback URL, its pid and a fresh random token; it removes the file
when it stops. The file is created with mode 0600 (never readable by another user), and the token:

- is new on every start and dies with the server;
- is accepted only from a loopback client address (:func:`loopback_client`);
- acts for the owner of the home: any tenant, named by ``X-Synth-Tenant`` (the owner can open
  the store files directly anyway), without the per-key rate limit.

The CLI uses the file only if it belongs to the CLI's own user, is not readable or writable by
anybody else, and names a live process; otherwise, or if the server cannot be reached or refuses
the token, it opens the store itself as before. ``SYNTH_AGENT_VIA_SERVE=0`` always opens it itself.

This module is stdlib only: the CLI imports it before anything heavy.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import secrets
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "STATE_FILE",
    "LocalService",
    "Publication",
    "Reply",
    "ServiceUnavailable",
    "bind",
    "configured_home",
    "find",
    "loopback_client",
    "publish",
    "service_url",
    "token_matches",
]

STATE_FILE = "serve.json"
"""In the home directory, while a ``synth-agent serve`` of that home runs (mode 0600)."""

_WILDCARD = ("0.0.0.0", "::", "")  # noqa: S104 - a bind address we recognise, never one we bind


def configured_home(override: str | os.PathLike[str] | None = None) -> Path:
    """The home :class:`synth_agent.config.Settings` would use (``--home``, else ``SYNTH_AGENT_HOME``,
    else ``./.synth-agent``), without importing pydantic-settings.

    Environment names are matched case-insensitively, as pydantic-settings does.
    """
    if override is not None:
        return Path(override)
    for name, value in os.environ.items():
        if name.upper() == "SYNTH_AGENT_HOME":
            return Path(value)
    return Path(".synth-agent")


def loopback_client(host: str | None) -> bool:
    """Whether a request's client address is this machine's loopback (127.0.0.0/8 or ::1)."""
    if not host:
        return False
    return host == "::1" or host.startswith("127.") or host.startswith("::ffff:127.")


def service_url(host: str, port: int) -> str | None:
    """The loopback URL a local CLI reaches a server bound to ``host:port`` at; None if it binds one
    non-loopback address only (the token is accepted from loopback only, so no shortcut)."""
    if host in _WILDCARD or host in ("127.0.0.1", "localhost") or host.startswith("127."):
        return f"http://127.0.0.1:{port}"
    if host == "::1":
        return f"http://[::1]:{port}"
    return None


@dataclass
class Publication:
    """What one ``serve`` published; :meth:`close` removes the file if it still names this run."""

    path: Path
    token: str

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(self.path.read_text()).get("token") == self.token:
                self.path.unlink()


def publish(home: Path, host: str, port: int, **extra: Any) -> Publication | None:
    """Write ``<home>/serve.json`` for a server bound to ``host:port`` (None: not reachable over loopback).

    Created 0600 under a temporary name and renamed into place, so a reader never sees half a file
    and nobody else can read the token at any moment. ``extra`` goes into the file as is.
    """
    url = service_url(host, port)
    if url is None:
        return None
    home.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    final = home / STATE_FILE
    tmp = home / f".{STATE_FILE}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"url": url, "pid": os.getpid(), "token": token, **extra}, f)
    tmp.replace(final)
    return Publication(final, token)


def token_matches(presented: str, token: str | None) -> bool:
    """Constant-time comparison of a presented credential with the run's token."""
    return token is not None and hmac.compare_digest(presented.encode(), token.encode())


class ServiceUnavailable(Exception):
    """The server could not be reached or refused the token: open the store in-process instead."""


@dataclass
class Reply:
    status: int
    body: bytes
    erases_checkpoints: bool = True
    """Whether the server erases synthesis checkpoints on forget (it runs synthesis inline)."""

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> tuple[str, str | None]:
        """``(message, code)`` of an error reply (the proxy's OpenAI-style error body)."""
        try:
            err = json.loads(self.body)["error"]
            return str(err["message"]), err.get("code")
        except (ValueError, KeyError, TypeError):
            return self.body.decode("utf-8", "replace")[:200] or f"HTTP {self.status}", None


@dataclass
class LocalService:
    """A running ``synth-agent serve`` of this home, reached over loopback with its token."""

    url: str
    token: str
    pid: int
    info: dict[str, Any]

    def request(self, method: str, path: str, *, tenant: str, timeout: float = 300.0) -> Reply:
        """One request; :class:`ServiceUnavailable` when the server is not there (nothing was done)
        or does not take the token."""
        import http.client
        from urllib.parse import urlsplit

        parts = urlsplit(self.url)
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
        try:
            try:
                conn.connect()
            except OSError as exc:
                raise ServiceUnavailable(f"{self.url}: {exc}") from None
            conn.request(method, path, headers={"Authorization": f"Bearer {self.token}", "X-Synth-Tenant": tenant,
                                                "Accept": "application/json"})
            resp = conn.getresponse()
            reply = Reply(resp.status, resp.read(), bool(self.info.get("erases_checkpoints", True)))
        except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected) as exc:
            raise ServiceUnavailable(f"{self.url}: {exc}") from None
        finally:
            conn.close()
        if reply.status == 401:  # a stale file, or not the server that wrote it
            raise ServiceUnavailable(f"{self.url} refused the token")
        return reply


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: not ours to talk to
        return False
    return True


def find(home: Path) -> LocalService | None:
    """The running server that published itself in ``home``, if it is safe and alive; else None."""
    if os.environ.get("SYNTH_AGENT_VIA_SERVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    path = home / STATE_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            return None  # someone else's file, or one others could read or change: never trusted
        try:
            data = json.loads(f.read(65536))
            url, token, pid = str(data["url"]), str(data["token"]), int(data["pid"])
        except (ValueError, KeyError, TypeError):
            return None
    if not url.startswith(("http://127.", "http://[::1]")) or not _pid_alive(pid):
        return None
    return LocalService(url, token, pid, data)


def bind(host: str, port: int) -> socket.socket:
    """A socket bound (not yet listening) the way uvicorn binds one: the port is ours before the
    state file names it, and connections are refused until the server accepts them."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock
