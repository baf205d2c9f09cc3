"""``serve`` and ``worker`` compact their store by default, at the ratio the README and docs/store.md give.

Compaction bounds what deleted records cost in Chroma's HNSW index (it never reuses their slots);
it is on by default since the soaks of 2026-12-02 (docs/store.md, "Compaction on by default").
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from synth_agent.config import Settings
from synth_agent.services import DEFAULT_COMPACT_RATIO, _compact_setting, open_store

REPO = Path(__file__).resolve().parents[1]


def test_the_default_ratio_is_the_documented_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SYNTH_AGENT_COMPACT_RATIO", raising=False)
    assert _compact_setting() == DEFAULT_COMPACT_RATIO == 1.0
    row = next(line for line in (REPO / "README.md").read_text().splitlines()
               if line.startswith("| `SYNTH_AGENT_COMPACT_RATIO`"))
    assert row.rstrip().rstrip("|").rsplit("|", 1)[1].strip() == "`1`"
    store_md = (REPO / "docs" / "store.md").read_text()
    assert re.search(r"`SYNTH_AGENT_COMPACT_RATIO`\s+\(default 1\b", store_md)
    monkeypatch.setenv("SYNTH_AGENT_COMPACT_RATIO", "")
    assert _compact_setting() == 1.0
    monkeypatch.setenv("SYNTH_AGENT_COMPACT_RATIO", "0")
    assert _compact_setting() == 0.0  # off, when asked
    monkeypatch.setenv("SYNTH_AGENT_COMPACT_RATIO", "-1")
    with pytest.raises(ValueError, match="SYNTH_AGENT_COMPACT_RATIO"):
        _compact_setting()


def test_a_served_store_compacts_on_its_own_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("SYNTH_AGENT_COMPACT_RATIO", "CHROMA_HOST", "CHROMA_PORT"):
        monkeypatch.delenv(var, raising=False)
    store = open_store(Settings(home=tmp_path / "home"), server=True)
    try:
        assert store.compact_ratio == 1.0 and store.restart_after_compact
    finally:
        store.close()
