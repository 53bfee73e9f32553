"""Assertions and validation on real models: each sound case passes and each fault fails with its message."""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest
import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

from pytest_llmload._internal.compat.transformers import enable_activation_checkpointing
from pytest_llmload import (
    assert_device_map,
    assert_int8_trainable,
    assert_memory_footprint,
    assert_outputs_close,
    device_hops,
    expected_footprint,
    load_model,
    prepare_model_for_int8_training,
    validate_device_map,
)
from pytest_llmload import builtin_path

from maps import GPT2_CPU_DISK

LLAMA_MAP = {
    "model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "model.layers.2": 1,
    "model.layers.3": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
}


def lora():
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


# -- validate_device_map ----------------------------------------------------------------------------


def test_sound_maps_have_no_problems():
    assert validate_device_map("builtin:tiny-gpt2", GPT2_CPU_DISK) == []
    assert validate_device_map("builtin:tiny-llama", LLAMA_MAP, gpus=2) == []
    assert validate_device_map("builtin:tiny-llama", {"": "cpu"}) == []
    model = load_model("builtin:tiny-gpt2", device_map=GPT2_CPU_DISK)  # a loaded (partly meta) model
    assert validate_device_map(model, GPT2_CPU_DISK) == []


def test_incomplete_map():
    incomplete = {k: v for k, v in LLAMA_MAP.items() if k != "model.layers.3"}
    problems = validate_device_map("builtin:tiny-llama", incomplete, gpus=2)
    assert problems == ["9 parameter(s)/buffer(s) are on no device (no entry covers them): "
                        "model.layers.3.self_attn.q_proj, model.layers.3.self_attn.k_proj, "
                        "model.layers.3.self_attn.v_proj, model.layers.3.self_attn.o_proj and 5 more"]


def test_unknown_module_and_unknown_device():
    problems = validate_device_map("builtin:tiny-llama", {**LLAMA_MAP, "model.layers.9": "cpu"}, gpus=1)
    assert "entry 'model.layers.9' names no module or parameter of LlamaForCausalLM (model.layers has 4: 0..3)" in problems
    assert "entry 'model.layers.1' puts it on cuda:1, which does not exist 1 GPU(s) planned" in problems


def test_devices_that_do_not_exist_here():
    problems = validate_device_map("builtin:tiny-llama", LLAMA_MAP)  # no GPU on this machine
    assert "entry 'model.embed_tokens' puts it on cuda:0, which does not exist here" in problems


def test_split_decoder_layer():
    split = {**LLAMA_MAP, "model.layers.1.self_attn": 0, "model.layers.1.mlp": 1,
             "model.layers.1.input_layernorm": 1, "model.layers.1.post_attention_layernorm": 1}
    del split["model.layers.1"]
    problems = validate_device_map("builtin:tiny-llama", split, gpus=2)
    assert problems == ["model.layers.1 (LlamaDecoderLayer) is split over cuda:0 and cuda:1; transformers never "
                        "splits a _no_split_modules block: put all of model.layers.1 on one device"]


def test_tied_embeddings_apart():
    apart = {**GPT2_CPU_DISK, "transformer.wte": 0}
    problems = validate_device_map("builtin:tiny-gpt2", apart, gpus=1)
    assert problems == ["tied weights are on different devices: transformer.wte.weight (cuda:0), "
                        "lm_head.weight (cpu); put them on one device"]
    # untied llama: embeddings apart are fine
    assert validate_device_map("builtin:tiny-llama", {**LLAMA_MAP, "lm_head": 1}, gpus=2) == []


def test_ambiguous_overlap():
    problems = validate_device_map("builtin:tiny-gpt2", {**GPT2_CPU_DISK, "transformer": "cpu"})
    assert problems == ["entry 'transformer' (cpu) overlaps entries inside it on other devices: "
                        "'transformer.h.1' (disk), 'transformer.h.2' (disk); which device wins is ambiguous"]


def test_strategy_is_not_a_map():
    from pytest_llmload.errors import LLMLoadUsageError

    with pytest.raises(LLMLoadUsageError, match="validate_device_map needs a dict"):
        validate_device_map("builtin:tiny-llama", "auto")


