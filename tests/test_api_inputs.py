"""Issue 12, items 2 (input_device), 3, 4 and 11: what the public functions accept, and how they refuse the rest."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from maps import GPT2_CPU_DISK

import pytest_llmload
from pytest_llmload import (
    LLMLoadUsageError,
    assert_device_map,
    assert_memory_footprint,
    assert_outputs_close,
    input_device,
    load_model,
    load_tokenizer,
    parse_size,
    plan_device_map,
    validate_device_map,
)
from pytest_llmload.strategies import device_maps, invalid_device_maps, max_memory_budgets


@pytest.fixture(scope="module")
def llama():
    return load_model("builtin:tiny-llama", device_map="cpu", precision="fp32")


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    return load_tokenizer("builtin:tiny-gpt2")


# -- item 2: input_device ----------------------------------------------------------------------------


def test_input_device_is_exported():
    assert "input_device" in pytest_llmload.__all__
    assert pytest_llmload.input_device is input_device


def _generate(model, tokenizer):
    inputs = tokenizer("The capital of France is", return_tensors="pt").to(input_device(model))
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[-1] == inputs.input_ids.shape[-1] + 3


def test_input_device_of_a_plain_cpu_load(gpt2_tokenizer):
    model = load_model("builtin:tiny-gpt2", device_map="cpu", precision="fp32")
    assert input_device(model) == torch.device("cpu")
    _generate(model, gpt2_tokenizer)


def test_input_device_under_a_cpu_and_disk_map(gpt2_tokenizer, tmp_path):
    model = load_model("builtin:tiny-gpt2", device_map=GPT2_CPU_DISK, precision="fp32", offload_folder=str(tmp_path))
    assert input_device(model) == torch.device("cpu")
    _generate(model, gpt2_tokenizer)


def test_input_device_when_the_whole_model_is_on_disk(gpt2_tokenizer, tmp_path):
    """The README's `disk` map: model.device is meta, so `.to(model.device)` cannot run; input_device can."""
    model = load_model("builtin:tiny-gpt2", device_map={"": "disk"}, precision="fp32", offload_folder=str(tmp_path))
    assert model.device == torch.device("meta")
    assert input_device(model) == torch.device("cpu")
    _generate(model, gpt2_tokenizer)


def test_input_device_follows_the_outermost_accelerate_hook():
    """Where accelerate moves the inputs wins over where parameters are (a GPU main device beside cpu weights)."""
    from accelerate.hooks import AlignDevicesHook, ModelHook, SequentialHook, add_hook_to_module

    outer = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    add_hook_to_module(outer[1], AlignDevicesHook(execution_device="cpu"))
    assert input_device(outer) == torch.device("cpu")
    root_hook = SequentialHook(ModelHook(), AlignDevicesHook(execution_device="meta", io_same_device=True))
    add_hook_to_module(outer, root_hook)
    assert input_device(outer) == torch.device("meta")  # params are on cpu; the root's hook says meta


def test_input_device_of_a_model_without_weights():
    with torch.device("meta"):
        module = torch.nn.Linear(2, 2)
    assert input_device(module) == torch.device("meta")
    with pytest.raises(TypeError, match="input_device needs a torch module.*got str"):
        input_device("builtin:tiny-llama")


# -- item 3: what assert_outputs_close takes as inputs -----------------------------------------------


def test_outputs_close_accepts_a_tensor_a_dict_and_a_batch_encoding(llama):
    tokenizer = load_tokenizer("builtin:tiny-llama")
    encoding = tokenizer(["hello world", "the cat sat"], return_tensors="pt", padding=True)
    assert type(encoding).__name__ == "BatchEncoding"
    assert_outputs_close(llama, llama, encoding.input_ids)           # a tensor is input_ids
    assert_outputs_close(llama, llama, encoding.input_ids[0])        # one sequence, 1-D
    assert_outputs_close(llama, llama, dict(encoding))
    assert_outputs_close(llama, llama, encoding)


def test_outputs_close_compares_what_it_is_given(llama):
    """The tensor really is used: a model that differs on those ids fails, naming the difference."""
    noisy = load_model("builtin:tiny-llama", device_map="cpu", precision="fp32")  # a fresh copy
    with torch.no_grad():
        noisy.lm_head.weight.mul_(1.5)
    with pytest.raises(AssertionError, match="outputs differ from the reference"):
        assert_outputs_close(noisy, llama, torch.tensor([[1, 2, 3, 4]]))


def test_outputs_close_with_a_tensor_on_an_encoder_decoder():
    t5 = load_model("builtin:tiny-t5", device_map="cpu", precision="fp32")
    assert_outputs_close(t5, t5, torch.tensor([[5, 6, 7, 8]]))


