"""Docstring examples in public modules are executed, so they cannot rot."""

import doctest

import pytest

import store.embeddings
import synth_agent.engine.synthesize
import synth_agent.models
import synth_agent.safejson


@pytest.mark.parametrize("module", [synth_agent.models, synth_agent.engine.synthesize, store.embeddings,
                                    synth_agent.safejson])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
