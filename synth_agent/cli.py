"""The ``synth-agent`` command line.

Every command works offline against the bundled simulator by default and
against a real OpenAI-compatible endpoint with ``--base-url/--model/--api-key``
(or ``OPENAI_BASE_URL``/``SYNTH_AGENT_MODEL``/``OPENAI_API_KEY``).

Errors are one line on stderr, never a traceback (``--debug`` shows it), with
documented exit codes (:data:`EXIT_CODES`). Every process a command starts (the
offline simulator, judge servers) ends with it: on success, on an error, on
Ctrl-C or SIGTERM, and if the command is killed outright (:mod:`synth_agent.lifecycle`).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

if TYPE_CHECKING:
    from rich.progress import Progress
    from rich.table import Table

    from synth_agent.config import Settings

T = TypeVar("T")

app = typer.Typer(
    name="synth-agent",
    help=(
        "Personalize chat agents from their users' A/B votes.\n\n"
        "Learns a persona per user (SynthesizeMe), stores votes and personas in Chroma, "
        "and uses them to judge, rerank and prompt. Runs offline against a bundled simulator "
        "unless you point it at a real OpenAI-compatible endpoint.\n\n"
        "Exit codes: 0 success; 1 the command failed (unreadable file, nothing found, endpoint or store "
        "error, declined confirmation); 2 invalid input (bad option or user id, invalid vote lines); "
        "130 interrupted; 143 terminated. Errors are one line; --debug shows the traceback."
    ),
    no_args_is_help=True,
    # plain help: typer's rich help imports rich.markdown and renders panels, ~0.1 s of CPU per `--help`
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "the command failed: unreadable file, nothing found (e.g. no persona yet), endpoint or store "
    "error, a fit that failed, a refused or declined confirmation",
    2: "invalid input: a bad option or argument (e.g. an empty or invalid user id), or a vote file with "
    "invalid lines (the valid ones were stored, the invalid ones reported)",
    130: "interrupted (Ctrl-C)",
    143: "terminated (SIGTERM)",
}
"""Exit codes of every ``synth-agent`` command (also in ``docs/cli.md``)."""


@dataclass
class CLIState:
    """What the global options decided. Settings are read from the environment on first use, so
    ``--help`` and argument errors never import pydantic-settings."""

    overrides: dict[str, Any]
    tenant: str
    debug: bool = False
    _settings: Settings | None = None

    @property
    def home(self) -> Path:
        """The store home, without building :attr:`settings` (pydantic-settings is ~0.1-0.3 s of imports)."""
        from synth_agent.local_service import configured_home

        return self._settings.home if self._settings is not None else configured_home(self.overrides.get("home"))

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            from synth_agent.config import Settings

            try:
                self._settings = Settings(**self.overrides)  # flags validated like the environment
            except ValueError as exc:  # a malformed environment variable or flag
                _fail(f"invalid configuration: {_one_line(exc)} (a field `name` is set by SYNTH_AGENT_NAME or its "
                      "flag; base_url/api_key by OPENAI_BASE_URL/OPENAI_API_KEY)", 2)
        return self._settings


# Our own packages; everything else is "third party" for quiet_third_party.
_OWN = ("synth_agent", "store", "graphs")


def quiet_third_party(*, verbose: bool = False) -> None:
    """Keep libraries' noise out of CLI output and server logs unless ``--verbose``.

    Hidden by default: warnings raised inside third-party modules (our own still show), progress
    bars of libraries that honour ``TQDM_DISABLE`` / ``HF_HUB_DISABLE_PROGRESS_BARS``, and their
    info-level logs (only warnings and errors pass). Set in this process and inherited by the
    processes it starts (the simulator, a Chroma child). Cheap: no library is imported here.
    """
    import logging
    import warnings

    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        return
    own = "|".join(_OWN)
    warnings.filterwarnings("ignore", module=rf"^(?!(?:{own})(?:\.|$))")
    for var in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("chromadb", "httpx", "httpcore", "onnxruntime", "opentelemetry", "langchain", "openai", "aiohttp"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _table(*columns: Any, **kw: Any) -> Table:
    from rich.table import Table

    return Table(*columns, **kw)


def _progress() -> Progress:
    """The progress bar of long commands (on stderr, so piped output stays clean)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    import asyncio  # not at module level: `--help` and argument errors never need an event loop

    return asyncio.run(coro)


def _fit_loop() -> str:
    """The event loop of a command that runs fits (``SYNTH_AGENT_EVENT_LOOP``); exit 2 naming it if unknown."""
    from synth_agent.runner import event_loop_name

    try:
        return event_loop_name()
    except ValueError as exc:
        _fail(str(exc), 2)


def _run_fits(coro: Coroutine[Any, Any, T], loop: str) -> T:
    """:func:`_run` for the commands that run fits: on uvloop unless asked otherwise, the start-up heap
    frozen (:mod:`synth_agent.runner`)."""
    from synth_agent.runner import run_fits

    return run_fits(coro, loop=loop)


def _fail(msg: str, code: int = 1) -> NoReturn:
    """Print ``error: msg`` (one line; user data in it is escaped, never read as markup) and exit."""
    err.print(f"[bold red]error:[/] {escape(' '.join(msg.split()))}", highlight=False)
    raise typer.Exit(code)


