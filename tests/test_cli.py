"""The ``llmload`` command line: what it prints, what it assumes, how it fails, what it imports, its limits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from pytest_llmload import load_model
from pytest_llmload import builtin_path
from pytest_llmload.cli import main
from pytest_llmload.errors import LLMLoadUsageError
from pytest_llmload import estimate_training_memory
from pytest_llmload import parse_fleet, plan_device_map


def run_cli(capsys, *argv):
    """``(exit status, stdout, stderr)`` of ``main(argv)``."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, command):
    assert code == 2, err
    assert err.startswith(f"llmload {command}: ") and err.count("\n") == 1, err
    assert "Traceback" not in err


def python(script: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh interpreter (this checkout first on the path), as a user's process would."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in [os.path.dirname(os.path.dirname(__file__)),
                                                                   os.environ.get("PYTHONPATH", "")] if p))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          env=env, timeout=timeout)


@pytest.fixture
def config_only(tmp_path):
    """A folder with nothing but tiny-llama's config.json."""
    folder = tmp_path / "config-only"
    folder.mkdir()
    shutil.copy(builtin_path("tiny-llama") / "config.json", folder / "config.json")
    return folder


# -- estimate --------------------------------------------------------------------------------------


def test_int8_without_lora_names_the_cli_flag(capsys):
    code, _, err = run_cli(capsys, "estimate", "builtin:tiny-llama", "--precision", "int8")
    assert_one_line_error(code, err, "estimate")
    assert "add --lora-r 8" in err
    assert "lora=" not in err and "{" not in err


