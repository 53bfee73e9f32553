"""Memory accounting: the estimator's arithmetic, a measured training step, the load report and baselines."""

from __future__ import annotations

import json

import pytest
import torch

from pytest_llmload import load_model
from pytest_llmload.cli import main
from pytest_llmload.errors import LLMLoadUsageError
from pytest_llmload import estimate_training_memory
from pytest_llmload._internal.planning.training_memory import ACTIVATION_TOLERANCE
from pytest_llmload import track_memory
from pytest_llmload._internal.planning.measure import saved_activation_bytes


@pytest.fixture(scope="module")
def llama_7b():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)


LLAMA_7B_PARAMETERS = 6_738_415_616  # Llama-2-7B
ROTARY_BUFFER = 2 * 64 * 4  # inv_freq and original_inv_freq: head_dim / 2 fp32 values each


def test_rotary_buffers_are_what_the_constant_says(llama_7b):
    from pytest_llmload._internal.planning.planner import meta_model

    network, _ = meta_model(llama_7b, "fp16")
    assert sum(b.nelement() * b.element_size() for b in network.buffers()) == ROTARY_BUFFER


def test_7b_weights_in_fp16_are_parameters_times_two(llama_7b):
    estimate = estimate_training_memory(llama_7b, precision="fp16", seq_len=1)
    assert estimate.parameters == LLAMA_7B_PARAMETERS
    assert estimate.weights == LLAMA_7B_PARAMETERS * 2 + ROTARY_BUFFER
    assert estimate.gradients == LLAMA_7B_PARAMETERS * 2
    assert estimate.optimizer == LLAMA_7B_PARAMETERS * 4  # two AdamW moments in the weights' dtype (fp16)
    assert estimate.optimizer_step == LLAMA_7B_PARAMETERS * 2  # the step's one moment-sized temporary


def test_7b_int8_with_lora(llama_7b):
    estimate = estimate_training_memory(llama_7b, precision="int8", lora={"r": 8, "target_modules": ["q_proj", "v_proj"]})
    adapters = 32 * 2 * 8 * (4096 + 4096)
    assert estimate.trainable_parameters == adapters
    assert estimate.gradients == adapters * 4 and estimate.optimizer == adapters * 8
    linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)  # quantized: 1 byte each
    others = LLAMA_7B_PARAMETERS - linear  # embeddings, norms and lm_head stay in fp32 here
    assert estimate.weights == linear + others * 4 + ROTARY_BUFFER + adapters * 4


def test_optimizers_and_checkpointing(llama_7b):
    base = dict(precision="bf16", batch_size=4, seq_len=2048)
    adamw = estimate_training_memory(llama_7b, **base)
    assert estimate_training_memory(llama_7b, optimizer="sgd", **base).optimizer == 0
    assert estimate_training_memory(llama_7b, optimizer="sgd-momentum", **base).optimizer == adamw.optimizer // 2
    eight_bit = estimate_training_memory(llama_7b, optimizer="adamw8bit", **base).optimizer
    assert adamw.optimizer / 2 <= eight_bit <= adamw.optimizer / 1.9  # bf16 AdamW: two 2-byte moments
    checkpointed = estimate_training_memory(llama_7b, gradient_checkpointing=True, **base)
    assert checkpointed.activations < adamw.activations / 5
    tokens = 4 * 2048
    per_layer = 2 * tokens * (10 * 4096 + 4 * 11008)
    assert adamw.activations == 32 * per_layer + 4 * tokens * (32000 + 4 * 4096)


def test_per_device_totals(llama_7b):
    device_map = {"model.embed_tokens": 0, "model.layers": 1, "model.norm": 1, "model.rotary_emb": 1, "lm_head": 0}
    estimate = estimate_training_memory(llama_7b, precision="fp16", device_map=device_map, cuda_context="500MiB")
    assert set(estimate.per_device) == {0, 1}
    assert estimate.cuda_context == 2 * 500 * 2**20
    assert abs(sum(estimate.per_device.values()) - estimate.total) <= 2  # rounding only


