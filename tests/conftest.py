"""Shared test setup. Keep it small: fixtures live next to the tests that use them."""

import os
import tempfile

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The int8 embedding build (store/embedding_build.py) goes to a directory of this run, never the
# user's ~/.cache; child processes started by tests inherit it.
os.environ.setdefault("SYNTH_AGENT_MODEL_CACHE", tempfile.mkdtemp(prefix="synth-agent-test-models-"))
