"""Placement checks a project writes for the device maps it supports."""

import json

import pytest
import torch

from pytest_llmload import effective_device_map

# A two-tier map for the built-in GPT-2: the middle blocks live on disk, the rest on the CPU.
CPU_AND_DISK = {
    "transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.h.0": "cpu",
    "transformer.h.1": "disk", "transformer.h.2": "disk", "transformer.h.3": "cpu",
    "transformer.ln_f": "cpu", "lm_head": "cpu",
}


@pytest.mark.llm(models="builtin:tiny-gpt2", device_maps=[CPU_AND_DISK], precisions="fp32")
def test_offloaded_model_matches_single_device(llm_model, llm_tokenizer, llm_load):
    assert effective_device_map(llm_model) == CPU_AND_DISK
    reference = llm_load("builtin:tiny-gpt2", device_map="cpu", precision="fp32")
    inputs = llm_tokenizer("offloading must not change the answer", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(llm_model(**inputs).logits, reference(**inputs).logits)


@pytest.mark.llm(device_maps=["auto", "sequential", "process"])
def test_every_strategy_places_every_parameter(llm_model, llm_spec):
    placed = effective_device_map(llm_model)
    assert placed, f"{llm_spec.device_map} placed nothing"
    assert not any(p.device.type == "meta" for p in llm_model.parameters() if "disk" not in placed.values())


@pytest.mark.llm(device_maps=["0"])
def test_whole_model_on_the_first_gpu(llm_model):
    """Skipped on a machine without a GPU (and failed there under --llm-require-gpus)."""
    assert effective_device_map(llm_model) == {"": 0}


def test_the_map_file_form(tmp_path, llm_load):
    path = tmp_path / "map.json"
    path.write_text(json.dumps(CPU_AND_DISK))
    model = llm_load("builtin:tiny-gpt2", device_map=f"@{path}", precision="fp32")
    assert effective_device_map(model)["transformer.h.1"] == "disk"
