"""Real loads of the built-in checkpoints on the CPU, through transformers' own from_pretrained."""

from __future__ import annotations

import gc
import os
import shutil
import warnings

import pytest
import torch

from pytest_llmload import effective_device_map, load_model, load_tokenizer
from pytest_llmload import builtin_path
from pytest_llmload.errors import LLMLoadUsageError, ModelLoadError
from pytest_llmload import prepare_load

from maps import GPT2_CPU_DISK



def _logits(model, text="the quick brown fox", name="tiny-gpt2"):
    tokenizer = load_tokenizer(f"builtin:{name}")
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("fp16", torch.float16),
                                              ("bf16", torch.bfloat16), ("auto", torch.float32)])
def test_float_precisions_set_the_dtype(precision, dtype):
    model = load_model("builtin:tiny-llama", precision=precision)
    assert {p.dtype for p in model.parameters()} == {dtype}


def test_default_load_is_single_device_cpu():
    model = load_model("builtin:tiny-llama", device_map="auto")
    assert effective_device_map(model) == {"": "cpu"}
    assert type(model).__name__ == "LlamaForCausalLM"


def test_int8_load_on_cpu_quantizes_linears():
    import bitsandbytes as bnb

    model = load_model("builtin:tiny-llama", precision="int8", device_map="cpu")
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, bnb.nn.Linear8bitLt)
    assert layer.weight.dtype == torch.int8
    assert model.get_memory_footprint() < load_model("builtin:tiny-llama", precision="fp32").get_memory_footprint()
    assert torch.isfinite(_logits(model, name="tiny-llama")).all()


@pytest.mark.parametrize("precision", ["nf4", "fp4"])
def test_4bit_load_on_cpu(precision):
    import bitsandbytes as bnb

    model = load_model("builtin:tiny-llama", precision=precision, device_map="cpu")
    layer = model.model.layers[1].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit)
    assert layer.weight.quant_state.quant_type == precision
    assert torch.isfinite(_logits(model, name="tiny-llama")).all()


def test_cpu_disk_map_really_offloads_and_matches_single_device(tmp_path):
    reference = load_model("builtin:tiny-gpt2", precision="fp32")
    folder = tmp_path / "offload"
    model = load_model("builtin:tiny-gpt2", device_map=GPT2_CPU_DISK, offload_folder=str(folder))
    assert effective_device_map(model) == GPT2_CPU_DISK
    offloaded = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    assert offloaded and all(n.startswith(("transformer.h.1.", "transformer.h.2.")) for n in offloaded)
    assert all(p.device.type == "cpu" for n, p in model.named_parameters() if n.startswith("transformer.h.0."))
    assert torch.equal(_logits(model), _logits(reference))


def test_own_offload_folder_is_removed_with_the_model(isolated_tmp):
    info = prepare_load("builtin:tiny-gpt2", device_map=GPT2_CPU_DISK)
    model = info.run()
    assert info.offload_folder and os.path.isdir(info.offload_folder)
    assert info.offload_folder.startswith(str(isolated_tmp))
    del model
    gc.collect()
    assert not os.path.exists(info.offload_folder)
    assert os.listdir(isolated_tmp) == []


def test_int8_on_cpu_and_disk_is_refused_not_silently_float():
    with pytest.raises(LLMLoadUsageError, match="nothing would be quantized"):
        load_model("builtin:tiny-gpt2", device_map=GPT2_CPU_DISK, precision="int8")


def test_encoder_and_seq2seq_classes_come_from_the_checkpoint():
    bert = load_model("builtin:tiny-bert")
    assert type(bert).__name__ == "BertModel"
    tokenizer = load_tokenizer("builtin:tiny-bert")
    out = bert(**tokenizer("an encoder", return_tensors="pt"))
    assert out.last_hidden_state.shape[-1] == 64
    t5 = load_model("builtin:tiny-t5", precision="fp16")
    assert type(t5).__name__ == "T5ForConditionalGeneration"
    mixtral = load_model("builtin:tiny-mixtral")
    assert type(mixtral).__name__ == "MixtralForCausalLM"