def _check_user(value: Any) -> Any:
    """Option callback: user ids are validated before anything is opened (exit 2 with the reason)."""
    from synth_agent.ids import validate_user_id

    for v in value if isinstance(value, list | tuple) else [value]:
        if v is None:
            continue
        try:
            validate_user_id(v)
        except ValueError as exc:
            raise typer.BadParameter(str(exc).replace("user_id", "the user id")) from None
    return value


def _check_tenant(value: str) -> str:
    from synth_agent.ids import validate_user_id

    try:
        return validate_user_id(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc).replace("user_id", "the tenant")) from None


def _check_texts(value: Any) -> Any:
    """Option callback for free text (prompts, answers): must be valid Unicode (argv may carry bad bytes)."""
    from synth_agent.ids import check_text

    for v in value if isinstance(value, list | tuple) else [value]:
        if isinstance(v, str):
            try:
                check_text(v, "the text")
            except ValueError as exc:
                raise typer.BadParameter(str(exc)) from None
    return value


def _bad(option: str, message: str) -> NoReturn:
    raise typer.BadParameter(message, param_hint=f"'{option}'")


UserOpt = Annotated[str, typer.Option("--user", "-u", help="User id.", callback=_check_user)]


@app.callback()
def main_options(
    ctx: typer.Context,
    home: Annotated[Path | None, typer.Option(help="Data directory (env SYNTH_AGENT_HOME).")] = None,
    tenant: Annotated[str, typer.Option(help="Tenant namespace for votes and personas.",
                                        callback=_check_tenant)] = "default",
    base_url: Annotated[str | None, typer.Option(help="OpenAI-compatible endpoint (env OPENAI_BASE_URL).")] = None,
    model: Annotated[str | None, typer.Option(help="Model name (env SYNTH_AGENT_MODEL).")] = None,
    api_key: Annotated[str | None, typer.Option(help="API key (env OPENAI_API_KEY).")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback when a command fails.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="Also show libraries' warnings, progress bars and "
                                          "info logs (hidden by default).")] = False,
) -> None:
    """Global options apply to every command.

    Exit codes: 0 success; 1 the command failed (unreadable file, nothing found, endpoint or
    store error, declined confirmation); 2 invalid input (bad option or user id, invalid vote
    lines); 130 interrupted; 143 terminated.
    """
    quiet_third_party(verbose=verbose)
    overrides: dict[str, Any] = {}
    if home is not None:
        overrides["home"] = home
    if base_url is not None:
        overrides["base_url"] = base_url
    if model is not None:
        overrides["model"] = model
    if api_key is not None:
        overrides["api_key"] = api_key
    ctx.obj = CLIState(overrides, tenant, debug)


def _state(ctx: typer.Context) -> CLIState:
    assert isinstance(ctx.obj, CLIState)
    return ctx.obj


def _via_serve(st: CLIState, method: str, path: str, *, missing: str | None = None) -> Any:
    """Ask the ``synth-agent serve`` that owns this home (docs/cli.md, "Start-up time"); the reply, or
    None when none runs (or it cannot be reached): then the command opens the store itself.

    ``missing``: the error shown for a 404 (e.g. no persona yet); other errors fail the command.
    """
    from synth_agent.local_service import ServiceUnavailable, find

    svc = find(st.home)
    if svc is None:
        return None
    try:
        reply = svc.request(method, path, tenant=st.tenant)
    except ServiceUnavailable:
        return None
    except OSError as exc:  # connected, then no answer in time
        _fail(f"the running synth-agent serve (pid {svc.pid}, {svc.url}) did not answer: {_one_line(exc)}")
    if reply.status == 404 and missing is not None:
        _fail(missing)
    if reply.status != 200:
        message, _code = reply.error
        _fail(f"the running synth-agent serve (pid {svc.pid}) answered {reply.status}: {message}")
    return reply


def _user_path(user: str, rest: str = "") -> str:
    from urllib.parse import quote

    return f"/v1/users/{quote(user, safe='')}{rest}"


# ---------------------------------------------------------------- votes


def _read_votes(file: Path, st: CLIState) -> Any:
    """Parse a vote file, printing each invalid line as ``file:line: reason`` on stderr.

    A file that cannot be read as UTF-8 text fails the command (exit 1) before anything is stored.
    """
    from synth_agent.ingest import UnreadableVoteFile, read_jsonl

    try:
        parsed = read_jsonl(file, max_content_chars=st.settings.max_content_chars)
    except (FileNotFoundError, UnreadableVoteFile) as exc:
        _fail(str(exc))
    for issue in parsed.issues:
        err.print(f"[yellow]{escape(str(file))}:{issue.line}:[/] {escape(issue.error)}", highlight=False)
    return parsed


