"""Shared test setup. Keep it small: fixtures live next to the tests that use them."""

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
