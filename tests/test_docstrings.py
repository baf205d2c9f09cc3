"""Docstring examples in public modules are executed, so they cannot rot."""

import doctest

import pytest

import store.chroma
import store.embeddings
import store.memory
import store.memory_view
import synth_agent.config
import synth_agent.engine.selection
import synth_agent.engine.synthesize
import synth_agent.ids
import synth_agent.lift
import synth_agent.llm.client
import synth_agent.llm.pool
import synth_agent.models
import synth_agent.safejson

MODULES = [synth_agent.models, synth_agent.engine.synthesize, store.embeddings, synth_agent.safejson, synth_agent.ids,
           store.chroma, store.memory, store.memory_view, synth_agent.llm.client, synth_agent.llm.pool,
           synth_agent.engine.selection, synth_agent.lift, synth_agent.config]

# the main public classes: each shows how it is used, and the example runs (offline: simulator, temp dirs)
CLASSES = [store.chroma.ChromaStore, store.memory.PreferenceMemory, synth_agent.llm.client.LLMClient,
           synth_agent.llm.pool.EndpointPool, synth_agent.engine.synthesize.Synthesizer]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_public_class_has_a_running_example(cls):
    tests = [t for t in doctest.DocTestFinder(recurse=False).find(cls) if t.examples]
    assert tests, f"{cls.__qualname__} has no docstring example"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for t in tests:
        runner.run(t)
    assert runner.summarize(verbose=False).failed == 0
