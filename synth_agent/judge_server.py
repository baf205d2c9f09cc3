"""Launch a self-hosted judge model: vLLM or SGLang as an OpenAI-compatible server.

Why a local server: a personalized judge re-sends the same per-user prefix
(instruction + persona + demos) with every pair it judges, and best-of-n
reranking judges many pairs per request. A server with prefix caching (vLLM
``--enable-prefix-caching``, always added here; SGLang's radix cache, on by
default) computes that prefix once per user and only pays for the pair, and the
log-probability judge generates a single token. Together they make
personalized judging cheap enough for the request path.

``synth-agent judge-server vllm --model M`` builds the command, checks the
engine is installed, starts it, waits (bounded, with a spinner) until
``GET /v1/models`` answers, prints the settings to point synth-agent at it, and
stays in the foreground until Ctrl-C. ``--dry-run`` only prints the command.
Neither vLLM nor SGLang is a dependency of the default install
(``pip install 'synth-agent[gpu]'``).
"""

from __future__ import annotations

import importlib.util
import json
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.markup import escape

from synth_agent.lifecycle import parent_death_preexec

Engine = Literal["vllm", "sglang"]

__all__ = [
    "JudgeServerError",
    "ServerSpec",
    "endpoint_lines",
    "judge_server_app",
    "require_engine",
    "run_server",
    "wait_for_health",
]

_ENGINE_MODULE: dict[str, str] = {"vllm": "vllm", "sglang": "sglang"}
_ENGINE_NAME: dict[str, str] = {"vllm": "vLLM", "sglang": "SGLang"}


class JudgeServerError(RuntimeError):
    """The judge server could not be launched or did not become healthy; the message says what to do."""


@dataclass(frozen=True)
class ServerSpec:
    """Everything needed to start one judge server; :meth:`command` is the exact argv."""

    engine: Engine
    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    tensor_parallel: int = 1
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    served_model_name: str | None = None
    quantization: str | None = None
    api_key: str | None = None
    extra_args: tuple[str, ...] = ()
    python: str = field(default=sys.executable)

    def __post_init__(self) -> None:
        if self.engine not in _ENGINE_MODULE:
            raise ValueError(f"unknown engine {self.engine!r}; use 'vllm' or 'sglang'")
        if not self.model.strip():
            raise ValueError("--model must name a model (Hugging Face id or local path)")
        if self.tensor_parallel < 1:
            raise ValueError("--tensor-parallel must be at least 1 (number of GPUs)")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("--gpu-memory-utilization must be in (0, 1], e.g. 0.9")
        if not 0 < self.port < 65536:
            raise ValueError("--port must be between 1 and 65535")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError("--max-model-len must be positive")

    @property
    def model_name(self) -> str:
        """The name clients must send as ``model``."""
        return self.served_model_name or self.model

    @property
    def base_url(self) -> str:
        """Where clients reach the server (a wildcard bind address is replaced by this host's name)."""
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostname()
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/v1"

    @property
    def health_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else "::1" if self.host == "::" else self.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/v1"

    def command(self) -> list[str]:
        common_tail: list[str] = []
        if self.served_model_name:
            common_tail += ["--served-model-name", self.served_model_name]
        if self.quantization:
            common_tail += ["--quantization", self.quantization]
        if self.api_key:
            common_tail += ["--api-key", self.api_key]
        if self.engine == "vllm":
            cmd = [
                self.python, "-m", "vllm.entrypoints.openai.api_server",
                "--model", self.model,
                "--host", self.host,
                "--port", str(self.port),
                "--tensor-parallel-size", str(self.tensor_parallel),
                "--gpu-memory-utilization", f"{self.gpu_memory_utilization:g}",
                "--enable-prefix-caching",
            ]  # fmt: skip
            if self.max_model_len:
                cmd += ["--max-model-len", str(self.max_model_len)]
        else:  # SGLang: the radix (prefix) cache is on unless --disable-radix-cache is passed
            cmd = [
                self.python, "-m", "sglang.launch_server",
                "--model-path", self.model,
                "--host", self.host,
                "--port", str(self.port),
                "--tp", str(self.tensor_parallel),
                "--mem-fraction-static", f"{self.gpu_memory_utilization:g}",
            ]  # fmt: skip
            if self.max_model_len:
                cmd += ["--context-length", str(self.max_model_len)]
        return cmd + common_tail + list(self.extra_args)


