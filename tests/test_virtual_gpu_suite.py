"""The GPU-only checks of tests/test_gpu.py that need no real CUDA kernel, run on virtual fleets in CPU CI."""

from __future__ import annotations

import pytest
import torch

from pytest_llmload import effective_device_map, load_model, virtual_gpus
from pytest_llmload import probe_inventory
from pytest_llmload import plan_device_map


@pytest.mark.parametrize("spec", ["2x64MiB", "4x64MiB@9.0", "64MiB,32MiB"])
def test_inventory_matches_torch(spec):
    with virtual_gpus(spec):
        inventory = probe_inventory(bitsandbytes=False)
        assert inventory.count == torch.cuda.device_count() and inventory.source == "virtual"
        for gpu in inventory.gpus:
            props = torch.cuda.get_device_properties(gpu.index)
            assert gpu.total_memory == props.total_memory and gpu.capability == (props.major, props.minor)


@pytest.mark.parametrize("cards", [2, 4])
@pytest.mark.parametrize("strategy", ["auto", "balanced", "balanced_low_0", "sequential"])
@pytest.mark.parametrize("gpu_budget", ["200KiB", "400KiB"])
def test_plan_matches_a_real_load(cards, strategy, gpu_budget):
    budget = {**{i: gpu_budget for i in range(cards)}, "cpu": "200KiB"}
    with virtual_gpus(f"{cards}x64MiB"):
        plan = plan_device_map("builtin:tiny-llama", strategy, max_memory=budget, precision="fp32")
        model = load_model("builtin:tiny-llama", device_map=strategy, max_memory=budget, precision="fp32")
        assert effective_device_map(model) == plan.device_map
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]]).cuda()).logits).all()