def test_estimate_json_keeps_the_optimizer_bytes(capsys):
    code, out, _ = run_cli(capsys, "estimate", "builtin:tiny-llama", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["optimizer"] == data["trainable_parameters"] * 8  # AdamW: two fp32 moments
    assert data["assumptions"]["optimizer"] == "adamw"
    assert data["total"] == sum(data[k] for k in ("weights", "gradients", "optimizer", "activations", "cuda_context"))


def test_estimate_plans_a_strategy_on_the_given_gpus(capsys):
    code, out, _ = run_cli(capsys, "estimate", "builtin:tiny-llama", "--device-map", "balanced",
                           "--gpus", "2x1MiB", "--json")
    assert code == 0
    data = json.loads(out)
    plan = plan_device_map("builtin:tiny-llama", "balanced", gpus="2x1MiB")
    assert data["assumptions"]["device_map"] == plan.device_map
    assert set(data["per_device"]) == {"0", "1"}
    assert data["cuda_context"] == 2 * 500 * 2**20
    assert any("planned by balanced on 2 GPU(s)" in note for note in data["notes"])


@pytest.mark.parametrize("argv, needle", [
    (["--device-map", "auto"], "give them with --gpus"),
    (["--device-map", "process"], "with --device-map 0"),
    (["--device-map", "cpu", "--gpus", "2x1MiB"], "--gpus plans a strategy --device-map"),
])
def test_estimate_device_maps_it_cannot_split_are_one_line(capsys, argv, needle):
    code, _, err = run_cli(capsys, "estimate", "builtin:tiny-llama", *argv)
    assert_one_line_error(code, err, "estimate")
    assert needle in err


def test_estimate_api_refuses_a_strategy_with_the_way_out():
    with pytest.raises(LLMLoadUsageError, match=r"plan it with plan_device_map\(model, 'auto', gpus=\.\.\.\)"):
        estimate_training_memory("builtin:tiny-llama", device_map="auto")
    single = estimate_training_memory("builtin:tiny-llama", device_map=0)
    assert set(single.per_device) == {0} and single.cuda_context == 500 * 2**20


@pytest.mark.parametrize("rank", ["-5", "0", "two"])
def test_lora_rank_must_be_positive(capsys, rank):
    code, out, err = run_cli(capsys, "estimate", "builtin:tiny-llama", "--lora-r", rank)
    assert_one_line_error(code, err, "estimate")
    assert f"argument --lora-r: invalid value '{rank}': expected a whole number >= 1" in err
    assert out == ""


@pytest.mark.parametrize("rank", [0, -5, 2.5, True])
def test_lora_rank_must_be_positive_in_the_api(rank):
    with pytest.raises(LLMLoadUsageError, match="invalid lora r"):
        estimate_training_memory("builtin:tiny-llama", lora={"r": rank})


def test_estimate_says_what_it_assumed(capsys):
    code, out, _ = run_cli(capsys, "estimate", "builtin:tiny-llama", "--batch-size", "3", "--seq-len", "64",
                           "--optimizer", "sgd")
    assert code == 0
    lines = out.splitlines()
    assert lines[1] == ("assumed: batch size 3, sequence length 64, float32 weights (precision auto), optimizer sgd, "
                        "full fine-tuning (all weights trained), no gradient checkpointing")
    context = next(line for line in lines if line.strip().startswith("CUDA context"))
    assert context.split() == ["CUDA", "context", "500.0", "MiB", "(1", "GPU(s)", "x", "500.0", "MiB)"]
    assert any(line.startswith("note: no --device-map: assumed the whole model on one GPU (cuda:0)") for line in lines)

    code, out, _ = run_cli(capsys, "estimate", "builtin:tiny-llama", "--device-map", "cpu",
                           "--lora-r", "4", "--gradient-checkpointing")
    assert "LoRA r=4 on q_proj,v_proj (peft's default for llama), gradient checkpointing" in out
    context = next(line for line in out.splitlines() if line.strip().startswith("CUDA context"))
    assert context.split() == ["CUDA", "context", "0", "B", "(no", "GPU", "in", "the", "device", "map)"]


def test_estimate_keeps_the_disk_share(capsys, tmp_path):
    device_map = {"model.embed_tokens": 0, "model.layers": "disk", "model.norm": 0, "model.rotary_emb": 0,
                  "lm_head": 0}
    path = tmp_path / "map.json"
    path.write_text(json.dumps(device_map))
    code, out, _ = run_cli(capsys, "estimate", "builtin:tiny-llama", "--device-map", f"@{path}", "--json")
    assert code == 0
    data = json.loads(out)
    from pytest_llmload._internal.planning.planner import module_sizes

    assert data["per_device"]["disk"] == module_sizes("builtin:tiny-llama")["model.layers"]
    assert abs(sum(data["per_device"].values()) - data["total"]) <= 2  # nothing dropped (rounding only)
    assert any("offloaded to disk" in note for note in data["notes"])
    code, text, _ = run_cli(capsys, "estimate", "builtin:tiny-llama", "--device-map", f"@{path}")
    assert any(line.split()[:2] == ["on", "disk"] and "offloaded weights only" in line for line in text.splitlines())


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-bert", "tiny-t5"])
def test_default_lora_targets_are_what_peft_picks(name):
    """Without --lora-targets the adapters are peft's own default ones: same trainable count as get_peft_model."""
    from peft import LoraConfig, get_peft_model

    model = load_model(f"builtin:{name}", device_map="cpu", precision="fp32")
    peft_model = get_peft_model(model, LoraConfig(r=4))
    expected = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    estimate = estimate_training_memory(f"builtin:{name}", precision="fp32", lora={"r": 4})
    assert estimate.trainable_parameters == expected
    assert estimate.details["lora"]["targets_from"].startswith("peft's default for")


def test_lora_targets_that_match_nothing_name_the_flag(capsys):
    code, _, err = run_cli(capsys, "estimate", "builtin:tiny-bert", "--lora-r", "4", "--lora-targets", "q_proj")
    assert_one_line_error(code, err, "estimate")
    assert "--lora-targets q_proj match no layer" in err and "e.g. --lora-targets query,value" in err
    code, _, err = run_cli(capsys, "estimate", "builtin:tiny-bert", "--lora-targets", "query")
    assert_one_line_error(code, err, "estimate")
    assert "--lora-targets needs --lora-r" in err


def test_lora_all_linear_and_regex_targets():
    linear = estimate_training_memory("builtin:tiny-llama", lora={"r": 2, "target_modules": "all-linear"})
    q_only = estimate_training_memory("builtin:tiny-llama", lora={"r": 2, "target_modules": r".*\.q_proj"})
    assert linear.details["lora"]["layers"] == 4 * 7  # q, k, v, o, gate, up, down; the head is left out
    assert q_only.details["lora"]["layers"] == 4


# -- plan ------------------------------------------------------------------------------------------


def test_balanced_low_0_with_sparse_gpu_ids_is_one_line(capsys):
    code, _, err = run_cli(capsys, "plan", "builtin:tiny-llama", "--strategy", "balanced_low_0",
                           "--max-memory", "0=300KiB,2=300KiB")
    assert_one_line_error(code, err, "plan")
    assert "huggingface/accelerate#4297" in err and "CUDA_VISIBLE_DEVICES" in err and "KeyError" in err
    code, _, err = run_cli(capsys, "plan", "builtin:tiny-llama", "--strategy", "balanced_low_0",
                           "--max-memory", "0=300KiB,1=0,2=300KiB")
    assert_one_line_error(code, err, "plan")
    assert "loads GPU 0 instead of keeping it light" in err
    assert run_cli(capsys, "plan", "builtin:tiny-llama", "--strategy", "balanced_low_0",
                   "--max-memory", "0=300KiB,1=300KiB,cpu=1GiB")[0] == 0


def test_gpus_and_max_memory_are_combined(capsys):
    code, out, _ = run_cli(capsys, "plan", "builtin:tiny-llama", "--gpus", "4x1MiB",
                           "--max-memory", "0=300KiB,1=2MiB,cpu=1GiB")
    assert code == 0
    notes = [line for line in out.splitlines() if line.startswith("note: ")]
    assert notes == [
        "note: the budget for cuda:1 (2.0 MiB) is more than the card (1.0 MiB): from_pretrained plans with the "
        "budget and would run out of memory loading it",
        "note: cuda:2-3 (each) holds nothing: it has no max memory entry, and from_pretrained uses only the GPUs "
        "max_memory names",
    ]
    code, _, err = run_cli(capsys, "plan", "builtin:tiny-llama", "--gpus", "2x1MiB", "--max-memory", "0=1MiB,5=1MiB")
    assert_one_line_error(code, err, "plan")
    assert "max memory names cuda:5, but the fleet has 2 GPU(s) (cuda:0-1)" in err


def test_a_plan_says_why_gpus_hold_nothing(capsys):
    code, out, _ = run_cli(capsys, "plan", "builtin:tiny-llama", "--gpus", "4x100KiB", "--cpu-memory", "1GiB")
    assert code == 0
    notes = [line for line in out.splitlines() if line.startswith("note: ")]
    assert [n.split()[1] for n in notes] == ["cuda:0", "cuda:2-3"]
    assert all("the smallest block that cannot be split (LlamaDecoderLayer, 144.5 KiB) is larger than that" in n
               for n in notes)
    assert "room transformers keeps free on the first GPU" in notes[0]

    sequential = plan_device_map("builtin:tiny-llama", "sequential", gpus="3x1MiB", cpu_memory="1GiB")
    assert sequential.notes == ["cuda:1-2 (each) holds nothing: the GPUs before it hold the whole model"]
    low = plan_device_map("builtin:tiny-llama", "balanced_low_0", gpus="3x1MiB", cpu_memory="1GiB")
    assert low.notes[0].startswith("cuda:0 holds nothing: balanced_low_0 keeps it as empty as it can")
    assert plan_device_map("builtin:tiny-llama", "balanced", gpus="2x1MiB", cpu_memory="1GiB").notes == []
    code, out, _ = run_cli(capsys, "plan", "builtin:tiny-llama", "--gpus", "4x100KiB", "--json")
    assert len(json.loads(out)["notes"]) == 2
    huge = plan_device_map("builtin:tiny-llama", "auto", gpus="4096x100KiB", cpu_memory="1GiB")
    assert [n.split(" holds")[0] for n in huge.notes] == ["cuda:0", "cuda:2-4095 (each)"]


def test_unused_gpu_notes_without_transformers_log_line(monkeypatch):
    """If a transformers release stops logging what a skipped GPU needed, the note still tells skipped from spare."""
    import re

    import pytest_llmload._internal.planning.reasons

    monkeypatch.setattr(pytest_llmload._internal.planning.reasons, "_REQUIRED_RE", re.compile("matches nothing"))
    skipped = plan_device_map("builtin:tiny-llama", "auto", gpus="4x100KiB", cpu_memory="1GiB")
    assert [n.split(": ", 1)[1].split(" (")[0] for n in skipped.notes] == ["the next module to place did not fit"] * 2
    spare = plan_device_map("builtin:tiny-llama", "sequential", gpus="3x1MiB", cpu_memory="1GiB")
    assert spare.notes == ["cuda:1-2 (each) holds nothing: the GPUs before it hold the whole model"]


# -- models, trust, hub ----------------------------------------------------------------------------


@pytest.fixture
def remote_code_model(config_only):
    config = json.loads((config_only / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_mine.MineConfig"}
    (config_only / "config.json").write_text(json.dumps(config))
    return config_only


@pytest.mark.parametrize("command", [["plan"], ["validate", "@MAP"], ["estimate"]])
def test_remote_code_refusal_names_the_cli_flag(capsys, remote_code_model, tmp_path, command):
    map_file = tmp_path / "map.json"
    map_file.write_text('{"": "cpu"}')
    extra = [f"@{map_file}" if a == "@MAP" else a for a in command[1:]]
    code, _, err = run_cli(capsys, command[0], str(remote_code_model), *extra)
    assert_one_line_error(code, err, command[0])
    assert "pass --trust-remote-code if you trust it" in err and "--llm-" not in err
    code, _, err = run_cli(capsys, command[0], str(remote_code_model), *extra, "--trust-remote-code")
    assert code == 2 and "pass --trust-remote-code" not in err  # trusted: transformers looks for the code


def test_hub_error_uses_cli_wording(capsys, offline_hub):
    code, _, err = run_cli(capsys, "plan", "someorg/not-cached-model")
    assert_one_line_error(code, err, "plan")
    assert "give a local checkpoint directory as MODEL" in err and "--llm-model" not in err


def test_a_config_json_path_or_a_folder_with_only_a_config(capsys, config_only):
    fleet = ["--gpus", "2x1MiB", "--cpu-memory", "1GiB", "--json"]  # not this machine's RAM: it changes
    by_folder = run_cli(capsys, "plan", str(config_only), *fleet)
    by_file = run_cli(capsys, "plan", str(config_only / "config.json"), *fleet)
    assert by_folder[0] == by_file[0] == 0 and by_folder[1] == by_file[1]
    code, out, _ = run_cli(capsys, "estimate", str(config_only / "config.json"), "--json")
    assert code == 0 and json.loads(out)["parameters"] > 0
    other = config_only / "other.json"
    other.write_text("{}")
    code, _, err = run_cli(capsys, "plan", str(other))
    assert_one_line_error(code, err, "plan")
    assert "is a file: expected a checkpoint directory, its config.json" in err


def test_validate_takes_a_gpu_count_or_a_fleet(capsys, tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"": 3}))
    assert run_cli(capsys, "validate", "builtin:tiny-gpt2", f"@{path}", "--gpus", "4x24GiB")[0] == 0
    code, out, _ = run_cli(capsys, "validate", "builtin:tiny-gpt2", f"@{path}", "--gpus", "2")
    assert code == 1 and "cuda:3" in out
    code, _, err = run_cli(capsys, "validate", "builtin:tiny-gpt2", "auto")
    assert_one_line_error(code, err, "validate")
    assert "llmload plan MODEL --strategy auto" in err


# -- help and argument errors ----------------------------------------------------------------------


def test_help_has_no_markup_and_every_argument_has_help_and_default(capsys):
    from pytest_llmload.cli import _parser

    parser = _parser()
    for name, command in {"": parser, **parser.commands}.items():
        assert main([name, "--help"] if name else ["--help"]) == 0
        text = capsys.readouterr().out
        assert "``" not in text and ":func:" not in text
        flat = " ".join(text.split())
        for action in command._actions:
            if action.dest in ("help", "command"):
                continue
            assert action.help, f"{name} {action.dest} has no help"
            if action.option_strings and action.default not in (None, False):
                assert f"(default: {action.default})" in flat, (name, action.dest)


@pytest.mark.parametrize("argv, needle", [
    (["estimate", "builtin:tiny-llama", "--cpu", "1GiB"], "unrecognized arguments: --cpu 1GiB"),
    (["plan", "builtin:tiny-llama", "--precision", "int3"], "argument --precision: invalid precision 'int3'"),
    (["plan", "builtin:tiny-llama", "--gpus", "4xlots"], "argument --gpus: invalid GPU fleet '4xlots'"),
    (["plan", "builtin:tiny-llama", "--strategy", "greedy"], "argument --strategy: invalid choice: 'greedy'"),
    (["estimate", "builtin:tiny-llama", "--seq-len", "0"], "argument --seq-len: invalid value '0'"),
    (["plan", "builtin:nope"], "unknown built-in model 'builtin:nope'"),
])
def test_argument_errors_are_one_line(capsys, argv, needle):
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, argv[0])
    assert needle in err


