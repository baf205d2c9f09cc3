"""``synth-agent serve`` and ``synth-agent worker``; the main CLI calls :func:`register`.

Flags override environment variables (see :mod:`synth_agent.proxy.settings`); the
global ``--home/--base-url/--model/--api-key`` options of ``synth-agent`` set the
store home and the judge/synthesis endpoint, as for every other command.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = ["register"]


def _settings(ctx: typer.Context, chroma_host: str | None, chroma_port: int | None) -> Any:
    from synth_agent.config import Settings

    settings = getattr(ctx.obj, "settings", None) or Settings()
    update: dict[str, Any] = {}
    if chroma_host is not None:
        update["chroma_host"] = chroma_host
    if chroma_port is not None:
        update["chroma_port"] = chroma_port
    return settings.model_copy(update=update) if update else settings


SERVE_KEEP_ALIVE_S = 75
"""Seconds ``serve`` keeps an idle keep-alive connection open (uvicorn's default: 5).

A client that reuses a pooled connection just as the server closes it for idleness sends its
request into a closing socket: ``ServerDisconnectedError`` / ``ClientOSError`` (connection reset)
in aiohttp, ``RemoteProtocolError`` in httpx, and a POST is not retried. Common clients keep idle
connections for reuse up to 15 s (aiohttp), 5 s (httpx, so the OpenAI SDK), 4 s (Node's undici),
60 s (nginx's upstream keepalive, AWS ALB); a server that waits longer than its client never
closes a connection the client may be about to use. With 5 s, the soak's aiohttp load generator
saw 2-8 such errors per run (docs/store.md, "Compaction": the soak's connection errors).
"""


def _serve(app: Any, proxy: Any, home: Path, *, log_level: str, access_log: bool) -> None:
    """Run the proxy with uvicorn on a socket bound here, published for the local CLI while it serves.

    The port is bound before ``<home>/serve.json`` names it and listens only once the app has
    started, so a CLI reading the file early is refused and opens the store itself
    (:mod:`synth_agent.local_service`); the file is removed when the server stops.
    """
    import sys

    import uvicorn

    from synth_agent.local_service import bind, publish
    from synth_agent.serving import accept_listeners, freeze_heap_after_startup

    try:
        sock = bind(proxy.host, proxy.port)
    except OSError as exc:
        typer.echo(f"error: cannot listen on {proxy.host}:{proxy.port}: {exc.strerror or exc}", err=True)
        raise typer.Exit(1) from None
    port = int(sock.getsockname()[1])
    if proxy.port == 0:
        typer.echo(f"synth-agent proxy: port {port} (--port 0)", err=True)
    state = app.state.proxy
    published = publish(home, proxy.host, port,
                        erases_checkpoints=proxy.synthesis == "inline" and not proxy.queue)
    state.local_token = published.token if published else None
    server = uvicorn.Server(uvicorn.Config(freeze_heap_after_startup(app), host=proxy.host, port=proxy.port,
                                           log_level=log_level, access_log=access_log,
                                           timeout_keep_alive=SERVE_KEEP_ALIVE_S))
    listeners = accept_listeners(sock)  # more than one connection accepted per loop turn
    try:
        server.run(sockets=listeners)
    except KeyboardInterrupt:
        pass
    finally:
        if published is not None:
            published.close()
        for listener in listeners:
            listener.close()
    if not server.started:
        sys.exit(3)  # uvicorn's STARTUP_FAILURE, as uvicorn.run exits


def register(app: typer.Typer) -> None:
    """Add ``serve`` and ``worker`` to ``app``."""

    @app.command()
    def serve(
        ctx: typer.Context,
        host: Annotated[str | None, typer.Option(help="Bind address (env SYNTH_AGENT_HOST; default 127.0.0.1).")] = None,
        port: Annotated[int | None, typer.Option(help="Port (env SYNTH_AGENT_PORT; default 8080).")] = None,
        upstream_base_url: Annotated[str | None, typer.Option(
            help="Where chat completions go (env SYNTH_AGENT_UPSTREAM_BASE_URL; default OPENAI_BASE_URL).")] = None,
        upstream_api_key: Annotated[str | None, typer.Option(
            help="Key for the upstream (env SYNTH_AGENT_UPSTREAM_API_KEY; default OPENAI_API_KEY).")] = None,
        model_map: Annotated[str | None, typer.Option(
            help="client=upstream model names, comma separated; '*' matches any (env SYNTH_AGENT_MODEL_MAP).")] = None,
        default_model: Annotated[str | None, typer.Option(help="Model for /v1/ab and /v1/rerank bodies without one.")] = None,
        keys_file: Annotated[Path | None, typer.Option(help="JSON/TOML API key file (env SYNTH_AGENT_KEYS_FILE).")] = None,
        no_auth: Annotated[bool, typer.Option("--no-auth", help="Development only: no API keys, tenant 'default'.")] = False,
        rate_limit: Annotated[float | None, typer.Option(help="Requests/second per API key (0 = unlimited).")] = None,
        burst: Annotated[int | None, typer.Option(help="Burst size per API key.")] = None,
        synthesis: Annotated[str | None, typer.Option(
            help="'inline': fit personas in this process; 'off': a `synth-agent worker` does it.")] = None,
        poll_interval: Annotated[float | None, typer.Option(help="Inline mode: re-scan the store every N seconds.")] = None,
        queue: Annotated[str | None, typer.Option(
            help="Scale-out mode: Postgres DSN of the job queue; votes enqueue fits for `synth-agent worker "
            "--queue` (env SYNTH_AGENT_QUEUE; see docs/deploy.md).")] = None,
        chroma_host: Annotated[str | None, typer.Option(help="Chroma server host (env CHROMA_HOST).")] = None,
        chroma_port: Annotated[int | None, typer.Option(help="Chroma server port (env CHROMA_PORT).")] = None,
        log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
        access_log: Annotated[bool, typer.Option(
            "--access-log", help="Log every request (one line each; off by default: /metrics counts requests "
            "by route and status, and a log line per request costs ~6% of the proxy's CPU).")] = False,
        simulator: Annotated[bool, typer.Option(
            "--simulator", help="Use a fresh offline simulator (a child process that ends with this one) as "
            "upstream and judge, whatever OPENAI_BASE_URL says.")] = False,
    ) -> None:
        """Serve the OpenAI-compatible personalization proxy.

        Point any OpenAI client's base_url at its /v1.

        Without an upstream (and with --simulator) the offline simulator runs as a child process; it
        stops with the server: on SIGTERM or Ctrl-C after a graceful shutdown, and within a second if
        the server is killed outright.
        """
        from synth_agent.proxy.app import create_app
        from synth_agent.proxy.settings import ProxySettings
        from synth_agent.services import simulator_if_needed
        from synth_agent.serving import favour_the_event_loop, limit_malloc_arenas, start_malloc_trimmer

        limit_malloc_arenas()  # before the worker threads start (docs/store.md, "Memory over time")
        flags: dict[str, Any] = {
            "host": host, "port": port, "upstream_base_url": upstream_base_url,
            "upstream_api_key": upstream_api_key, "model_map": model_map, "default_model": default_model,
            "keys_file": keys_file, "key_rate_limit": rate_limit, "key_burst": burst, "synthesis": synthesis,
            "poll_interval": poll_interval, "queue": queue,
        }
        if simulator and upstream_base_url is not None:
            raise typer.BadParameter("give --simulator or --upstream-base-url, not both", param_hint="'--simulator'")
        try:
            proxy = ProxySettings(**{k: v for k, v in flags.items() if v is not None})
            if no_auth:
                proxy = proxy.model_copy(update={"no_auth": True})
            if simulator:
                proxy = proxy.model_copy(update={"upstream_base_url": None, "upstream_api_key": None})
            settings = _settings(ctx, chroma_host, chroma_port)
            if proxy.queue:
                from synth_agent.scale.settings import check_scale_config

                check_scale_config(proxy.queue, settings.chroma_host)
            start_malloc_trimmer(settings.malloc_trim_s)
            with simulator_if_needed(settings, force=simulator) as live:
                app = create_app(live, proxy)
                auth = "OFF (--no-auth, tenant 'default')" if proxy.no_auth else "API keys"
                typer.echo(f"synth-agent proxy on http://{proxy.host}:{proxy.port}/v1 -> "
                           f"{proxy.upstream_base_url or live.base_url}; auth: {auth}; "
                           f"synthesis: {'queue (workers)' if proxy.queue else proxy.synthesis}; "
                           f"access log: {'on' if access_log else 'off (--access-log)'}; docs: http://{proxy.host}:{proxy.port}/docs",
                           err=True)
                favour_the_event_loop()
                _serve(app, proxy, live.home, log_level=log_level, access_log=access_log)
        except (ValueError, FileNotFoundError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None

    @app.command()
    def worker(
        ctx: typer.Context,
        poll_interval: Annotated[float, typer.Option(help="Seconds between store scans (without --queue).")] = 5.0,
        queue: Annotated[str | None, typer.Option(
            help="Scale-out mode: take fits from this Postgres job queue instead of scanning the store "
            "(env SYNTH_AGENT_QUEUE; see docs/deploy.md).")] = None,
        concurrency: Annotated[int, typer.Option(min=1, help="--queue: fits at once in this process.")] = 2,
        max_attempts: Annotated[int, typer.Option(min=1, help="--queue: attempts per job (backoff 2^n s).")] = 5,
        heartbeat: Annotated[float, typer.Option(min=0.1, help="--queue: seconds between heartbeats.")] = 5.0,
        stall_timeout: Annotated[float, typer.Option(
            min=0.5, help="--queue: a worker silent this long is dead; its jobs are retried.")] = 30.0,
        chroma_host: Annotated[str | None, typer.Option(help="Chroma server host (env CHROMA_HOST).")] = None,
        chroma_port: Annotated[int | None, typer.Option(help="Chroma server port (env CHROMA_PORT).")] = None,
    ) -> None:
        """Fit personas in the background: from the Postgres job queue (--queue), or for a proxy running
        with --synthesis off by scanning the store (same store and home)."""
        from synth_agent.runner import event_loop_name, freeze_heap, run_fits
        from synth_agent.services import simulator_if_needed

        settings = _settings(ctx, chroma_host, chroma_port)
        from synth_agent.scale.settings import ScaleSettings

        try:
            loop_name = event_loop_name()
            scale = ScaleSettings(queue=queue) if queue else ScaleSettings()
            if scale.queue:
                from synth_agent.scale.settings import check_scale_config

                check_scale_config(scale.queue, settings.chroma_host)
        except ValueError as exc:
            from pydantic import ValidationError

            msg = ("; ".join(f"SYNTH_AGENT_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors())
                   if isinstance(exc, ValidationError) else str(exc))
            typer.echo(f"error: {msg}", err=True)
            raise typer.Exit(2) from None

        async def scan(live: Any, stop: asyncio.Event) -> None:
            from synth_agent.proxy.worker import open_worker

            async with open_worker(live, poll_interval=poll_interval) as w:
                freeze_heap()  # the store's and the embedder's start-up objects too
                typer.echo(f"synth-agent worker: scanning the store every {poll_interval:g}s; Ctrl-C to stop", err=True)
                await w.run(stop)

        async def from_queue(live: Any, stop: asyncio.Event) -> None:
            from synth_agent.scale.worker import WorkerOptions, open_queue_worker

            opts = WorkerOptions(concurrency=concurrency, max_attempts=max_attempts, heartbeat=heartbeat,
                                 stall_timeout=stall_timeout)
            assert scale.queue is not None
            async with open_queue_worker(live, scale.queue, options=opts, policy=scale.policy(),
                                         fit_config=scale.fit_config()) as w:
                freeze_heap()
                typer.echo(f"synth-agent worker {opts.name}: fitting from the Postgres queue, {concurrency} at "
                           "once; Ctrl-C to stop", err=True)
                await w.run(stop)

        import asyncio

        async def main(live: Any) -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await (from_queue(live, stop) if scale.queue else scan(live, stop))

        with simulator_if_needed(settings) as live:
            run_fits(main(live), loop=loop_name)  # uvloop unless SYNTH_AGENT_EVENT_LOOP=asyncio

    @app.command()
    def postgres(
        data: Annotated[Path, typer.Option(help="Data directory (created and initialised on first start).")] = Path(
            ".synth-agent/postgres"),
        port: Annotated[int, typer.Option(help="TCP port (0: a free one).")] = 5432,
        host: Annotated[str, typer.Option(help="Listen address (loopback only by default).")] = "127.0.0.1",
    ) -> None:
        """Run a local PostgreSQL for the scale-out mode (the binaries ship in the pinned `pgserver` wheel);
        prints the DSN for SYNTH_AGENT_QUEUE. For one machine and tests; see docs/deploy.md for production."""
        from synth_agent.scale.postgres import PostgresNotFound, serve_forever

        try:
            code = serve_forever(data.absolute(), port, host)
        except (PostgresNotFound, RuntimeError, OSError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        raise typer.Exit(code)