def require_engine(engine: Engine, *, find_spec: Callable[[str], object | None] = importlib.util.find_spec) -> None:
    """Raise :class:`JudgeServerError` with the install command when the engine is not importable."""
    if find_spec(_ENGINE_MODULE[engine]) is not None:
        return
    name = _ENGINE_NAME[engine]
    hint = (
        "pip install 'synth-agent[gpu]'"
        if engine == "vllm"
        else "pip install 'sglang[all]' (or use vLLM: pip install 'synth-agent[gpu]')"
    )
    raise JudgeServerError(
        f"{name} is not installed in this Python environment ({sys.executable}). "
        f"Install it on the GPU machine with: {hint}. "
        "Run with --dry-run to print the launch command without starting it."
    )


def endpoint_lines(base_url: str, model: str, api_key: str | None = None) -> list[str]:
    """Settings that point synth-agent at the server: one endpoint, or a member of a pool."""
    lines = [f"OPENAI_BASE_URL={base_url}", f"SYNTH_AGENT_MODEL={model}"]
    if api_key:
        lines.append(f"OPENAI_API_KEY={api_key}")
    lines.append(f"SYNTH_AGENT_JUDGE_ENDPOINTS={base_url}")
    member: dict[str, str] = {"base_url": base_url, "model": model}
    lines.append("# pool file entry: " + json.dumps(member))
    return lines


async def wait_for_health(
    base_url: str,
    *,
    max_wait: float = 900.0,
    interval: float = 1.0,
    api_key: str | None = None,
    process: subprocess.Popen[bytes] | None = None,
    on_wait: Callable[[float], None] | None = None,
) -> list[str]:
    """Poll ``GET {base_url}/models`` until it lists a model; return the served model ids.

    Bounded by ``max_wait`` seconds. When ``process`` is given and exits first,
    fail at once instead of waiting out the timeout.
    """
    url = base_url.rstrip("/") + "/models"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    start = time.monotonic()
    last = "no answer yet"
    import asyncio

    import httpx  # here: `synth-agent --help` registers this command without importing an HTTP client

    async with httpx.AsyncClient(timeout=max(0.5, min(5.0, interval * 5))) as http:
        while True:
            if process is not None and (rc := process.poll()) is not None:
                raise JudgeServerError(f"the server process exited with code {rc} before {url} answered")
            try:
                r = await http.get(url, headers=headers)
                if r.status_code == 200:
                    ids = [str(m.get("id")) for m in r.json().get("data", []) if isinstance(m, dict)]
                    if ids:
                        return ids
                    last = "the server lists no models yet"
                else:
                    last = f"HTTP {r.status_code}"
            except (httpx.HTTPError, ValueError) as e:
                last = type(e).__name__
            elapsed = time.monotonic() - start
            if elapsed >= max_wait:
                raise JudgeServerError(
                    f"{url} did not become healthy within {max_wait:g}s (last: {last}). Loading large "
                    "models can take minutes: raise --health-timeout, or check the server log."
                )
            if on_wait is not None:
                on_wait(elapsed)
            await asyncio.sleep(min(interval, max(0.0, max_wait - elapsed)))


def _log_tail(path: Path | None, n: int = 20) -> str:
    if path is None or not path.is_file():
        return ""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:]
    return "\n".join(lines)


def _stop(process: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)  # both engines shut down cleanly (and free the GPU) on SIGINT
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