def test_incomplete_single_device_map_loads_silently_but_is_reported():
    """transformers 5 treats a map whose entries all name one device as a single-device load and does
    not check coverage (a map over two devices is checked by accelerate and raises); the gap is only
    visible to validate_device_map."""
    gapped = {k: "cpu" for k in GPT2_CPU_DISK if k != "transformer.h.3"}
    model = load_model("builtin:tiny-gpt2", device_map=gapped)
    assert getattr(model, "hf_device_map", None) is None
    assert validate_device_map(model, gapped) == [
        "12 parameter(s)/buffer(s) are on no device (no entry covers them): transformer.h.3.ln_1 (2 tensors), "
        "transformer.h.3.attn.c_attn (2 tensors), transformer.h.3.attn.c_proj (2 tensors), "
        "transformer.h.3.ln_2 (2 tensors) and 2 more"]


# -- assert_device_map -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def offloaded():
    return load_model("builtin:tiny-gpt2", device_map=GPT2_CPU_DISK, precision="fp32")


def test_assert_device_map_passes_for_the_actual_placement(offloaded):
    assert_device_map(offloaded, {"transformer.h.1": "disk", "lm_head": "cpu", "transformer.h.2.mlp": "disk"})
    assert_device_map(offloaded, {"cpu", "disk"})
    assert_device_map(offloaded, GPT2_CPU_DISK, devices={"cpu", "disk"}, exact=True)
    assert_device_map(offloaded, {"cpu"})  # a subset of the devices used, when not exact


def test_assert_device_map_failure_shows_a_table(offloaded):
    with pytest.raises(AssertionError) as info:
        assert_device_map(offloaded, {"transformer.h.1": 0, "lm_head": torch.device("cpu"), "transformer.h.0": "disk"})
    assert str(info.value).splitlines() == [
        "device map of GPT2LMHeadModel is not as expected",
        "  module           expected  actual",
        "  transformer.h.1  cuda:0    disk",
        "  transformer.h.0  disk      cpu",
    ]


def test_assert_device_map_devices_compare_by_meaning():
    model = load_model("builtin:tiny-llama", device_map="cpu")
    assert_device_map(model, {"": torch.device("cpu")}, devices=["cpu"], exact=True)
    with pytest.raises(AssertionError, match=r"devices used: cpu; expected cuda:0 \(unused: cuda:0\)"):
        assert_device_map(model, {0})
    with pytest.raises(AssertionError, match=r"devices used: cpu, disk; expected exactly cpu \(unexpected: disk\)"):
        assert_device_map(load_model("builtin:tiny-gpt2", device_map=GPT2_CPU_DISK), {"cpu"}, exact=True)


def test_exact_compares_every_parameter(offloaded):
    with pytest.raises(AssertionError) as info:
        assert_device_map(offloaded, {"": "cpu"}, exact=True)
    text = str(info.value)
    assert "transformer.h.1.attn.c_attn (2 tensors)  cpu       disk" in text
    assert "transformer.h.0" not in text


def test_device_hops_and_max_hops(offloaded):
    assert device_hops(offloaded) == 0  # disk weights are computed on the cpu
    zigzag = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "cpu",
              "model.layers.3": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = load_model("builtin:tiny-llama", device_map=zigzag)
    assert device_hops(model) == 0
    from pytest_llmload._internal.planning.devices import execution_order_hops

    assert execution_order_hops([0, 1, 0, 1, "cpu"]) == 4
    assert execution_order_hops([0, 0, 1, 1, "cpu", "disk"]) == 2


# -- memory footprint ------------------------------------------------------------------------------


def test_expected_footprint_matches_the_real_loads():
    for precision in ("fp32", "fp16", "int8", "nf4"):
        model = load_model("builtin:tiny-llama", precision=precision, device_map="cpu")
        assert model.get_memory_footprint() == expected_footprint("builtin:tiny-llama", precision).total
    int8, fp16 = expected_footprint("builtin:tiny-llama", "int8"), expected_footprint("builtin:tiny-llama", "fp16")
    assert int8.quantized <= 0.6 * fp16.quantized  # the quantized linears: 1 byte instead of 2
    assert int8.quantized == fp16.quantized // 2
    assert expected_footprint("builtin:tiny-llama", "nf4").quantized == fp16.quantized // 4