@app.command()
def ingest(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="Votes as JSONL, one vote per line.", exists=False)],
) -> None:
    """Validate and store votes from a JSONL file. Invalid lines are reported and skipped (exit 2)."""
    from synth_agent.services import open_memory

    st = _state(ctx)
    parsed = _read_votes(file, st)
    if not parsed.votes:
        _fail(f"no valid votes in {file} ({len(parsed.issues)} invalid line(s))", 2)

    async def go() -> tuple[int, int, dict[str, int]]:
        memory = open_memory(st.settings, st.tenant)
        res = await memory.add_votes(parsed.votes)
        users = sorted({v.user_id for v in parsed.votes})
        counts = {u: await memory.count_votes(u) for u in users}
        return res.added, res.duplicates, counts

    added, dups, counts = _run(go())
    out.print(
        f"[green]ingested[/] {added} new vote(s), {dups} already stored, "
        f"{len(parsed.issues)} invalid line(s) skipped, {len(counts)} user(s)."
    )
    table = _table("user", "votes stored")
    for u, n in counts.items():
        table.add_row(escape(u), str(n))
    out.print(table)
    if parsed.issues:
        raise typer.Exit(2)


@app.command()
def votes(
    ctx: typer.Context,
    user: UserOpt,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSONL.")] = False,
) -> None:
    """List a user's votes in time order."""
    st = _state(ctx)
    reply = _via_serve(st, "GET", _user_path(user, "/votes"))
    if reply is not None:
        from synth_agent.models import Vote

        vs = [Vote.model_validate(v) for v in reply.json()["data"]]
    else:
        from synth_agent.services import open_view

        with open_view(st.settings, st.tenant) as memory:
            vs = _run(memory.list_votes(user))
    if as_json:
        for v in vs:
            print(v.model_dump_json())
        return
    table = _table("#", "id", "time", "prompt", "chosen", title=f"{len(vs)} vote(s) of {escape(user)}")
    for i, v in enumerate(vs, 1):
        table.add_row(
            str(i), escape(v.id), v.timestamp.isoformat() if v.timestamp else "-",
            escape(v.query_text[:50]), escape(v.chosen[:50].replace("\n", " ")),
        )
    out.print(table)