def run_server(
    cmd: Sequence[str],
    *,
    health_url: str,
    announce: Sequence[str],
    health_timeout: float = 900.0,
    log_file: Path | None = None,
    api_key: str | None = None,
    console: Console | None = None,
    foreground: bool = True,
) -> subprocess.Popen[bytes]:
    """Start ``cmd``, wait for health with a spinner, print ``announce`` to stdout, then (foreground) wait.

    The server gets its own session so Ctrl-C reaches only us; we then stop it
    politely (on SIGTERM too), and the kernel stops it if we are killed outright
    (a parent-death signal, :mod:`synth_agent.lifecycle`). With ``foreground=False`` the running process is returned instead.
    """
    console = console or Console(stderr=True)
    log_handle = log_file.open("ab") if log_file is not None else None
    try:
        process = subprocess.Popen(
            list(cmd),
            stdout=log_handle if log_handle is not None else None,
            stderr=subprocess.STDOUT if log_handle is not None else None,
            start_new_session=True,
            preexec_fn=parent_death_preexec(),  # the server dies with us even if we are killed outright
        )
    except OSError as e:
        if log_handle is not None:
            log_handle.close()
        raise JudgeServerError(f"could not start {cmd[0]!r}: {e}") from e
    try:
        where = f" (log: {log_file})" if log_file is not None else ""
        with console.status(f"waiting for {health_url}{where}") as status:

            def tick(elapsed: float) -> None:
                status.update(f"waiting for {health_url}{where} … {elapsed:.0f}s / {health_timeout:g}s")

            import asyncio

            ids = asyncio.run(
                wait_for_health(health_url, max_wait=health_timeout, api_key=api_key, process=process, on_wait=tick)
            )
        console.print(f"[green]judge server is up[/] serving {', '.join(ids)}; configure synth-agent with:")
        for line in announce:
            print(line, flush=True)
        if not foreground:
            return process
        console.print("Ctrl-C stops the server.")
        try:
            rc = process.wait()
        except (KeyboardInterrupt, SystemExit) as stopped:  # Ctrl-C, or SIGTERM (synth_agent.lifecycle)
            console.print("stopping the judge server …")
            _stop(process)
            if isinstance(stopped, SystemExit):
                raise
            return process
        raise JudgeServerError(f"the judge server exited with code {rc}")
    except JudgeServerError as e:
        _stop(process)
        tail = _log_tail(log_file)
        raise JudgeServerError(f"{e}" + (f"\nlast lines of {log_file}:\n{tail}" if tail else "")) from None
    except (KeyboardInterrupt, SystemExit):
        _stop(process)
        raise
    finally:
        if log_handle is not None:
            log_handle.close()


# ------------------------------------------------------------------ CLI

judge_server_app = typer.Typer(
    name="judge-server",
    help=(
        "Launch a self-hosted judge model (vLLM or SGLang) as an OpenAI-compatible endpoint with "
        "prefix caching, and print how to point synth-agent (or an endpoint pool) at it."
    ),
    no_args_is_help=True,
    rich_markup_mode=None,
)

_PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Hugging Face model id or local path.")]
TPOpt = Annotated[int, typer.Option("--tensor-parallel", "--tp", min=1, help="GPUs to shard the model over.")]
MemOpt = Annotated[
    float, typer.Option("--gpu-memory-utilization", min=0.05, max=1.0, help="Share of GPU memory to use.")
]
LenOpt = Annotated[int | None, typer.Option("--max-model-len", min=1, help="Context length cap (saves KV memory).")]
PortOpt = Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")]
HostOpt = Annotated[str, typer.Option(help="Interface to bind (0.0.0.0 to serve other machines).")]
NameOpt = Annotated[str | None, typer.Option("--served-model-name", help="Model name clients send.")]
QuantOpt = Annotated[str | None, typer.Option("--quantization", "-q", help="e.g. fp8 or awq (70B on one GPU).")]
KeyOpt = Annotated[str | None, typer.Option("--api-key", help="Require this API key from clients.")]
TimeoutOpt = Annotated[float, typer.Option("--health-timeout", min=1.0, help="Seconds to wait for health.")]
LogOpt = Annotated[
    Path | None, typer.Option("--log-file", help="Write the server's output here (default: this terminal).")
]
DryOpt = Annotated[bool, typer.Option("--dry-run", help="Print the command and the settings; start nothing.")]


