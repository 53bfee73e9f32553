"""The fit check (pytest_llmload._internal.planning.fit_check): will a cell's weights fit the memory free here, before it loads?"""

from __future__ import annotations

import pytest

from pytest_llmload._internal.planning.fit_check import bytes_per_device, fit_problems
from pytest_llmload import make_spec

GiB = 2**30

# -- fit check -------------------------------------------------------------------------------------


def test_fit_problems_arithmetic():
    need = {0: 14 * GiB, 1: 2 * GiB, "cpu": GiB, "disk": 100 * GiB}
    free = {0: 10 * GiB, 1: 40 * GiB, "cpu": 64 * GiB}
    assert fit_problems(need, free, margin=0.0) == ["needs ~14.0 GiB on cuda:0; 10.0 GiB free"]
    assert fit_problems({0: 9 * GiB}, {0: 10 * GiB}, margin=0.0) == []
    assert fit_problems({0: 9 * GiB}, {0: 10 * GiB}, margin=0.2) == [
        "needs ~9.0 GiB on cuda:0; 8.0 GiB usable (10.0 GiB free, 20% kept spare)"]
    assert fit_problems({0: 9 * GiB}, {0: 10 * GiB}, margin=0.0, context_bytes={0: GiB + 1}) == [
        "needs ~10.0 GiB (incl. ~1.0 GiB CUDA context) on cuda:0; 10.0 GiB free"]
    assert fit_problems({2: GiB}, {0: 10 * GiB}, margin=0.0) == ["needs ~1.0 GiB on cuda:2, which is not here"]


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8", "nf4"])
def test_fit_need_matches_the_sizes_accelerate_computes(precision):
    """What the fit check counts per device equals the sizes accelerate (float) and transformers' quantizer
    (int8/4-bit) compute for the same meta model, and what the real load reports."""
    from accelerate.utils import compute_module_sizes
    from transformers.integrations.accelerate import compute_module_sizes as quantized_sizes

    from pytest_llmload import load_model
    from pytest_llmload._internal.planning.fit_check import allocator_padding, cell_need
    from pytest_llmload._internal.planning.planner import meta_model

    mapping = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "model.layers.2": 1,
               "model.layers.3": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    need = cell_need(make_spec("builtin:tiny-llama", mapping, precision), {})
    network, quantizer = meta_model("builtin:tiny-llama", precision)
    sizes = compute_module_sizes(network) if quantizer is None else quantized_sizes(network, quantizer)[0]
    # each tensor rounded up to 512 bytes, as the allocator does (the most a quantized one can add)
    padding = allocator_padding(network, quantizer is not None)
    sizes = {name: size + padding.get(name, 0) for name, size in sizes.items()}
    footprint = load_model("builtin:tiny-llama", precision=precision, device_map="cpu").get_memory_footprint()
    assert footprint <= sum(need.values()) == footprint + padding[""] <= footprint * 1.1
    assert need == {
        0: sizes["model.embed_tokens"] + sizes["model.layers.0"],
        1: sizes["model.layers.1"] + sizes["model.layers.2"],
        "cpu": sizes["model.layers.3"] + sizes["model.norm"] + sizes["model.rotary_emb"] + sizes["lm_head"],
    }
    assert sum(need.values()) == sizes[""]
    if precision == "fp32":
        buffers = sum(b.numel() * b.element_size() for b in network.buffers())
        assert sizes[""] == sum(p.numel() * 4 for p in network.parameters()) + buffers + padding[""]


def test_bytes_per_device_normalises_device_names():
    sizes = {"a": 10, "b": 20, "c": 5}
    assert bytes_per_device({"a": "cuda:1", "b": 1, "c": "cuda"}, sizes) == {1: 30, 0: 5}


def test_fit_check_skips_a_cell_that_cannot_fit(pytester):
    pytester.makepyfile("def test_x(llm_model): pass")
    # tiny-llama needs ~1 MiB; leave no room by keeping 99.99999% of free RAM spare
    result = pytester.runpytest("-rs", "--llm-device-map=cpu", "--llm-fit-margin=0.9999999")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*needs ~* on cpu; * usable (* free, 100% kept spare)*"])
    pytester.runpytest("--llm-device-map=cpu", "--llm-fit-margin=off").assert_outcomes(passed=1)



