"""The assertion helpers, as a downstream project would use them."""

import pytest
import torch

from pytest_llmload import (
    assert_device_map,
    assert_int8_trainable,
    assert_memory_footprint,
    assert_outputs_close,
    expected_footprint,
    validate_device_map,
)

OFFLOAD_MIDDLE = {
    "transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.h.0": "cpu", "transformer.h.1": "disk",
    "transformer.h.2": "disk", "transformer.h.3": "cpu", "transformer.ln_f": "cpu", "lm_head": "cpu",
}


def test_our_shipped_map_is_sound():
    """Check a map from the config alone (meta device): no weights are loaded."""
    assert validate_device_map("builtin:tiny-gpt2", OFFLOAD_MIDDLE) == []


@pytest.mark.llm(models="builtin:tiny-gpt2", device_maps=[OFFLOAD_MIDDLE], precisions="fp32")
def test_offloaded_model_is_placed_and_computes_like_the_reference(llm_model, llm_load):
    assert_device_map(llm_model, {"transformer.h.1": "disk", "lm_head": "cpu"}, devices={"cpu", "disk"})
    assert_device_map(llm_model, OFFLOAD_MIDDLE, max_hops=0)  # disk layers run on the cpu: no transfers
    assert_outputs_close(llm_model, llm_load("builtin:tiny-gpt2", device_map="cpu", precision="fp32"))


@pytest.mark.max_footprint("2 MiB")
def test_the_default_model_stays_small(llm_model):
    pass


@pytest.mark.requires_bitsandbytes
@pytest.mark.llm(precisions="int8", device_maps="cpu")
def test_int8_costs_what_the_config_says(llm_model, llm_spec):
    int8 = expected_footprint(llm_spec.model, "int8")
    fp16 = expected_footprint(llm_spec.model, "fp16")
    assert int8.quantized <= 0.6 * fp16.quantized  # no magic constant: both computed from the config
    assert_memory_footprint(llm_model, max=int8)


@pytest.mark.requires_bitsandbytes
@pytest.mark.llm(precisions=["int8", "nf4"], device_maps="cpu")
def test_quantized_model_can_be_fine_tuned_with_lora(llm_private_model):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(llm_private_model)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    assert_int8_trainable(model)


@pytest.mark.llm(precisions=["fp16", "bf16"], device_maps="cpu")
def test_half_precision_outputs_match_fp32(llm_model, llm_load):
    reference = llm_load(device_map="cpu", precision="fp32")
    assert_outputs_close(llm_model, reference)  # the tolerance follows the precision
    with torch.no_grad():
        assert llm_model(torch.tensor([[1, 2, 3]])).logits.dtype in (torch.float16, torch.bfloat16)