def _launch(spec: ServerSpec, *, dry_run: bool, health_timeout: float, log_file: Path | None) -> None:
    err = Console(stderr=True)
    announce = endpoint_lines(spec.base_url, spec.model_name, spec.api_key)
    if dry_run:
        print(shlex.join(spec.command()))
        for line in announce:
            print(line)
        return
    try:
        require_engine(spec.engine)
        run_server(
            spec.command(),
            health_url=spec.health_url,
            announce=announce,
            health_timeout=health_timeout,
            log_file=log_file,
            api_key=spec.api_key,
            console=err,
        )
    except JudgeServerError as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}")
        raise typer.Exit(1) from None


def _spec(engine: Engine, ctx: typer.Context, **kw: object) -> ServerSpec:
    try:
        return ServerSpec(engine=engine, extra_args=tuple(ctx.args), **kw)  # type: ignore[arg-type]
    except ValueError as e:
        Console(stderr=True).print(f"[bold red]error:[/] {escape(str(e))}")
        raise typer.Exit(2) from None


@judge_server_app.command("vllm", context_settings=_PASSTHROUGH)
def vllm(
    ctx: typer.Context,
    model: ModelOpt,
    tensor_parallel: TPOpt = 1,
    gpu_memory_utilization: MemOpt = 0.9,
    max_model_len: LenOpt = None,
    port: PortOpt = 8000,
    host: HostOpt = "127.0.0.1",
    served_model_name: NameOpt = None,
    quantization: QuantOpt = None,
    api_key: KeyOpt = None,
    health_timeout: TimeoutOpt = 900.0,
    log_file: LogOpt = None,
    dry_run: DryOpt = False,
) -> None:
    """Serve a judge with vLLM (prefix caching on). Extra arguments are passed to vLLM unchanged."""
    spec = _spec(
        "vllm", ctx, model=model, tensor_parallel=tensor_parallel, gpu_memory_utilization=gpu_memory_utilization,
        max_model_len=max_model_len, port=port, host=host, served_model_name=served_model_name,
        quantization=quantization, api_key=api_key,
    )  # fmt: skip
    _launch(spec, dry_run=dry_run, health_timeout=health_timeout, log_file=log_file)


@judge_server_app.command("sglang", context_settings=_PASSTHROUGH)
def sglang(
    ctx: typer.Context,
    model: ModelOpt,
    tensor_parallel: TPOpt = 1,
    gpu_memory_utilization: MemOpt = 0.9,
    max_model_len: LenOpt = None,
    port: PortOpt = 30000,
    host: HostOpt = "127.0.0.1",
    served_model_name: NameOpt = None,
    quantization: QuantOpt = None,
    api_key: KeyOpt = None,
    health_timeout: TimeoutOpt = 900.0,
    log_file: LogOpt = None,
    dry_run: DryOpt = False,
) -> None:
    """Serve a judge with SGLang (radix prefix cache on by default). Extra arguments go to SGLang."""
    spec = _spec(
        "sglang", ctx, model=model, tensor_parallel=tensor_parallel, gpu_memory_utilization=gpu_memory_utilization,
        max_model_len=max_model_len, port=port, host=host, served_model_name=served_model_name,
        quantization=quantization, api_key=api_key,
    )  # fmt: skip
    _launch(spec, dry_run=dry_run, health_timeout=health_timeout, log_file=log_file)
