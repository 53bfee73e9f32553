"""Multi-GPU code tested on a CPU runner: the model split over two virtual cards (real values).

On one device the classic bug below is invisible; on a split model it raises. ``virtual_gpus`` makes
the split happen in ordinary CI, no GPU needed.
"""

import pytest
import torch

# tiny-llama over two cards: the embeddings and the first half on cuda:0, the rest and the head on cuda:1
SPLIT = {
    "model.embed_tokens": "cuda:0", "model.layers.0": "cuda:0", "model.layers.1": "cuda:0",
    "model.layers.2": "cuda:1", "model.layers.3": "cuda:1", "model.norm": "cuda:1", "model.rotary_emb": "cuda:1",
    "lm_head": "cuda:1",
}
IDS = [[1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 0, 0, 0]]
MASK = [[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0]]


def sentence_embeddings(model, input_ids, attention_mask):
    """The code under test: mean pooling of the base model's last hidden states."""
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    mask = attention_mask.to(hidden.device).unsqueeze(-1).to(hidden.dtype)  # the mask goes where hidden is
    return (hidden * mask).sum(1) / mask.sum(1)


def buggy_sentence_embeddings(model, input_ids, attention_mask):
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # still on cuda:0; hidden comes off the last card
    return (hidden * mask).sum(1) / mask.sum(1)


@pytest.mark.virtual_gpus("2x64MiB")
@pytest.mark.llm(models="builtin:tiny-llama", device_maps=[SPLIT], precisions="fp32")
def test_pooling_on_a_two_card_split_equals_the_cpu_result(llm_model, llm_load):
    assert {str(p.device) for p in llm_model.parameters()} == {"cuda:0", "cuda:1"}
    ids, mask = torch.tensor(IDS, device="cuda:0"), torch.tensor(MASK, device="cuda:0")
    pooled = sentence_embeddings(llm_model, ids, mask)
    cpu = llm_load("builtin:tiny-llama", device_map="cpu", precision="fp32")
    assert torch.equal(pooled.cpu(), sentence_embeddings(cpu, ids.cpu(), mask.cpu()))


@pytest.mark.virtual_gpus("2x64MiB")
@pytest.mark.llm(models="builtin:tiny-llama", device_maps=[SPLIT], precisions="fp32")
def test_the_classic_bug_is_caught_on_a_cpu_runner(llm_model):
    with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
        buggy_sentence_embeddings(llm_model, torch.tensor(IDS, device="cuda:0"), torch.tensor(MASK, device="cuda:0"))
