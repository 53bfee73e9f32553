"""GPU memory that outlives a test: ``no_gpu_leak`` fails the test that leaves it and names the holder.

Run on a CPU runner the same as on a GPU one: the tests below take their cards from a virtual fleet, whose
per-card counters the check reads as it reads a real card's ``memory_allocated``. Try it: drop the
``cache_clear()`` in ``embedding_cache`` and ``test_cached_embeddings_are_released`` fails with

    llm leak check (no_gpu_leak): examples/test_leaks.py::test_cached_embeddings_are_released left GPU memory
    allocated after its teardown that was not before its setup: 512 B on cuda:0
    GPU tensors still alive: tensor[1, 64] float32 on cuda:0, 256 B
    the largest (tensor[1, 64] float32 on cuda:0, 256 B) is kept alive by:
      global embed of module test_leaks (.../examples/test_leaks.py) (_lru_cache_wrapper)
      -> (cached by lru_cache function embed) (Tensor)

(512 B: the allocator's rounding of the 256-byte tensor, as a real card's ``memory_allocated`` shows it.)
"""

import functools

import pytest
import torch

_MODEL = []  # the model embed() uses (an lru_cache key must be hashable: the model is passed around it)


@functools.lru_cache(maxsize=16)
def embed(text: str) -> torch.Tensor:
    """The code under test: an embedding cache, a classic way to pin GPU memory for the whole session."""
    model = _MODEL[0]
    ids = torch.tensor([[ord(c) % 300 + 1 for c in text]], device="cuda:0")
    return model.model(input_ids=ids).last_hidden_state.mean(1).detach()


@pytest.fixture
def embedding_cache(llm_load):
    _MODEL.append(llm_load("builtin:tiny-llama", device_map="cuda:0", precision="fp32"))
    yield embed
    embed.cache_clear()  # without this, the cached outputs stay on the card after the test
    _MODEL.clear()


@pytest.mark.virtual_gpus("1x64MiB")
@pytest.mark.no_gpu_leak
def test_cached_embeddings_are_released(embedding_cache):
    first = embedding_cache("hello")
    assert embedding_cache("hello") is first  # served from the cache
    assert first.device == torch.device("cuda:0")


@pytest.mark.virtual_gpus("2x64MiB")
@pytest.mark.no_gpu_leak
@pytest.mark.llm(models="builtin:tiny-llama", device_maps="balanced", precisions="fp32")
def test_a_forward_over_two_cards_leaves_nothing_behind(llm_model):
    ids = torch.tensor([[1, 2, 3, 4]], device="cuda:0")
    logits = llm_model(input_ids=ids).logits
    assert logits.device.type == "cuda"  # what the session cache holds is the cache's, not this test's