def test_assert_memory_footprint():
    model = load_model("builtin:tiny-llama", precision="fp32")
    footprint = model.get_memory_footprint()
    assert_memory_footprint(model, max=footprint, min="100 KiB")
    assert_memory_footprint(model, max="1 MiB")
    with pytest.raises(AssertionError) as info:
        assert_memory_footprint(model, max=expected_footprint(model, "int8"))
    lines = str(info.value).splitlines()
    assert lines[0] == ("LlamaForCausalLM has a memory footprint of 738.3 KiB (756032 bytes), "
                        "over the limit of 306.3 KiB (313664 bytes)")
    assert lines[1].split() == ["biggest", "modules", "bytes"]
    assert lines[2].split() == ["model.embed_tokens", "80.0", "KiB"]
    with pytest.raises(AssertionError, match="under the floor of 1.0 MiB"):
        assert_memory_footprint(model, min="1MiB")


def test_float_model_passed_as_int8_is_caught_by_its_footprint():
    """A 'quantized' model that is really float: over the int8 budget computed from the config."""
    model = load_model("builtin:tiny-llama", precision="fp32")
    with pytest.raises(AssertionError, match="over the limit"):
        assert_memory_footprint(model, max=expected_footprint("builtin:tiny-llama", "int8"))


def test_max_footprint_marker(pytester):
    pytester.makepyfile("""
        import pytest

        @pytest.mark.max_footprint("10 MiB")
        def test_small(llm_model):
            pass

        @pytest.mark.max_footprint("100 KiB")
        def test_big(llm_model):
            pass
    """)
    result = pytester.runpytest("--llm-precision=fp32")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*max_footprint: LlamaForCausalLM has a memory footprint of 738.3 KiB "
                                 "(756032 bytes), over the limit of 100.0 KiB (102400 bytes)*"])


# -- k-bit trainability ----------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["int8", "nf4"])
def test_prepared_kbit_model_with_lora_is_trainable(precision):
    model = load_model("builtin:tiny-llama", precision=precision, device_map="cpu")
    model = get_peft_model(prepare_model_for_kbit_training(model), lora())
    assert_int8_trainable(model)
    assert all(p.grad is None for p in model.parameters())  # the check leaves no gradients behind


def test_float_model_is_not_quantized():
    model = get_peft_model(load_model("builtin:tiny-llama", precision="fp32"), lora())
    with pytest.raises(AssertionError, match="model is not quantized: no bitsandbytes"):
        assert_int8_trainable(model)


def test_int8_model_without_adapters():
    model = prepare_model_for_kbit_training(load_model("builtin:tiny-llama", precision="int8", device_map="cpu"))
    with pytest.raises(AssertionError, match="no trainable adapter parameters.*\n  fix: model = peft.get_peft_model"):
        assert_int8_trainable(model)


def test_unprepared_int8_model_with_reentrant_checkpointing():
    model = load_model("builtin:tiny-llama", precision="int8", device_map="cpu")
    for param in model.parameters():
        param.requires_grad = False
    model = get_peft_model(model, lora())
    enable_activation_checkpointing(model, use_reentrant=True)
    # transformers 5 installs the input-grad hook itself; a model set up by hand (or by an older stack,
    # or one whose hook was removed) is left without it:
    model.disable_input_require_grads()
    with pytest.raises(AssertionError, match="gradient checkpointing is reentrant, but the input embeddings"):
        assert_int8_trainable(model)
    model.enable_input_require_grads()
    assert_int8_trainable(model)


def test_half_precision_norms_are_caught():
    model = load_model("builtin:tiny-llama", precision="int8", device_map="cpu", dtype=torch.float16)
    for param in model.parameters():
        param.requires_grad = False
    model = get_peft_model(model, lora())
    with pytest.raises(AssertionError, match="(?s)non-quantized parameter.*not fp32.*prepare_model_for_kbit_training"):
        assert_int8_trainable(model)


def test_unfrozen_base_weights_are_caught():
    model = get_peft_model(prepare_model_for_kbit_training(
        load_model("builtin:tiny-llama", precision="int8", device_map="cpu")), lora())
    model.base_model.model.model.norm.weight.requires_grad = True
    with pytest.raises(AssertionError, match=r"1 base parameter\(s\) are trainable .*model.norm.weight"):
        assert_int8_trainable(model)


def test_prepare_model_for_int8_training_compat():
    model = load_model("builtin:tiny-llama", precision="int8", device_map="cpu", dtype=torch.float16)
    with pytest.deprecated_call(match="removed from peft in 0.10"):
        model = prepare_model_for_int8_training(model)
    assert_int8_trainable(get_peft_model(model, lora()))


# -- outputs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp16", "bf16", "int8", "nf4"])
def test_quantized_and_half_outputs_are_close_with_default_tolerance(precision):
    reference = load_model("builtin:tiny-llama", precision="fp32")
    assert_outputs_close(load_model("builtin:tiny-llama", precision=precision, device_map="cpu"), reference)