@pytest.mark.parametrize("inputs, named", [
    ([[1, 2, 3]], "builtins.list"),
    ("hello", "builtins.str"),
    ((1, 2), "builtins.tuple"),
    (torch.ones(2, 3), "torch.float32 tensor"),
    ({1: torch.tensor([[1, 2]])}, "has the key 1"),
    ({}, "is empty"),
])
def test_outputs_close_refuses_other_inputs_in_one_clear_type_error(llama, inputs, named):
    with pytest.raises(TypeError) as info:
        assert_outputs_close(llama, llama, inputs)
    message = str(info.value)
    assert message.startswith("assert_outputs_close: inputs")
    assert named in message and "\n" not in message
    if "builtins" in named:
        assert "a tensor of token ids (input_ids), a dict of model inputs" in message and "BatchEncoding" in message


# -- item 4: assert_device_map on modules that do not exist --------------------------------------------


@pytest.mark.parametrize("expected, hint", [
    ({"foo.bar": "cpu"}, ""),
    ({"model.layers.9": "cpu"}, " (model.layers has 4: 0..3)"),
    ({"model.layers.9": "disk"}, " (model.layers has 4: 0..3)"),
    ({"model.embed_token": "cpu"}, " (did you mean 'model.embed_tokens'?)"),
])
def test_device_map_fails_for_modules_that_do_not_exist(llama, expected, hint):
    with pytest.raises(AssertionError) as info:
        assert_device_map(llama, expected)
    message = str(info.value)
    (entry,) = expected
    assert f"  {entry!r} names no module of LlamaForCausalLM{hint}" in message.splitlines()
    assert "actual" not in message  # no device is reported for a module that is not there


def test_device_map_reports_a_missing_module_beside_real_mismatches(tmp_path):
    model = load_model("builtin:tiny-gpt2", device_map=GPT2_CPU_DISK, precision="fp32", offload_folder=str(tmp_path))
    with pytest.raises(AssertionError) as info:
        assert_device_map(model, {"transformer.h.1": "cpu", "transformer.h.7": "disk"}, exact=True)
    lines = str(info.value).splitlines()
    assert "  'transformer.h.7' names no module of GPT2LMHeadModel (transformer.h has 4: 0..3)" in lines
    assert any(line.split()[:3] == ["transformer.h.1", "(12", "tensors)"] or line.startswith("  transformer.h.1")
               for line in lines)
    assert not any(line.strip().startswith("transformer.h.7") for line in lines)
    assert_device_map(model, {"transformer.h.1": "disk", "transformer.h.1.mlp.c_fc.weight": "disk"})  # tensors exist
    assert_device_map(model, {"lm_head.weight": "cpu"})  # a tied weight, under its second name


# -- item 11: sizes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value, why", [
    (float("inf"), "larger than any memory"),
    (float("-inf"), "cannot be negative"),
    (float("nan"), "not a number"),
    (1e300, "larger than any memory"),
    (2**63, "larger than any memory"),
    ("9" * 400 + " GiB", "larger than any memory"),
])
def test_parse_size_refuses_non_finite_and_huge_values(value, why):
    with pytest.raises(LLMLoadUsageError, match=f"^invalid size .*{why}") as info:
        parse_size(value)
    assert len(str(info.value)) < 300  # a 400-digit value is shown shortened


def test_parse_size_keeps_the_largest_sane_value():
    assert parse_size(2**63 - 1) == 2**63 - 1
    assert parse_size("8 TiB") == 8 * 2**40


def test_infinite_sizes_reach_users_as_usage_errors(llama):
    with pytest.raises(LLMLoadUsageError, match="invalid size inf"):
        assert_memory_footprint(llama, max=float("inf"))
    with pytest.raises(LLMLoadUsageError, match="invalid size inf"):
        plan_device_map("builtin:tiny-llama", cpu_memory=float("inf"))
    with pytest.raises(LLMLoadUsageError, match="invalid size inf"):
        load_model("builtin:tiny-llama", device_map="cpu", max_memory={"cpu": float("inf")})


# -- item 11: validate_device_map ---------------------------------------------------------------------


@pytest.mark.parametrize("gpus", ["2", 2.0, True, -1])
def test_validate_device_map_refuses_a_gpu_count_that_is_not_one(gpus):
    with pytest.raises(LLMLoadUsageError, match=f"^validate_device_map: gpus={gpus!r} is not a GPU count"):
        validate_device_map("builtin:tiny-llama", {"": "cpu"}, gpus=gpus)


@pytest.mark.parametrize("device_map", [{1: "cpu"}, {"": "cpu", 0: "cpu"}, {("model",): "cpu"}])
def test_validate_device_map_refuses_keys_that_are_not_module_names(device_map):
    with pytest.raises(LLMLoadUsageError, match=r"^validate_device_map: map key .* is not a module name"):
        validate_device_map("builtin:tiny-llama", device_map, gpus=0)


# -- item 11: assert_device_map(devices=...) ----------------------------------------------------------


def test_a_single_device_is_the_set_of_that_device(llama):
    assert_device_map(llama, devices="cpu")
    assert_device_map(llama, devices=torch.device("cpu"), exact=True)
    assert_device_map(llama, "cpu", exact=True)
    with pytest.raises(AssertionError, match=r"devices used: cpu; expected cuda:0 \(unused: cuda:0\)"):
        assert_device_map(llama, devices=0)
    with pytest.raises(AssertionError, match=r"devices used: cpu; expected disk \(unused: disk\)$"):
        assert_device_map(llama, devices="disk")


