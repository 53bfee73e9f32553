"""Every test here runs once per (model, device_map, precision) cell of the command line's matrix."""

import torch

from pytest_llmload import input_device


def test_generates_the_requested_number_of_tokens(llm_model, llm_tokenizer, llm_spec):
    if not llm_model.can_generate():
        import pytest

        pytest.skip(f"{llm_spec.model} is not a generative model")
    inputs = llm_tokenizer("The capital of France is", return_tensors="pt").to(input_device(llm_model))
    with torch.no_grad():
        out = llm_model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape[-1] == inputs.input_ids.shape[-1] + 5


def test_greedy_generation_is_deterministic(llm_model, llm_tokenizer):
    inputs = llm_tokenizer("Once upon a time", return_tensors="pt").to(input_device(llm_model))
    with torch.no_grad():
        first = llm_model(**inputs).logits
        second = llm_model(**inputs).logits
    assert torch.equal(first, second)


def test_logits_are_finite(llm_model, llm_tokenizer):
    inputs = llm_tokenizer(["short", "a somewhat longer input"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = llm_model(**inputs.to(input_device(llm_model))).logits
    assert torch.isfinite(logits.float()).all()
