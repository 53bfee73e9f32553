"""Golden outputs: values recorded once per device class and compared on every run.

The goldens live next to this file, in ``goldens/test_golden_outputs.json`` (review its diff like code). Record them
for the device class you run on with ``pytest examples/test_golden_outputs.py --llm-update-goldens``; a run on a
class with none of its own (a GPU, the virtual fleet) compares with the nearest recorded one and warns,
naming both classes, until you record its own.
"""

import pytest
import torch

from pytest_llmload import assert_matches_golden, input_device

# Goldens are kept per cell: these tests pin theirs (the default cell: the checkpoint's own dtype, fp32), so
# the command line's matrix does not change their keys.
TINY = pytest.mark.llm(models="builtin:tiny-llama", device_maps="auto", precisions="auto")
PROMPTS = ["The capital of France is", "Once upon a time"]


@TINY
def test_last_token_logits_and_hidden_state_match_the_golden(llm_model, llm_tokenizer):
    inputs = llm_tokenizer(PROMPTS, return_tensors="pt", padding=True).to(input_device(llm_model))
    with torch.no_grad():
        out = llm_model(**inputs, output_hidden_states=True)
    # fp32 tolerances by default (atol 1e-5, rtol 1e-5): a change of 1e-3 anywhere fails, naming where
    assert_matches_golden("last token", {"logits": out.logits[:, -1], "hidden": out.hidden_states[-1][:, -1]})


@TINY
def test_greedy_generation_matches_the_golden_up_to_near_ties(llm_model, llm_tokenizer, llm_golden):
    inputs = llm_tokenizer(PROMPTS[0], return_tensors="pt").to(input_device(llm_model))
    with torch.no_grad():
        out = llm_model.generate(**inputs, max_new_tokens=8, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)
    # A generated token may differ where the golden's top-3 at that position holds it (a near tie that
    # flips on another device class); the failure shows both texts and both top-3 lists.
    llm_golden.check("greedy", out, topk=3)


@TINY
def test_the_tokenizer_round_trip_matches_the_golden(llm_tokenizer):
    ids = llm_tokenizer(PROMPTS).input_ids
    assert_matches_golden("token ids", ids)  # a list of ints per prompt: compared exactly
    assert_matches_golden("decoded", llm_tokenizer.batch_decode(ids))  # text: compared exactly