def test_an_unexpected_error_is_still_one_line(capsys, monkeypatch):
    import pytest_llmload._internal.planning.reasons

    def broken(*args, **kwargs):
        raise KeyError(1)

    monkeypatch.setattr(pytest_llmload._internal.planning.planner, "plan_device_map", broken)
    code, _, err = run_cli(capsys, "plan", "builtin:tiny-llama")
    assert_one_line_error(code, err, "plan")
    assert "internal error: KeyError: 1" in err


def test_help_and_argument_errors_import_neither_torch_nor_transformers():
    result = python("""
        import subprocess, sys
        from pytest_llmload.cli import main
        codes = [main(["--help"]), main(["plan", "--help"]), main(["estimate", "builtin:tiny-llama", "--lora-r", "-5"]),
                 main(["plan", "builtin:nope"]), main(["plan", "builtin:tiny-llama", "--gpus", "10000000x1GiB"]),
                 main(["estimate", "builtin:tiny-llama", "--precision", "int8"])]
        print(codes, sorted(m for m in ("torch", "transformers", "accelerate") if m in sys.modules), file=sys.stderr)
    """)
    assert result.stderr.splitlines()[-1] == "[0, 0, 2, 2, 2, 2] []", result.stderr
    module = subprocess.run([sys.executable, "-m", "pytest_llmload", "estimate", "x", "--lora-r", "0"],
                            capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=os.path.dirname(
                                os.path.dirname(__file__))))
    assert module.returncode == 2
    assert module.stderr == "llmload estimate: argument --lora-r: invalid value '0': expected a whole number >= 1\n"