def test_offloaded_outputs_equal_and_corruption_is_caught(tmp_path):
    checkpoint = tmp_path / "gpt2"
    shutil.copytree(builtin_path("tiny-gpt2"), checkpoint)
    model = load_model(str(checkpoint), device_map=GPT2_CPU_DISK, precision="fp32", offload_folder=str(tmp_path / "off"))
    reference = load_model("builtin:tiny-gpt2", precision="fp32")
    assert_outputs_close(model, reference)
    # corrupt the bytes an offloaded layer is read from (a new file: loaded models keep their own pages)
    weights = checkpoint / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    header_len = struct.unpack("<Q", raw[:8])[0]
    begin, _ = json.loads(raw[8:8 + header_len])["transformer.h.1.mlp.c_fc.weight"]["data_offsets"]
    raw[8 + header_len + begin: 8 + header_len + begin + 4096] = bytes(4096)
    (tmp_path / "damaged").write_bytes(raw)
    os.replace(tmp_path / "damaged", weights)
    with pytest.raises(AssertionError) as info:
        assert_outputs_close(model, reference)
    lines = str(info.value).splitlines()
    assert lines[0].startswith("outputs differ from the reference:")
    assert lines[1].startswith("  worst at position (") and "default for fp32" in lines[1]


def test_outputs_close_explicit_tolerance_and_encoders():
    bert = load_model("builtin:tiny-bert", precision="fp32")
    assert_outputs_close(load_model("builtin:tiny-bert", precision="fp16"), bert)
    with pytest.raises(AssertionError, match="out of tolerance"):
        assert_outputs_close(load_model("builtin:tiny-bert", precision="fp16"), bert, atol=1e-9)
    t5 = load_model("builtin:tiny-t5", precision="fp32")
    assert_outputs_close(load_model("builtin:tiny-t5", precision="bf16"), t5)


def test_validate_names_the_close_module_an_entry_missed():
    """`encoder.layers.1` got no hint although `encoder.layer.1` exists (assert_device_map gave one)."""
    import subprocess
    import sys

    problems = validate_device_map("builtin:tiny-bert", {"embeddings": 0, "encoder.layers.1": 0, "pooler": 0})
    assert "entry 'encoder.layers.1' names no module or parameter of BertModel (did you mean 'encoder.layer.1'?)" \
        in problems
    problems = validate_device_map("builtin:tiny-llama", {"model.layers.9": 0, "": 0})
    assert any("(model.layers has 4: 0..3)" in p for p in problems), problems
    cli = subprocess.run([sys.executable, "-m", "pytest_llmload", "validate", "builtin:tiny-bert",
                          '{"embeddings": 0, "encoder.layers.1": 0, "pooler": 0}', "--gpus", "1"],
                         capture_output=True, text=True, timeout=300)
    assert "(did you mean 'encoder.layer.1'?)" in cli.stdout


def test_our_assertions_make_no_noise_downstream(pytester):
    """A downstream run of expected_footprint / assert_outputs_close / assert_int8_trainable on int8 showed
    14 `torch.jit.script_method` DeprecationWarnings (bitsandbytes' import) and 160 `MatMul8bitLt: inputs
    will be cast` lines under -rA; and expected_footprint of a loaded int8 model raised AttributeError on
    transformers 5.17 (its config holds a BitsAndBytesConfig object, read there as a dict)."""
    pytester.makepyfile("""
        from pytest_llmload import assert_int8_trainable, assert_outputs_close, expected_footprint

        def test_quiet(llm_model, llm_spec, llm_private_model):
            from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

            assert expected_footprint(llm_model, llm_spec.precision).total > 0
            assert_outputs_close(llm_model, llm_model)
            model = prepare_model_for_kbit_training(llm_private_model, use_gradient_checkpointing=False)
            assert_int8_trainable(get_peft_model(model, LoraConfig(r=4)))
    """)
    result = pytester.runpytest_subprocess(
        "-p", "no:randomly", "-rA", "-W", "default",
        # peft 0.21's get_peft_model reads transformers 5.25's deprecated is_gradient_checkpointing: theirs
        "-W", "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning",
        "--llm-device-map=cpu", "--llm-precision=int8")
    result.assert_outcomes(passed=1)
    out = result.stdout.str()
    assert "MatMul8bitLt" not in out and "script_method" not in out and "warnings summary" not in out, out