@app.command()
def forget(
    ctx: typer.Context,
    user: UserOpt,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation (needed without a terminal).")] = False,
) -> None:
    """Delete everything stored about a user: votes, personas, history, cached judgments, checkpoints.

    Returns once the erasure is on disk (docs/store.md). Asks for confirmation; without a
    terminal (a pipe, a script, CI) it refuses unless ``--yes``.
    """
    from synth_agent.services import open_memory

    st = _state(ctx)
    if not yes:
        if not sys.stdin.isatty():
            _fail(f"refusing to forget {user!r} without confirmation: standard input is not a terminal; "
                  "pass --yes to confirm")
        if not typer.confirm(f"Forget everything about {user!r}?", default=False):
            _fail(f"{user!r} was not forgotten: confirmation declined")
    reply = _via_serve(st, "DELETE", _user_path(user))
    if reply is not None:  # the server erased it, as DELETE /v1/users/{user} does for an API client
        counts = reply.json()["deleted"]
        if not reply.erases_checkpoints:  # a server without inline synthesis leaves them to us, as when none runs
            _run(_erase_checkpoints(st.home, st.tenant, user))
    else:
        from synth_agent.scale.settings import ScaleSettings  # cheap: pydantic-settings only, no engine

        dsn = ScaleSettings().queue
        nothing = None if dsn else _nothing_to_forget(st, user)

        async def go() -> dict[str, int]:
            if nothing is not None:  # nothing stored: no store write, but checkpoints may still hold votes
                await _erase_checkpoints(st.home, st.tenant, user)
                return nothing
            memory = open_memory(st.settings, st.tenant, queue=dsn)
            if dsn:  # scale-out mode: also stop the user's jobs and erase them from Postgres (docs/deploy.md)
                from synth_agent.scale.queue import forget_everywhere

                return await forget_everywhere(dsn, memory, user)
            versions = len(await memory.persona_history(user))
            done: dict[str, int] = await memory.forget_user(user)
            await _erase_checkpoints(st.home, st.tenant, user, versions)
            return done

        counts = _run(go())
    _clear_disk_llm_cache(st.home)
    out.print(f"forgot {escape(repr(user))}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))


def _nothing_to_forget(st: CLIState, user: str) -> dict[str, int] | None:
    """Zero counts when the local store holds nothing of ``user`` (not one item, no entry in the user
    list), found by reading it without LangGraph (:func:`synth_agent.services.open_view`); else None.

    Erasing needs the full store (its writer, journal and key destruction); forgetting a user it
    holds nothing of needs no store write, so that case is answered without opening it. None too
    when the store cannot be read that way (then the full store decides, as before).
    """
    from store.memory_view import KINDS
    from synth_agent.services import open_view

    with open_view(st.settings, st.tenant, full=False) as view:
        if view is None or _run(view.holds(user)):
            return None
    return dict.fromkeys(KINDS, 0)


async def _erase_checkpoints(home: Path, tenant: str, user: str, versions: int = 0) -> None:
    """Erase the user's synthesis checkpoint threads in ``<home>/checkpoints.sqlite`` (they hold the votes too)."""
    if (home / "checkpoints.sqlite").exists():
        from graphs.synthesis import erase_synthesis_checkpoints, open_checkpointer

        async with open_checkpointer(home) as cp:  # every thread of the user, by prefix
            await erase_synthesis_checkpoints(cp, tenant, user, versions)


def _clear_disk_llm_cache(home: Path) -> None:
    """Empty ``<home>/llm-cache.sqlite`` if a run kept one (``SYNTH_AGENT_LLM_DISK_CACHE=1``).

    Its prompts quote users' votes and are addressed by a hash of the whole prompt, so one
    user's entries cannot be picked out: forgetting anyone drops every cached answer (the
    rows' bytes overwritten, the WAL truncated).
    """
    path = home / "llm-cache.sqlite"
    if path.exists():
        from synth_agent.llm.cache import SqliteCache

        cache = SqliteCache(path)
        try:
            _run(cache.clear())
        finally:
            cache.close()


@app.command()
def reindex(ctx: typer.Context) -> None:
    """Re-embed every stored item with a new embedding model."""
    from synth_agent.services import open_store

    st = _state(ctx)
    store = open_store(st.settings, reindex=True)
    out.print(f"re-embedded {store.reindexed} item(s) with {store.embedding_model}")


store_app = typer.Typer(help="Store maintenance.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(store_app, name="store", short_help="Store maintenance (compact).")


@store_app.command("compact")
def store_compact(ctx: typer.Context) -> None:
    """Copy the live records into new collections and drop the old ones (frees what deletes left behind).

    Refused while `synth-agent serve` or `worker` owns the store (it compacts on its own: SYNTH_AGENT_COMPACT_RATIO).
    """
    from synth_agent.services import open_store

    st = _state(ctx)
    store = open_store(st.settings)
    try:
        with _progress() as bar:
            tasks: dict[str, Any] = {}

            def progress(label: str, done: int, total: int) -> None:
                if total >= 5000:  # progress only where a copy takes a while
                    if label not in tasks:
                        tasks[label] = bar.add_task(f"copying {label}", total=total)
                    bar.update(tasks[label], completed=done)

            res = store.compact(progress=progress)
    finally:
        store.close()
    out.print(f"[green]compacted[/] the store: generation {res.generation}, {res.items} item(s), {res.vectors} "
              f"vector(s), {res.namespaces} namespace(s) copied in {res.seconds:.1f}s; {res.deleted_before} "
              "deleted record(s) no longer held.")


# ---------------------------------------------------------------- simulator


SIM_PREFIX_CACHE_TOKENS = 262_144
"""``synth_agent.sim.prefix_cache.DEFAULT_CAPACITY_TOKENS``, spelled out: importing the simulator here would
slow every command's start."""


@app.command("sim-endpoint")
def sim_endpoint(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.", min=0, max=65535)] = 8765,
    latency_ms: Annotated[float, typer.Option(help="Added latency per request.", min=0)] = 0.0,
    per_token_latency_ms: Annotated[float, typer.Option(help="Added latency per generated token.", min=0)] = 0.0,
    fault_rate: Annotated[float, typer.Option(
        help="Share of requests that fail (500/429/timeout/malformed).", min=0, max=1)] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of the simulated LLM and of fault injection.")] = 0,
    prefix_cache_tokens: Annotated[int, typer.Option(
        help="Capacity in tokens of the modelled automatic prefix cache (usage reports "
        "prompt_tokens_details.cached_tokens like vLLM); 0 turns it off.", min=0)] = SIM_PREFIX_CACHE_TOKENS,
) -> None:
    """Run the offline simulated LLM (OpenAI-compatible).

    Request counters, the most requests in flight and the prompt tokens its prefix cache served at /stats.
    """
    from synth_agent.sim.server import serve_sim

    err.print(f"simulator on http://{host}:{port}/v1 — point OPENAI_BASE_URL there; Ctrl-C stops it")
    serve_sim(
        host=host, port=port, latency_ms=latency_ms, per_token_latency_ms=per_token_latency_ms,
        fault_rate=fault_rate, seed=seed, prefix_cache_tokens=prefix_cache_tokens,
    )


@app.command("sim-population")
def sim_population(
    users: Annotated[int, typer.Option(help="Number of simulated users.")] = 20,
    votes_per_user: Annotated[int, typer.Option("--votes", help="Votes per user.")] = 15,
    seed: Annotated[int, typer.Option(help="Population seed.")] = 0,
    out_path: Annotated[Path, typer.Option("--out", help="Output JSONL file.")] = Path("votes.jsonl"),
) -> None:
    """Write a seeded simulated population's votes as JSONL."""
    from synth_agent.sim.population import write_population_jsonl

    if users < 1:
        _bad("--users", "must be at least 1")
    if votes_per_user < 1:
        _bad("--votes", "must be at least 1")
    write_population_jsonl(out_path, users, votes_per_user, seed)
    out.print(f"wrote {users * votes_per_user} votes of {users} users to {out_path}")


# ---------------------------------------------------------------- engine


def _fit_config(**kw: Any) -> Any:
    from synth_agent.engine import FitConfig

    try:
        return FitConfig(**kw)
    except ValueError as exc:
        _fail(str(exc), 2)


@app.command()
def fit(
    ctx: typer.Context,
    user: Annotated[list[str] | None, typer.Option("--user", "-u", help="User id (repeatable).",
                                                   callback=_check_user)] = None,
    all_users: Annotated[bool, typer.Option("--all", help="Fit every user with enough votes.")] = False,
    trials: Annotated[int, typer.Option(help="Bootstrap trials (step 1).")] = 4,
    candidates: Annotated[int, typer.Option(help="Demo-set candidates (step 3).")] = 4,
    seed: Annotated[int, typer.Option(help="Seed for splits and random search.")] = 0,
    concurrency: Annotated[int, typer.Option(help="Users fitted at once.")] = 8,
    full: Annotated[bool, typer.Option("--full", help="Refit from scratch even after only a few new votes.")] = False,
) -> None:
    """Learn a persona + demos from a user's stored votes.

    Saved as a new persona version; a user without new votes since the last fit is left as is, and after a
    few new votes only those are judged (the persona is kept unless they show it stale; --full refits all).
    """
    if not user and not all_users:
        _fail("say which users: --user U (repeatable) or --all", 2)
    if concurrency < 1:
        _bad("--concurrency", "must be at least 1")
    from synth_agent.engine import Synthesizer
    from synth_agent.runner import freeze_heap
    from synth_agent.services import open_services, simulator_if_needed

    st = _state(ctx)
    cfg = _fit_config(n_trials=trials, n_demo_candidates=candidates, seed=seed, incremental=not full)
    loop = _fit_loop()
    with simulator_if_needed(st.settings) as settings:
        import asyncio

        async def go() -> list[Any]:
            async with open_services(settings, st.tenant) as svc:
                freeze_heap()  # the store's and the embedder's start-up objects too
                users = list(user or []) or await svc.memory.list_users()
                synth = Synthesizer(svc.llm, svc.memory, cfg)
                sem = asyncio.Semaphore(concurrency)
                with _progress() as prog:
                    task = prog.add_task("fitting users", total=len(users))

                    async def one(u: str) -> Any:
                        async with sem:
                            r = await synth.fit(u)
                        prog.advance(task)
                        return r

                    results = await asyncio.gather(*(one(u) for u in users), return_exceptions=True)
                return list(zip(users, results, strict=True))

        results = _run_fits(go(), loop)
    table = _table("user", "result", "val acc", "LLM requests")
    failed = 0
    for u, r in results:
        if isinstance(r, BaseException):
            failed += 1
            table.add_row(escape(u), f"[red]failed: {escape(_one_line(r))}[/]", "-", "-")
        elif r.profile is None:
            table.add_row(escape(u), f"[yellow]{escape(r.message)}[/]", "-", "-")
        else:
            acc = r.profile.val_accuracy  # None: the demos were not raced (the guard serves no demos)
            table.add_row(escape(u), f"persona v{r.profile.version}", f"{acc:.0%}" if acc is not None else "-",
                          str(r.usage.get("llm_requests", 0)))
    out.print(table)
    if failed:
        raise typer.Exit(1)


@app.command()
def persona(
    ctx: typer.Context,
    user: UserOpt,
    history: Annotated[bool, typer.Option(help="Show every version, oldest first.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show a user's current persona (or its history)."""
    from synth_agent.lift import history_rows

    st = _state(ctx)
    none_yet = f"no persona for {user!r} yet: ingest votes, then run `synth-agent fit --user {user}`"
    reply = _via_serve(st, "GET", _user_path(user, "/persona/history" if history else "/persona"), missing=none_yet)
    lift: Any = None  # None: the server's profiles carry their live figures (meta.live)
    if reply is not None:
        from synth_agent.models import PersonaProfile

        body = reply.json()
        profiles = [PersonaProfile.model_validate(p) for p in (body["data"] if history else [body])]
    else:
        from synth_agent.lift import load_user_lift, with_live
        from synth_agent.services import open_view

        with open_view(st.settings, st.tenant) as memory:
            profiles = (_run(memory.persona_history(user)) if history
                        else [p for p in [_run(memory.current_persona(user))] if p])
            if profiles:
                lift = _run(load_user_lift(memory, user))
                profiles = [with_live(p, lift) for p in profiles]
    if not profiles:
        _fail(none_yet)
    if as_json:
        print(json.dumps([json.loads(p.model_dump_json()) for p in profiles], indent=2, ensure_ascii=False)
              if history else profiles[0].model_dump_json(indent=2))
        return
    for p, row in zip(profiles, history_rows(profiles, lift), strict=True):
        acc = f"{p.val_accuracy:.0%}" if p.val_accuracy is not None else "-"
        out.rule(f"{escape(p.user_id)} · v{p.version} · {p.created_at:%Y-%m-%d %H:%M} · val acc {acc} · "
                 f"{len(p.demos)} demos")
        out.print(_drift_line(row), markup=False, highlight=False)
        out.print(p.persona, markup=False, highlight=False)


def _drift_line(row: dict[str, Any]) -> str:
    """One version's served configuration, cross-validated accuracy and live A/B win rate, in words."""
    cv = row["cv_accuracy"]
    cv_text = (f"cross-validated {cv:.0%} vs default {row['cv_default']:.0%}" if cv is not None
               and row["cv_default"] is not None else "not cross-validated (fitted before selection)")
    live = row["live"]
    live_text = (f"live: personalized won {live['wins']}/{live['votes']} A/B votes "
                 f"({live['win_rate']:.0%}, 95% CI {live['ci_low']:.0%}–{live['ci_high']:.0%})"
                 if live["votes"] else "live: no A/B votes yet")
    served = row["served"] + (" (demoted by live votes)" if row["demoted"] else "")
    return f"serves {served} · {cv_text} · {live_text}"


def _current_profile(st: CLIState, user: str) -> Any:
    from synth_agent.services import open_view

    with open_view(st.settings, st.tenant) as memory:
        return _run(memory.current_persona(user))


@app.command()
def judge(
    ctx: typer.Context,
    user: Annotated[str, typer.Option("--user", "-u", help="User id (default judge if no persona).",
                                      callback=_check_user)],
    prompt: Annotated[str, typer.Option(help="The user's message both responses answer.", callback=_check_texts)],
    a: Annotated[str, typer.Option("--a", help="Response A.", callback=_check_texts)],
    b: Annotated[str, typer.Option("--b", help="Response B.", callback=_check_texts)],
    mode: Annotated[str, typer.Option(help="cot or logprob.")] = "cot",
) -> None:
    """Which of two responses would this user prefer?

    Judged in both orders with the user's persona and demos (the default judge without a persona).
    """
    if mode not in ("cot", "logprob"):
        _bad("--mode", "must be 'cot' or 'logprob'")
    if not prompt.strip():
        _bad("--prompt", "must not be empty")
    if a.strip() == b.strip():
        _bad("--b", "the two responses are identical; nothing to judge")
    from synth_agent.engine import Judge
    from synth_agent.models import Message
    from synth_agent.services import open_llm, simulator_if_needed

    st = _state(ctx)
    profile = _current_profile(st, user)
    with simulator_if_needed(st.settings) as settings:

        async def go() -> Any:
            llm = open_llm(settings)
            try:
                j = Judge.from_profile(llm, profile, mode=mode)
                return await j.compare([Message(role="user", content=prompt)], a, b)
            finally:
                await llm.aclose()

        res = _run(go())
    who = f"persona v{profile.version}" if profile else "default judge (no persona yet)"
    out.print(f"[bold]{res.preferred}[/] (confidence {res.confidence:.2f}, P(A)={res.p_a:.2f}) — {who}")
    if res.reasoning:
        out.print(res.reasoning, markup=False, highlight=False)


@app.command()
def rerank(
    ctx: typer.Context,
    user: UserOpt,
    prompt: Annotated[str, typer.Option(help="The user's message the candidates answer.", callback=_check_texts)],
    candidate: Annotated[list[str], typer.Option("--candidate", "-c", help="A candidate (repeat, at least 2).",
                                                 callback=_check_texts)],
    strategy: Annotated[str, typer.Option(help="knockout or round_robin.")] = "knockout",
) -> None:
    """Rank candidate responses with the user's judge."""
    if len(candidate) < 2:
        _bad("--candidate", "give at least two")
    if any(not c.strip() for c in candidate):
        _bad("--candidate", "every candidate must be non-empty text")
    if strategy not in ("knockout", "round_robin"):
        _bad("--strategy", "must be 'knockout' or 'round_robin'")
    if not prompt.strip():
        _bad("--prompt", "must not be empty")
    from synth_agent.engine import Judge, rank
    from synth_agent.models import Message
    from synth_agent.services import open_llm, simulator_if_needed

    st = _state(ctx)
    profile = _current_profile(st, user)
    with simulator_if_needed(st.settings) as settings:

        async def go() -> Any:
            llm = open_llm(settings)
            try:
                return await rank(
                    Judge.from_profile(llm, profile), [Message(role="user", content=prompt)], candidate,
                    strategy=strategy,  # type: ignore[arg-type]
                )
            finally:
                await llm.aclose()

        res = _run(go())
    table = _table("rank", "candidate", "score", title=f"winner: candidate {res.winner + 1}")
    for r, i in enumerate(res.order, 1):
        table.add_row(str(r), f"{i + 1}: {escape(candidate[i][:60])}", f"{res.scores[i]:.3f}")
    out.print(table)


@app.command("export-prompt")
def export_prompt(
    ctx: typer.Context,
    user: UserOpt,
    fmt: Annotated[str, typer.Option("--format", help="system | messages | json")] = "system",
) -> None:
    """Export a user's persona as a prompt, messages or JSON.

    ``system``: a system prompt for any model; ``messages``: the judge's prompt as chat messages;
    ``json``: the whole profile.
    """
    if fmt not in ("system", "messages", "json"):
        _bad("--format", "must be one of: system, messages, json")
    st = _state(ctx)
    none_yet = f"no persona for {user!r} yet: run `synth-agent fit --user {user}` first"
    reply = _via_serve(st, "GET", _user_path(user, f"/prompt?format={fmt}"), missing=none_yet)
    if reply is not None:  # the same export_profile text, made by the server
        print(reply.body.decode("utf-8"))
        return
    from synth_agent.export import export_profile

    profile = _current_profile(st, user)
    if profile is None:
        _fail(none_yet)
    print(export_profile(profile, fmt))  # type: ignore[arg-type]


@app.command()
def report(
    ctx: typer.Context,
    user: Annotated[str | None, typer.Option("--user", "-u", help="One user (default: the whole tenant).")] = None,
    plot: Annotated[Path, typer.Option("--plot", help="Where to write the plot (PNG).")] = Path("lift.png"),
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Live lift: how often users pick the personalized answer in A/B votes, per user and persona version.

    Prints the tenant's (or one user's) win rate of personalized vs plain answers with 95% intervals,
    each user's served configuration and cross-validated accuracy, and writes a plot of the win rate
    over time with persona versions marked.
    """
    from synth_agent.report import collect, write_lift_plot
    from synth_agent.services import open_memory

    st = _state(ctx)
    if user is not None:
        _check_user(user)
    memory = open_memory(st.settings, st.tenant)
    rep = _run(collect(memory, [user] if user is not None else None))
    if user is not None and not rep.users:
        _fail(f"nothing stored for {user!r} in tenant {st.tenant!r}")
    if as_json:
        print(json.dumps(rep.as_dict(), indent=2, ensure_ascii=False))
    else:
        t = rep.total
        lo, hi = t.interval()
        scope = f"user {user!r}" if user else f"tenant {st.tenant!r} ({len(rep.users)} users)"
        out.print(f"live lift for {escape(scope)}: personalized won {t.wins} of {t.n} A/B votes"
                  + (f" = {t.rate:.0%} (95% CI {lo:.0%}–{hi:.0%})" if t.n else ""))
        table = _table("user", "version", "serves", "cross-validated", "live A/B (won/votes)", "95% CI",
                      title="Per user, current persona version")
        for u in rep.users:
            row = u.rows[-1] if u.rows else None
            if row is None:
                table.add_row(escape(u.user_id), "-", "default", "-", f"{u.lift.overall.wins}/{u.lift.overall.n}", "-")
                continue
            live = row["live"]
            cv = row["cv_accuracy"]
            table.add_row(
                escape(u.user_id), f"v{row['version']}",
                row["served"] + (" (demoted)" if row["demoted"] else ""),
                f"{cv:.0%} vs {row['cv_default']:.0%}" if cv is not None and row["cv_default"] is not None else "-",
                f"{live['wins']}/{live['votes']}",
                f"{live['ci_low']:.0%}–{live['ci_high']:.0%}" if live["votes"] else "-",
            )  # fmt: skip
        out.print(table)
    if rep.total.n:
        write_lift_plot(rep, plot, title=f"user {user}" if user else f"tenant {st.tenant}")
        (err if as_json else out).print(f"plot: {plot}")
    else:
        (err if as_json else out).print("no A/B votes between a personalized and a plain answer yet: no plot")


@app.command("eval")
def eval_cmd(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="Votes JSONL (uses `split` when present).")],
    methods: Annotated[str, typer.Option(help="Comma-separated methods (served: what the per-user guard serves).")] = "default,persona,demos,persona_demos,served,unverified,memory",
    out_dir: Annotated[Path, typer.Option("--out", help="Directory for report.json and plots.")] = Path("eval-out"),
    curve: Annotated[str, typer.Option(help="Context sizes for the accuracy-vs-votes curve, e.g. 5,7,10 ('' = off).")] = "5,7,10",
    seed: Annotated[int, typer.Option(help="Seed for splits and random search.")] = 0,
    concurrency: Annotated[int, typer.Option(help="Users evaluated at once.")] = 8,
    trials: Annotated[int, typer.Option(help="Bootstrap trials.")] = 4,
    candidates: Annotated[int, typer.Option(help="Demo-set candidates.")] = 4,
) -> None:
    """Evaluate judges on held-out votes: accuracy, plots.

    Accuracy per method with 95% CIs, a per-user table, report.json and plots in --out.
    """
    try:
        sizes = [int(x) for x in curve.split(",") if x.strip()] if curve else []
    except ValueError:
        _bad("--curve", f"must be comma-separated vote counts such as 5,7,10, got {curve!r}")
    if any(n < 1 for n in sizes):
        _bad("--curve", "vote counts must be at least 1")
    if concurrency < 1:
        _bad("--concurrency", "must be at least 1")
    from synth_agent.evaluate import ALL_METHODS, evaluate, write_plots
    from synth_agent.services import open_llm, simulator_if_needed

    st = _state(ctx)
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in method_list if m not in ALL_METHODS]
    if unknown or not method_list:
        _bad("--methods", f"unknown method(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(ALL_METHODS)}")
    cfg = _fit_config(seed=seed, n_trials=trials, n_demo_candidates=candidates)
    parsed = _read_votes(file, st)
    n_users = len({v.user_id for v in parsed.votes})
    loop = _fit_loop()
    with simulator_if_needed(st.settings) as settings:

        async def go() -> Any:
            llm = open_llm(settings)
            try:
                with _progress() as prog:
                    task = prog.add_task("evaluating users", total=n_users)
                    return await evaluate(
                        llm, parsed.votes, methods=method_list, config=cfg, concurrency=concurrency,
                        curve_sizes=sizes, on_user_done=lambda _u: prog.advance(task),
                    )
            finally:
                await llm.aclose()

        try:
            report = _run_fits(go(), loop)
        except ValueError as exc:
            _fail(str(exc))
    print_user_table(report)
    print_report(report)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(report.to_json())
    plots = write_plots(report, out_dir)
    out.print(f"report: {out_dir / 'report.json'}; plots: {', '.join(str(p) for p in plots)}")


def print_user_table(report: Any, limit: int = 50) -> None:
    methods = list(report.methods)
    from rich.table import Column

    # method headers wrap at their underscores, never ellipsize: at 80 columns "persona" and
    # "persona_demos" must not both read "perso…"; user ids are cut (the JSON report has them whole)
    table = _table(Column("user", overflow="ellipsis", no_wrap=True, max_width=18), Column("ctx", min_width=3),
                   Column("held-out", overflow="fold", min_width=4),
                   *(Column(m.replace("_", " "), overflow="fold", justify="right", min_width=5) for m in methods),
                   title="Per-user accuracy (both orders; ctx: votes seen, held-out: votes judged)")
    for u in report.users[:limit]:
        cells = [f"{a:.0%}" if (a := u.accuracy(m)) is not None else "-" for m in methods]
        table.add_row(escape(u.user_id), str(u.n_context), str(u.n_target), *cells)
    out.print(table)
    if len(report.users) > limit:
        out.print(f"... {len(report.users) - limit} more user(s) in report.json")


def print_report(report: Any) -> None:
    table = _table("method", "accuracy", "95% CI", "users", "judgments", title="Accuracy on held-out votes (both orders)")
    for m, s in report.methods.items():
        table.add_row(m, f"{s.accuracy:.1%}", f"{s.ci_low:.1%} – {s.ci_high:.1%}", str(s.n_users), str(s.n_judgments))
    out.print(table)
    if "default" in report.methods:
        for m in ("persona_demos", "served"):
            if m in report.methods:
                below, level, above = report.versus_default(m)
                out.print(f"{m} vs the default judge, per user: below for {below}, level for {level}, above for {above}")
    if "served" in report.methods:
        served = [u.selection["served"] for u in report.users if u.selection]
        out.print("the per-user guard serves: " + ", ".join(
            f"{c} to {served.count(c)}" for c in ("persona_demos", "persona", "demos", "default")))
    if report.curve:
        slope = f"{report.curve_slope * 100:+.2f} points per vote" if report.curve_slope is not None else "-"
        out.print("accuracy vs context votes: " + ", ".join(
            f"{c.n_context}: {c.accuracy:.1%}" for c in report.curve) + f" (slope {slope})")
    if report.skipped_users:
        out.print(f"[yellow]{len(report.skipped_users)} user(s) skipped[/] (e.g. "
                  + escape("; ".join(f"{u}: {r}" for u, r in list(report.skipped_users.items())[:3])) + ")")


def _register_subcommands() -> None:
    from synth_agent.judge_server import judge_server_app
    from synth_agent.proxy.cli import register as register_proxy

    app.add_typer(judge_server_app, name="judge-server", short_help="Launch a self-hosted judge (vLLM or SGLang).")
    register_proxy(app)


_register_subcommands()


def _one_line(exc: BaseException) -> str:
    """An exception as one readable line (pydantic errors as ``field: reason``)."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        from synth_agent.ingest import describe_validation_error

        text = describe_validation_error(exc)
    elif isinstance(exc, OSError) and exc.strerror:
        text = f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    else:
        text = str(exc)
    text = " ".join(text.split())
    name = type(exc).__name__
    if not text:
        return name
    if isinstance(exc, ValueError | OSError) or type(exc).__module__.startswith("synth_agent"):
        return text
    return f"{name}: {text}"


def run(argv: Sequence[str] | None = None) -> int:
    """Run the CLI on ``argv`` and return the exit code (see :data:`EXIT_CODES`); never raises for bad input.

    Usage errors and failures print one ``error: ...`` line on stderr; ``--debug`` (or
    ``SYNTH_AGENT_DEBUG=1``) re-raises unexpected exceptions with their traceback.
    """
    from synth_agent.lifecycle import exit_on_sigterm, watch_parent_from_env

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args[: args.index("--")] if "--" in args else "--debug" in args
    debug = debug or os.environ.get("SYNTH_AGENT_DEBUG", "") not in ("", "0")
    exit_on_sigterm()
    watch_parent_from_env()
    try:
        rv = app(args, prog_name="synth-agent", standalone_mode=False)
    except typer.TyperException as exc:  # usage errors (exit 2) and other CLI-level failures
        code = int(getattr(exc, "exit_code", 1))
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{escape(ctx.command_path)} --help')" if code == 2 and ctx is not None else ""
        err.print(f"[bold red]error:[/] {escape(' '.join(exc.format_message().split()))}{hint}", highlight=False)
        return code
    except (typer.Abort, KeyboardInterrupt):
        err.print("interrupted", highlight=False)
        return 130
    except Exception as exc:
        if debug:
            raise
        hint = "" if isinstance(exc, ValueError | OSError) else " (run with --debug for the traceback)"
        err.print(f"[bold red]error:[/] {escape(_one_line(exc))}{hint}", highlight=False)
        return 1
    return rv if isinstance(rv, int) else 0


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