@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8", "nf4"])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-t5"])
def test_cheap_bound_is_an_upper_bound_of_the_real_footprint(name, precision):
    from pytest_llmload import load_model
    from pytest_llmload._internal.planning.fit_check import weights_upper_bound

    bound = weights_upper_bound(make_spec(f"builtin:{name}", "cpu", precision))
    footprint = load_model(f"builtin:{name}", device_map="cpu", precision=precision).get_memory_footprint()
    assert footprint <= bound <= 4 * footprint + 2**21


def test_cheap_bound_gives_up_on_damaged_files_and_hub_ids(tmp_path):
    import shutil

    from pytest_llmload import builtin_path
    from pytest_llmload._internal.planning.fit_check import weights_upper_bound

    assert weights_upper_bound(make_spec("org/model", "auto", "fp16")) is None
    copy = tmp_path / "ckpt"
    shutil.copytree(builtin_path("tiny-gpt2"), copy)
    (copy / "model.safetensors").write_bytes(b"\xff" * 16)
    assert weights_upper_bound(make_spec(str(copy), "auto", "fp16")) is None


@pytest.mark.parametrize("model", ["builtin:tiny-llama", "builtin:tiny-bert", "builtin:tiny-t5"])
def test_the_fit_need_is_never_under_what_a_load_allocates_on_each_card(model):
    """Calibration on a 2-card fleet: the need was 0.3-1.7% under memory_allocated after the load (the
    allocator rounds every tensor up to 512 bytes); now it counts that rounding."""
    import torch

    from pytest_llmload import load_model, make_spec, virtual_gpus
    from pytest_llmload._internal.planning.fit_check import cell_need

    with virtual_gpus("2x24GiB"):
        free = {i: torch.cuda.mem_get_info(i)[0] for i in range(2)}
        need = cell_need(make_spec(model, "balanced", "fp32"), {**free, "cpu": 64 * 2**30})
        loaded = load_model(model, device_map="balanced", precision="fp32")
        for card in range(2):
            allocated = torch.cuda.memory_allocated(card)
            assert allocated <= need.get(card, 0) <= 1.10 * allocated, (card, need, allocated)
        del loaded


def test_adamw_state_is_counted_in_the_weights_dtype():
    """torch's AdamW keeps its moments in the parameter's dtype: bf16 weights take half the fp32 state
    (the estimate counted fp32 moments, 1.6x what two steps measured)."""
    from pytest_llmload import estimate_training_memory

    fp32 = estimate_training_memory("builtin:tiny-llama", precision="fp32")
    bf16 = estimate_training_memory("builtin:tiny-llama", precision="bf16")
    assert fp32.optimizer == 2 * fp32.gradients and bf16.optimizer == 2 * bf16.gradients
    assert bf16.optimizer * 2 == fp32.optimizer
    lora = estimate_training_memory("builtin:tiny-llama", precision="bf16", lora={"r": 8})
    assert lora.optimizer == 8 * lora.trainable_parameters  # peft's adapters are fp32


def test_memory_this_process_no_longer_uses_is_given_back_before_a_cell_is_skipped(pytester):
    """Earlier tests left a freed tensor's blocks reserved (torch's caching allocator, modelled by the fleet) and a
    tensor in a reference cycle no one holds: with no cached model to evict, the fit check collects and empties
    the CUDA cache before it decides to skip, and the cell runs."""
    pytester.makeconftest(
        """
        import gc

        def pytest_sessionfinish():
            gc.enable()
        """
    )
    pytester.makepyfile(
        """
        import gc
        import torch

        def test_a_big_temporary():
            x = torch.empty(7 * 2**19, dtype=torch.uint8, device="cuda:0")  # 3.5 MiB of the 4
            del x
            assert torch.cuda.memory_reserved(0) >= 7 * 2**19 and torch.cuda.memory_allocated(0) == 0

        def test_a_tensor_in_a_cycle():
            gc.disable()  # only a collection frees it (the conftest enables it again)
            x = [torch.empty(7 * 2**19, dtype=torch.uint8, device="cuda:0")]
            x.append(x)
            del x
            assert torch.cuda.memory_allocated(0) == 7 * 2**19

        def test_the_cell_after_them(llm_model):
            assert next(llm_model.parameters()).device.type == "cuda"
        """
    )
    args = ("--llm-virtual-gpus=1x4MiB", "--llm-model=builtin:tiny-llama", "--llm-device-map=cuda:0",
            "--llm-precision=fp32", "--llm-leak-check=off", "-p", "no:randomly", "-rs")
    pytester.runpytest(*args, "-k", "big_temporary or after_them").assert_outcomes(passed=2)
    pytester.runpytest(*args, "-k", "in_a_cycle or after_them").assert_outcomes(passed=2)