def test_bad_arguments(llama_7b):
    with pytest.raises(LLMLoadUsageError, match="unknown optimizer 'lion'"):
        estimate_training_memory(llama_7b, optimizer="lion")
    with pytest.raises(LLMLoadUsageError, match="int8 weights cannot be trained directly"):
        estimate_training_memory(llama_7b, precision="int8")
    with pytest.raises(LLMLoadUsageError, match="match no linear layer"):
        estimate_training_memory(llama_7b, lora={"r": 8, "target_modules": ["nothing"]})


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-mixtral"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_estimate_against_a_measured_training_step(name, checkpointing):
    """Weights, gradients and AdamW state are exact; activations within the stated tolerance."""
    model = load_model(f"builtin:{name}", device_map="cpu", precision="fp32")
    model.train()
    if checkpointing:
        from pytest_llmload._internal.compat.transformers import enable_activation_checkpointing

        enable_activation_checkpointing(model, use_reentrant=False)
    batch, seq = 2, 96
    estimate = estimate_training_memory(f"builtin:{name}", precision="fp32", batch_size=batch, seq_len=seq,
                                        gradient_checkpointing=checkpointing)
    ids = torch.randint(5, 300, (batch, seq), generator=torch.Generator().manual_seed(0))
    saved = saved_activation_bytes(model, {"input_ids": ids, "labels": ids})
    optimizer = torch.optim.AdamW(model.parameters())
    optimizer.step()
    assert model.get_memory_footprint() == estimate.weights
    assert sum(p.grad.nelement() * p.grad.element_size() for p in model.parameters()) == estimate.gradients
    state = sum(t.nelement() * t.element_size() for s in optimizer.state.values() for k, t in s.items()
                if k in ("exp_avg", "exp_avg_sq"))
    assert state == estimate.optimizer
    assert abs(estimate.activations_stored / saved - 1) <= ACTIVATION_TOLERANCE, (estimate.activations_stored, saved)


def test_track_memory_sees_a_cpu_allocation():
    with track_memory() as usage:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB
        block += 1
    del block
    assert usage.cpu_peak_delta >= 48 * 2**20
    assert usage.gpu_allocated_peak == {}  # no CUDA here


def test_a_peak_read_during_the_run_is_kept_when_the_sampler_missed_it(monkeypatch):
    # the sampling thread may get no CPU while a short-lived block is alive (a loaded CI machine):
    # what snapshot() read is then the only sight of that peak, and stop() must not lose it
    from pytest_llmload._internal.planning import measure as memory

    monkeypatch.setattr(memory._RssSampler, "run", lambda self: self._stop_event.wait())  # never samples
    tracker = memory.MemoryTracker().start()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB
    seen = tracker.snapshot().cpu_peak_delta
    del block
    assert seen >= 48 * 2**20
    assert tracker.stop().cpu_peak_delta >= seen


def test_llm_memory_fixture(pytester):
    pytester.makepyfile("""
        import torch

        def test_peak(llm_memory):
            with llm_memory.track() as block:
                x = torch.ones(32 * 2**20 // 4)
                x += 1
            assert block.cpu_peak_delta >= 24 * 2**20
            assert "cpu +" in block.describe()
    """)
    pytester.runpytest().assert_outcomes(passed=1)


def test_cli_estimate(capsys):
    assert main(["estimate", "builtin:tiny-llama", "--precision", "int8", "--lora-r", "4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["trainable_parameters"] == 4 * 4 * 2 * (64 + 64) - 4 * 4 * (64 - 32)  # q: 64->64, v: 64->32
    assert main(["estimate", "builtin:tiny-llama", "--seq-len", "128"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("training memory:") and "optimizer state" in out
    assert main(["estimate", "builtin:tiny-llama", "--precision", "int8"]) == 2


@pytest.mark.parametrize("model, device_map", [
    ("builtin:tiny-llama", None), ("builtin:tiny-bert", None), ("builtin:tiny-llama", "cpu"),
    ("builtin:tiny-llama", '{"model.embed_tokens": 0, "model.layers": 1, "model.norm": 1, "lm_head": "cpu"}'),
])
def test_the_per_device_rows_of_a_lora_estimate_add_up_to_the_total(model, device_map):
    """They missed the adapters' weights: exactly the gradients figure (294,912 bytes for MiniLM)."""
    import json
    import subprocess
    import sys

    args = [sys.executable, "-m", "pytest_llmload", "estimate", model, "--lora-r", "8", "--json"]
    if device_map is not None:
        args += ["--device-map", device_map]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    estimate = json.loads(result.stdout)
    assert sum(estimate["per_device"].values()) == estimate["total"]