def test_model_class_override():
    model = load_model("builtin:tiny-bert", model_class="AutoModelForSequenceClassification")
    assert type(model).__name__ == "BertForSequenceClassification"
    with pytest.raises(LLMLoadUsageError, match="unknown model class 'NoSuchModel'"):
        load_model("builtin:tiny-bert", model_class="NoSuchModel")


def test_legacy_load_in_8bit_is_translated_with_a_deprecation_warning():
    import bitsandbytes as bnb

    with pytest.warns(DeprecationWarning, match="load_in_8bit=True was removed .* transformers 5"):
        model = load_model("builtin:tiny-llama", load_in_8bit=True, device_map="cpu")
    assert isinstance(model.model.layers[0].mlp.down_proj, bnb.nn.Linear8bitLt)
    with pytest.warns(DeprecationWarning, match="load_in_4bit"):
        model = load_model("builtin:tiny-llama", load_in_4bit=True, bnb_4bit_quant_type="fp4", device_map="cpu")
    assert model.model.layers[0].mlp.down_proj.weight.quant_state.quant_type == "fp4"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(LLMLoadUsageError, match="contradicts"):
            load_model("builtin:tiny-llama", load_in_8bit=True, precision="fp16")


def test_process_map_is_this_process_device_without_gpus(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    info = prepare_load("builtin:tiny-llama", device_map="process")
    assert info.device_map == {"": "cpu"}
    model = info.run()
    assert effective_device_map(model) == {"": "cpu"}


def _copy_builtin(tmp_path, name="tiny-gpt2"):
    target = tmp_path / name
    shutil.copytree(builtin_path(name), target)
    return target


def test_pickle_only_checkpoint_needs_opt_in(tmp_path):
    target = _copy_builtin(tmp_path)
    model = load_model(str(target))
    torch.save(model.state_dict(), target / "pytorch_model.bin")
    (target / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"has only pickle weights \(pytorch_model.bin\).*--llm-allow-pickle"):
        load_model(str(target))
    assert type(load_model(str(target), allow_pickle=True)).__name__ == "GPT2LMHeadModel"


def test_directory_without_weights_fails_with_one_line(tmp_path):
    target = _copy_builtin(tmp_path)
    (target / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError) as info:
        load_model(str(target))
    assert str(target) in str(info.value) and "\n" not in str(info.value)


def test_hub_id_without_network_fails_once_with_advice(offline_hub):
    with pytest.raises(ModelLoadError, match=r"cannot load model 'someorg/not-here': the hub is not reachable "
                                             r"\(HF_HUB_OFFLINE is set\) and it is not in the local cache"):
        load_model("someorg/not-here")


def test_remote_code_is_refused_unless_trusted(tmp_path):
    import json

    target = _copy_builtin(tmp_path)
    config = json.loads((target / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="needs code from the checkpoint.*--llm-trust-remote-code"):
        load_model(str(target))


def test_prepare_load_is_the_one_load_path(isolated_tmp):
    """What load_model, the cache and the fixtures call from_pretrained with, without loading a weight."""
    call = prepare_load("builtin:tiny-llama", device_map="cpu", precision="fp16", use_cache=False)
    assert call.kwargs["dtype"] == torch.float16 and call.kwargs["device_map"] == {"": "cpu"}
    assert call.kwargs["config"].use_cache is False and "use_cache" not in call.kwargs  # a config override
    assert call.kwargs["local_files_only"] is True and call.kwargs["use_safetensors"] is True
    assert call.offload_folder is None and os.listdir(isolated_tmp) == []
    failing = prepare_load("builtin:tiny-gpt2", device_map=GPT2_CPU_DISK, not_an_argument=1)
    assert os.path.isdir(failing.offload_folder)
    with pytest.raises(ModelLoadError):
        failing.run()
    assert not os.path.exists(failing.offload_folder)  # a failed load leaves no folder