@pytest.mark.parametrize("kwargs, match", [
    ({"devices": {"cpu": 1}}, r"devices=\{'cpu': 1\} \(dict\) is not accepted"),
    ({"devices": ["cpu", "gpu"]}, r"devices: 'gpu' is not a device"),
    ({"expected": 1.5}, r"expected=1.5 \(float\) is not accepted"),
    ({"expected": {"lm_head": None}}, r"expected\['lm_head'\]: None is not a device"),
    ({"expected": {"cpu"}, "devices": {"cpu"}}, "give the set of devices once"),
])
def test_assert_device_map_refuses_malformed_arguments(llama, kwargs, match):
    with pytest.raises(LLMLoadUsageError, match=match):
        assert_device_map(llama, **kwargs)


# -- item 11: strategies ------------------------------------------------------------------------------


@pytest.mark.parametrize("call, match", [
    (lambda: device_maps("builtin:nope"), r"^model='builtin:nope': unknown built-in model"),
    (lambda: device_maps("builtin:tiny-llama", devices=b"cpu"), r"^devices=b'cpu' is a single value"),
    (lambda: device_maps("builtin:tiny-llama", devices="cpu"), r"^devices='cpu' is a single value"),
    (lambda: device_maps("builtin:tiny-llama", devices=0), r"^devices=0 is a single value"),
    (lambda: device_maps("builtin:tiny-llama", devices={"cpu", "disk"}), r"is unordered"),
    (lambda: device_maps("builtin:tiny-llama", devices=None), r"^devices=None is a NoneType"),
    (lambda: device_maps("builtin:tiny-llama", devices=[]), r"^devices=\[\] is empty"),
    (lambda: device_maps("builtin:tiny-llama", devices=("cpu", None)), r"^devices: None is not a device"),
    (lambda: device_maps("builtin:tiny-llama", max_depth=True), r"^max_depth=True"),
    (lambda: device_maps("builtin:tiny-llama", max_depth=1.0), r"^max_depth=1.0"),
    (lambda: invalid_device_maps("builtin:nope"), r"^model='builtin:nope'"),
    (lambda: invalid_device_maps("builtin:tiny-llama", devices=b"cpu"), r"^devices=b'cpu'"),
    (lambda: invalid_device_maps("builtin:tiny-llama", kinds="gap"), r"kinds=\('gap',\)"),
    (lambda: invalid_device_maps("builtin:tiny-llama", kinds=None), r"^kinds=None"),
    (lambda: invalid_device_maps("builtin:tiny-llama", kinds=[]), r"^kinds=\[\]"),
    (lambda: max_memory_budgets(gpus=True), r"^gpus=True"),
    (lambda: max_memory_budgets(gpus="2"), r"^gpus='2'"),
    (lambda: max_memory_budgets(min_size=float("inf")), r"^min_size: invalid size inf"),
    (lambda: max_memory_budgets(max_size="lots"), r"^max_size: invalid size 'lots'"),
    (lambda: max_memory_budgets(cpu="yes"), r"^cpu='yes': expected True or False"),
    (lambda: max_memory_budgets(disk=None), r"^disk=None"),
    (lambda: max_memory_budgets(zero=1), r"^zero=1"),
])
def test_strategies_refuse_bad_arguments_with_invalid_argument(call, match):
    with pytest.raises(InvalidArgument, match=match):
        call()


def test_devices_that_mean_the_same_are_one_device():
    """0 and "cuda:0" are one device: drawing from both cannot make a map look multi-device."""
    strategy = device_maps("builtin:tiny-gpt2", devices=(0, "cuda:0"))

    @settings(max_examples=20)
    @given(strategy)
    def check(device_map):
        assert set(device_map.values()) == {0}

    check()


@pytest.mark.parametrize("devices", [
    ("cpu", "disk"), (0, "cuda:1", "cpu"), ("cuda:0", "cuda:7"), (0, 1, "cpu"), ("cuda:3", 2), (0, 64),
])
def test_unknown_device_maps_always_name_a_device_outside_devices(devices):
    from pytest_llmload._internal.planning.devices import normalize_device

    allowed = {normalize_device(d) for d in devices}
    strategy = invalid_device_maps("builtin:tiny-gpt2", devices=devices, kinds=("unknown_device",))

    @settings(max_examples=15)
    @given(strategy)
    def check(broken):
        assert broken.kind == "unknown_device"
        strays = {normalize_device(d) for d in broken.device_map.values()} - allowed
        assert len(strays) == 1
        gpus = max([int(d.split(":")[1]) for d in allowed if d.startswith("cuda:")], default=-1) + 1
        problems = validate_device_map("builtin:tiny-gpt2", broken.device_map, gpus=gpus)
        assert any("which does not exist" in p for p in problems), problems

    check()


@given(st.data())
@settings(max_examples=10)
def test_budget_flags_are_honoured(data):
    budget = data.draw(max_memory_budgets(gpus=0, cpu=True, disk=False, zero=False))
    assert set(budget) == {"cpu"}
