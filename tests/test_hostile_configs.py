"""A config.json a user wrote (or damaged) whose sizes cannot build a model: one line naming the field, its
value and what is accepted, from ``plan``, ``estimate``, ``validate``, the fit check and a load alike."""

from __future__ import annotations

import json
import shutil

import pytest

from pytest_llmload import builtin_path, make_spec
from pytest_llmload.cli import main
from pytest_llmload.errors import LLMLoadError


def checkpoint(tmp_path, base: str, **fields):
    """A folder holding a built-in's config.json with ``fields`` changed."""
    folder = tmp_path / f"{base}-bad"
    folder.mkdir(parents=True)
    config = json.loads((builtin_path(base) / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **fields}))
    return folder


WHOLE = "expected a whole number >= 1"
DIMENSION = "expected a whole number from 1 to 16777216"

CASES = {
    "float-hidden-size": ("tiny-llama", {"hidden_size": 1e12}, f"hidden_size=1000000000000.0: {DIMENSION}"),
    "huge-hidden-size": ("tiny-llama", {"hidden_size": 10**12}, f"hidden_size=1000000000000: {DIMENSION}"),
    "huge-n-embd": ("tiny-gpt2", {"n_embd": 10**12}, f"n_embd=1000000000000: {DIMENSION}"),
    "negative-hidden-size": ("tiny-llama", {"hidden_size": -64}, f"hidden_size=-64: {DIMENSION}"),
    "negative-d-model": ("tiny-t5", {"d_model": -64}, f"d_model=-64: {DIMENSION}"),
    "negative-intermediate": ("tiny-llama", {"intermediate_size": -1}, f"intermediate_size=-1: {DIMENSION}"),
    "tp-plan-string": ("tiny-llama", {"base_model_tp_plan": "x"},
                       "base_model_tp_plan='x': expected an object of module names to plans, or null"),
    "pp-plan-number": ("tiny-llama", {"base_model_pp_plan": 5},
                       "base_model_pp_plan=5: expected an object of module names to plans, or null"),
    "no-layers": ("tiny-llama", {"num_hidden_layers": 0}, f"num_hidden_layers=0: {WHOLE}"),
    "negative-layers": ("tiny-llama", {"num_hidden_layers": -3}, f"num_hidden_layers=-3: {WHOLE}"),
    "string-layers": ("tiny-llama", {"num_hidden_layers": "4"}, f"num_hidden_layers='4': {WHOLE}"),
    "gpt2-no-layers": ("tiny-gpt2", {"n_layer": 0}, f"n_layer=0: {WHOLE}"),
    "t5-no-layers": ("tiny-t5", {"num_layers": 0}, f"num_layers=0: {WHOLE}"),
    "no-heads": ("tiny-llama", {"num_attention_heads": 0}, f"num_attention_heads=0: {DIMENSION}"),
    "gpt2-no-heads": ("tiny-gpt2", {"n_head": 0}, f"n_head=0: {DIMENSION}"),
    "no-vocab": ("tiny-bert", {"vocab_size": 0}, f"vocab_size=0: {DIMENSION}"),
    "kv-heads-not-a-divisor": ("tiny-llama", {"num_key_value_heads": 3},
                               "num_key_value_heads=3: expected a divisor of num_attention_heads=4"),
}


@pytest.mark.parametrize("command", ["plan", "estimate", "validate"])
@pytest.mark.parametrize("case", CASES)
def test_a_config_that_cannot_build_a_model_is_one_line_naming_the_field(tmp_path, capsys, case, command):
    base, fields, problem = CASES[case]
    folder = checkpoint(tmp_path, base, **fields)
    argv = [command, str(folder)] + (['{"": "cpu"}'] if command == "validate" else [])
    code = main(argv)
    _, err = capsys.readouterr()
    assert code == 2, err
    assert err == f"llmload {command}: invalid config.json of {str(folder)!r}: {problem}\n"


def test_plan_with_gpus_names_the_field_not_what_transformers_trips_on(tmp_path, capsys):
    folder = checkpoint(tmp_path, "tiny-llama", num_hidden_layers=0)
    assert main(["plan", str(folder), "--gpus", "2x24GiB"]) == 2
    _, err = capsys.readouterr()
    assert err == f"llmload plan: invalid config.json of {str(folder)!r}: num_hidden_layers=0: {WHOLE}\n"


def test_a_config_json_given_as_the_file_names_its_folder(tmp_path, capsys):
    folder = checkpoint(tmp_path, "tiny-llama", num_hidden_layers=-3)
    assert main(["estimate", str(folder / "config.json")]) == 2
    _, err = capsys.readouterr()
    assert err == f"llmload estimate: invalid config.json of {str(folder)!r}: num_hidden_layers=-3: {WHOLE}\n"


def test_transformers_own_validation_keeps_the_field_and_the_reason(tmp_path, capsys):
    # Multi-line messages of transformers' validators: joined into the one line, not cut after the first.
    folder = checkpoint(tmp_path, "tiny-llama", rms_norm_eps="tiny")
    assert main(["plan", str(folder)]) == 2
    _, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith(f"llmload plan: invalid config.json of {str(folder)!r}: "), err
    assert "'rms_norm_eps'" in err and "expected float, got str" in err, err
    folder = checkpoint(tmp_path / "heads", "tiny-llama", num_attention_heads=3, num_key_value_heads=3)
    assert main(["plan", str(folder)]) == 2
    _, err = capsys.readouterr()
    assert err.count("\n") == 1, err
    assert "The hidden size (64) is not a multiple of the number of attention heads (3)" in err, err


def test_sub_configs_and_config_objects_are_checked_alike():
    from transformers import LlamaConfig, T5Config

    from pytest_llmload import plan_device_map

    with pytest.raises(LLMLoadError, match=r"^invalid config LlamaConfig: num_hidden_layers=0: expected a whole "):
        plan_device_map(LlamaConfig(num_hidden_layers=0))
    config = T5Config(num_layers=2, num_decoder_layers=0)
    with pytest.raises(LLMLoadError, match=r"^invalid config T5Config: num_decoder_layers=0: "):
        plan_device_map(config)


def test_the_fit_check_and_a_load_say_the_same_line(tmp_path, pytester):
    from pytest_llmload._internal.planning.fit_check import cell_need

    folder = checkpoint(tmp_path, "tiny-llama", num_hidden_layers=-3)
    line = f"invalid config.json of {str(folder)!r}: num_hidden_layers=-3: {WHOLE}"
    with pytest.raises(LLMLoadError) as info:
        cell_need(make_spec(str(folder), "cpu", "fp32"), {"cpu": 2**40})
    assert str(info.value) == line
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        if (builtin_path("tiny-llama") / name).exists():
            shutil.copy(builtin_path("tiny-llama") / name, folder / name)
    pytester.makepyfile("def test_a(llm_model): pass")
    result = pytester.runpytest(f"--llm-model={folder}", "--llm-device-map=cpu")
    result.assert_outcomes(errors=1)
    (report,) = [r for r in result.reprec.getreports("pytest_runtest_logreport") if r.failed]
    assert str(report.longrepr) == line
    assert "Traceback" not in result.stdout.str()
