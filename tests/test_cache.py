"""The session cache: one load per distinct cell, bounded size, deterministic release."""

from __future__ import annotations

import gc
import weakref

import pytest

from pytest_llmload import ModelCache
from pytest_llmload.errors import ModelLoadError
from pytest_llmload import make_spec


def test_distinct_cells_load_once_and_hits_reuse():
    cache = ModelCache(max_models=3)
    specs = [make_spec("builtin:tiny-gpt2", "cpu", p) for p in ("fp32", "fp16", "bf16")]
    models = [cache.get(s) for s in specs for _ in range(4)]
    assert cache.loads == 3
    assert cache.hits == 9
    assert len({id(m) for m in models}) == 3
    cache.close()


def test_evicted_model_is_freed():
    cache = ModelCache(max_models=1)
    first = weakref.ref(cache.get(make_spec("builtin:tiny-llama", "cpu", "fp32")))
    assert first() is not None
    cache.get(make_spec("builtin:tiny-llama", "cpu", "fp16"))  # evicts the first
    gc.collect()
    assert first() is None
    assert cache.cache_info().evictions == 1
    latest = weakref.ref(cache.get(make_spec("builtin:tiny-llama", "cpu", "fp16")))
    cache.close()
    gc.collect()
    assert latest() is None


def test_private_copies_are_not_held():
    cache = ModelCache(max_models=2)
    spec = make_spec("builtin:tiny-gpt2", "cpu", "fp32")
    shared = cache.get(spec)
    private = weakref.ref(cache.load_private(spec))
    gc.collect()
    assert private() is None  # nobody holds the private copy but its caller
    assert cache.get(spec) is shared
    assert cache.loads == 2 and [r.private for r in cache.history] == [False, True]
    cache.close()


def test_failures_are_remembered_per_model(offline_hub):
    cache = ModelCache()
    for precision in ("fp32", "fp16", "int8"):
        with pytest.raises(ModelLoadError, match="someorg/gone"):
            cache.get(make_spec("someorg/gone", "auto", precision))
    assert cache.config_attempts == {"someorg/gone": 1}
    assert cache.loads == 0


def test_load_kwargs_are_part_of_the_key():
    cache = ModelCache(max_models=4)
    spec = make_spec("builtin:tiny-bert", "cpu", "fp32")
    base = cache.get(spec)
    head = cache.get(spec, model_class="AutoModelForSequenceClassification")
    assert type(base).__name__ == "BertModel"
    assert type(head).__name__ == "BertForSequenceClassification"
    assert cache.get(spec, model_class="AutoModelForSequenceClassification") is head
    cache.close()