def test_float_plans_and_estimates_import_only_what_they_use():
    result = python("""
        import sys
        from pytest_llmload.cli import main
        assert main(["plan", "builtin:tiny-llama", "--precision", "fp32", "--gpus", "2x1MiB"]) == 0
        assert main(["estimate", "builtin:tiny-llama", "--precision", "fp32", "--lora-r", "4"]) == 0
        print(sorted(m for m in ("bitsandbytes", "peft") if m in sys.modules), file=sys.stderr)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines()[-1] == "[]", result.stderr


# -- limits ----------------------------------------------------------------------------------------


def test_absurd_fleets_and_configs_are_refused_up_front(tmp_path):
    with pytest.raises(LLMLoadUsageError, match="'10000000x1GiB': 10000000 cards; a fleet has at most 4096"):
        parse_fleet("10000000x1GiB")
    with pytest.raises(LLMLoadUsageError, match="5000 GPUs"):
        parse_fleet(["1GiB"] * 5000)
    assert len(parse_fleet("4096x1GiB")) == 4096
    from transformers import LlamaConfig, MixtralConfig

    from pytest_llmload._internal.planning.planner import check_config_size

    with pytest.raises(LLMLoadUsageError, match=r"config num_hidden_layers=1000000 is more than .* \(1024 layers"):
        check_config_size(LlamaConfig(num_hidden_layers=10**6))
    with pytest.raises(LLMLoadUsageError, match="num_local_experts=100000"):
        check_config_size(MixtralConfig(num_local_experts=100_000))
    with pytest.raises(LLMLoadUsageError, match="1000 layers x 512 experts"):
        check_config_size(MixtralConfig(num_hidden_layers=1000, num_local_experts=512))
    check_config_size(LlamaConfig(num_hidden_layers=126))  # Llama 3.1 405B

    folder = tmp_path / "deep"
    folder.mkdir()
    config = json.loads((builtin_path("tiny-llama") / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 10**6}))
    result = python(f"""
        import sys
        from pytest_llmload.cli import main
        sys.exit(main(["plan", {str(folder)!r}, "--gpus", "8x80GiB"]) * 10
                 + main(["plan", "builtin:tiny-llama", "--max-memory", "10000000=1GiB"]))
    """, timeout=120)
    assert result.returncode == 22, result.stderr
    lines = result.stderr.splitlines()
    assert lines[-2].startswith("llmload plan: config num_hidden_layers=1000000 is more than the planner builds")
    assert lines[-1] == ("llmload plan: invalid max memory: GPU index 10000000; the planner plans at most 4096 GPUs "
                         "(0-4095)")


def test_int8_plan_prints_no_bitsandbytes_noise():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "pytest_llmload", "plan", "builtin:tiny-llama", "--gpus", "4x200KiB", "--strategy", "sequential",
                          "--precision", "int8", "--cpu-memory", "1GiB"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "gemm_4bit_forward" not in out.stdout + out.stderr and "script_method" not in out.stdout + out.stderr
