"""Load-path defects of issue 21: a failed load gives its memory back, and a skip is decided on a fresh plan."""

from __future__ import annotations

import gc

import pytest
import torch
from transformers import LlamaForCausalLM

from pytest_llmload import load_model, virtual_gpus
from pytest_llmload import ModelCache
from pytest_llmload.errors import ModelLoadError
from pytest_llmload._internal.planning.fit_check import FitChecker
from pytest_llmload import probe_inventory
from pytest_llmload import make_spec

KiB = 1024


class FailsAfterLoading(LlamaForCausalLM):
    """transformers calls ``eval()`` once every weight is on its device: this load fails there."""

    def eval(self):
        raise RuntimeError("failed after the weights were placed")


def test_a_failed_load_leaves_nothing_allocated_on_the_card_while_its_error_is_held():
    with virtual_gpus("1x64MiB"):
        before = torch.cuda.memory_allocated(0)
        with pytest.raises(ModelLoadError, match="failed after the weights were placed") as info:
            load_model("builtin:tiny-llama", device_map="cuda:0", model_class=FailsAfterLoading)
        # pytest (and a user's except block) keeps the error: it must not keep the half-built model alive
        assert torch.cuda.memory_allocated(0) == before
        assert torch.cuda.memory_reserved(0) == torch.cuda.memory_allocated(0)
        assert info.value.__context__ is None and info.value.__cause__ is None
        del info
        gc.collect()


def test_a_need_planned_while_a_card_was_busy_is_planned_again_before_a_skip():
    """The plan of a strategy depends on what is free: a need planned while cuda:0 was full (everything
    on cuda:1) is not reused later when cuda:1 is the busy one and cuda:0 is free."""
    with virtual_gpus("2x1MiB"):
        inventory = probe_inventory(bitsandbytes=False)
        spec = make_spec("builtin:tiny-llama", "balanced", "fp32")
        checker, cache = FitChecker(0.1, None), ModelCache(1)
        busy = torch.empty(900 * KiB, dtype=torch.uint8, device="cuda:0")
        assert checker.reasons(spec, cache, inventory) == []  # fits on cuda:1 alone
        del busy
        torch.cuda.empty_cache()
        busy = torch.empty(500 * KiB, dtype=torch.uint8, device="cuda:1")
        assert checker.reasons(spec, cache, inventory) == []  # fits on cuda:0 now: no skip
        del busy


def test_a_cells_placement_is_worked_out_once_and_read_by_the_gate_the_cache_and_the_load(pytester):
    """The quantized-map problem and the offload need were evaluated in the gate, the cache and the load
    call, each on its own (issue 23); now one cached value per cell."""
    from pytest_llmload._internal.loading.placement import placement

    placement.cache_clear()
    pytester.makepyfile("""
        def test_a(llm_model):
            assert llm_model is not None

        def test_b(llm_model):
            assert llm_model is not None
    """)
    result = pytester.runpytest_inprocess("-p", "no:randomly", "--llm-device-map=cpu", "--llm-model=builtin:tiny-gpt2")
    result.assert_outcomes(passed=2)
    info = placement.cache_info()
    assert info.misses == 1 and info.hits >= 3, info  # one cell: computed once, read by gate x2, cache, load
