"""Precision checks: quantized loads really quantize, and cost less memory."""

import pytest
import torch

from pytest_llmload import input_device


@pytest.mark.llm(precisions=["fp32", "fp16", "bf16"], device_maps="cpu")
def test_float_precisions_load_in_their_dtype(llm_model, llm_spec):
    expected = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[llm_spec.precision]
    assert llm_model.dtype == expected


@pytest.mark.requires_bitsandbytes
@pytest.mark.llm(precisions=["int8", "nf4"], device_maps="cpu")
def test_quantized_load_is_smaller_than_fp32(llm_model, llm_load):
    fp32 = llm_load(precision="fp32", device_map="cpu")
    assert llm_model.get_memory_footprint() < fp32.get_memory_footprint()


@pytest.mark.llm(models=["builtin:tiny-bert"], precisions=["fp32", "fp16"], device_maps="cpu")
def test_encoder_checkpoints_load_as_their_own_class(llm_model, llm_tokenizer):
    out = llm_model(**llm_tokenizer("an encoder, not a decoder", return_tensors="pt"))
    assert type(llm_model).__name__ == "BertModel"
    assert out.last_hidden_state.shape[-1] == llm_model.config.hidden_size


def test_training_gets_a_private_copy(llm_private_model, llm_tokenizer, llm_spec):
    """A test that changes weights asks for llm_private_model, never the shared llm_model."""
    if not hasattr(llm_private_model, "lm_head"):
        pytest.skip("needs a language-model head")
    if llm_spec.precision in ("int8", "nf4", "fp4"):
        pytest.skip("quantized weights train through adapters (see test_assertions.py)")
    if any(p.device.type == "meta" for p in llm_private_model.parameters()):
        pytest.skip("the map offloads weights (they wait on the meta device): full training needs them in memory")
    llm_private_model.float().train()
    batch = llm_tokenizer("train on this", return_tensors="pt").to(input_device(llm_private_model))
    loss = llm_private_model(**batch, labels=batch.input_ids).loss
    loss.backward()
    assert llm_private_model.lm_head.weight.grad is not None
