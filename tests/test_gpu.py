"""Checks that need real GPUs. Skipped on CPU-only machines; run them on a GPU runner with
``pytest tests/test_gpu.py --llm-require-gpus`` so that a lost driver fails instead of skipping."""

from __future__ import annotations

import pytest
import torch

from pytest_llmload import effective_device_map, load_model
from pytest_llmload._internal.planning.fit_check import measure_cuda_context
from pytest_llmload import probe_inventory
from pytest_llmload import plan_device_map


@pytest.mark.requires_gpus(1)
def test_inventory_matches_torch():
    inventory = probe_inventory()
    assert inventory.count == torch.cuda.device_count()
    for gpu in inventory.gpus:
        assert gpu.total_memory == torch.cuda.get_device_properties(gpu.index).total_memory


@pytest.mark.requires_gpus(1)
def test_cuda_context_is_measured():
    size = measure_cuda_context(0)
    assert 50 * 2**20 < size < 4 * 2**30  # hundreds of MB on current drivers


@pytest.mark.requires_gpus(1)
@pytest.mark.parametrize("precision", ["fp16", "bf16", "int8", "nf4"])
def test_whole_model_on_gpu_0(precision):
    model = load_model("builtin:tiny-llama", device_map=0, precision=precision)
    assert effective_device_map(model) == {"": 0}
    ids = torch.tensor([[1, 2, 3]], device="cuda:0")
    assert torch.isfinite(model(ids).logits.float()).all()


@pytest.mark.requires_gpus(1)
@pytest.mark.parametrize("strategy", ["auto", "balanced", "balanced_low_0", "sequential"])
@pytest.mark.parametrize("gpu_budget", ["200KiB", "600KiB"])
def test_plan_matches_a_real_gpu_load(strategy, gpu_budget):
    budget = {0: gpu_budget, "cpu": "200KiB"}
    plan = plan_device_map("builtin:tiny-llama", strategy, max_memory=budget, precision="fp32")
    model = load_model("builtin:tiny-llama", device_map=strategy, max_memory=budget, precision="fp32")
    assert effective_device_map(model) == plan.device_map


@pytest.mark.requires_gpus(1)
def test_int8_with_cpu_entries_keeps_them_fp32():
    mapping = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 0, "model.layers.2": "cpu",
               "model.layers.3": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    import bitsandbytes as bnb

    model = load_model("builtin:tiny-llama", device_map=mapping, precision="int8")
    assert isinstance(model.model.layers[0].mlp.up_proj, bnb.nn.Linear8bitLt)
    assert not isinstance(model.model.layers[3].mlp.up_proj, bnb.nn.Linear8bitLt)
