"""Parsing what users write: sizes, precisions, device maps, budgets, model references."""

from __future__ import annotations

import json

import pytest

from pytest_llmload.errors import LLMLoadUsageError
from pytest_llmload import format_size, parse_size
from pytest_llmload import make_spec
from pytest_llmload._internal.config.specs import (
    parse_device_map,
    parse_max_memory,
    parse_model,
    parse_precision,
    split_values,
)


@pytest.mark.parametrize(
    "text, expected",
    [("24GiB", 24 * 2**30), ("24 GiB", 24 * 2**30), ("500 MB", 500 * 10**6), ("1.5gb", 1_500_000_000),
     ("10", 10), (123, 123), ("2 kib", 2048), ("0", 0), ("1TiB", 2**40)],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "GiB", "12 parsecs", "-1GiB", "1,5GB", None, True, -3])
def test_parse_size_rejects_with_one_line(bad):
    with pytest.raises(LLMLoadUsageError) as info:
        parse_size(bad)
    assert repr(bad) in str(info.value) and "\n" not in str(info.value)


def test_format_size():
    assert format_size(24 * 2**30) == "24.0 GiB"
    assert format_size(512) == "512 B"
    assert format_size(1536) == "1.5 KiB"


@pytest.mark.parametrize("text, expected", [("fp16", "fp16"), ("float16", "fp16"), ("BF16", "bf16"),
                                            ("int8", "int8"), ("nf4", "nf4"), ("auto", "auto")])
def test_parse_precision(text, expected):
    assert parse_precision(text) == expected


def test_unknown_precision_names_the_accepted_values():
    with pytest.raises(LLMLoadUsageError, match=r"invalid precision 'fp12': expected one of auto, fp32, fp16, "
                                                r"bf16, int8, nf4, fp4"):
        parse_precision("fp12")


@pytest.mark.parametrize(
    "text, kind, value, label",
    [
        ("auto", "strategy", "auto", "auto"),
        ("balanced_low_0", "strategy", "balanced_low_0", "balanced_low_0"),
        ("sequential", "strategy", "sequential", "sequential"),
        ("cpu", "device", {"": "cpu"}, "cpu"),
        ("cuda", "device", {"": 0}, "cuda0"),  # one device, one spelling: 0, cuda and cuda:0 are one cell
        ("cuda:1", "device", {"": 1}, "cuda1"),
        ("2", "device", {"": 2}, "cuda2"),
        (3, "device", {"": 3}, "cuda3"),
        ("process", "process", "process", "process"),
        ('{"": "cpu"}', "device", {"": "cpu"}, "cpu"),
        ("disk", "device", {"": "disk"}, "disk"),  # the whole model offloaded, computed on the cpu
    ],
)
def test_parse_device_map_forms(text, kind, value, label):
    spec = parse_device_map(text)
    assert (spec.kind, spec.as_user_value(), spec.label) == (kind, value, label)


def test_custom_device_map_inline_and_from_file(tmp_path):
    mapping = {"model.embed_tokens": 0, "model.layers": "cpu", "lm_head": "disk"}
    inline = parse_device_map(json.dumps(mapping))
    path = tmp_path / "two-tier.json"
    path.write_text(json.dumps(mapping))
    from_file = parse_device_map(f"@{path}")
    assert inline.kind == from_file.kind == "custom"
    assert inline.as_user_value() == from_file.as_user_value() == mapping
    assert from_file.label == "two-tier"
    assert inline.label.startswith("map-0+cpu+disk-")


@pytest.mark.parametrize(
    "bad, message",
    [
        ("everywhere", "invalid device map 'everywhere': expected auto, balanced"),
        ('{"a": 0,}', "not valid JSON"),
        ('{"a": "gpu0"}', "invalid device 'gpu0' for module 'a'"),
        ('{"a": -1}', "a GPU index cannot be negative"),
        ("{}", "expected a non-empty JSON object"),
        ('[1, 2]', "invalid device map"),
        ("@/no/such/map.json", "/no/such/map.json does not exist"),
    ],
)
def test_malformed_device_maps(bad, message):
    with pytest.raises(LLMLoadUsageError) as info:
        parse_device_map(bad)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_device_map_file_with_bad_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"lm_head": 0')
    with pytest.raises(LLMLoadUsageError, match=r"invalid device map file .*broken.json: not valid JSON"):
        parse_device_map(f"@{path}")


def test_parse_max_memory():
    assert parse_max_memory("0=20GiB, 1=20GiB,cpu=64GiB") == {0: 20 * 2**30, 1: 20 * 2**30, "cpu": 64 * 2**30}
    assert parse_max_memory({"cuda:1": "1GB", "disk": 5}) == {1: 10**9, "disk": 5}
    assert parse_max_memory(None) is None
    with pytest.raises(LLMLoadUsageError, match=r"'gpu=1GiB' is not DEVICE=SIZE|device 'gpu'"):
        parse_max_memory("gpu=1GiB")
    with pytest.raises(LLMLoadUsageError, match=r"invalid max memory '0=lots'.*invalid size 'lots'"):
        parse_max_memory("0=lots")
    with pytest.raises(LLMLoadUsageError, match=r"is not DEVICE=SIZE"):
        parse_max_memory("20GiB")


def test_parse_model(tmp_path):
    assert parse_model("builtin:tiny-gpt2").kind == "builtin"
    assert parse_model("org/model-name").kind == "hub"
    assert parse_model("gpt2").kind == "hub"
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    local = parse_model(str(tmp_path / "ckpt"))
    assert (local.kind, local.label) == ("path", "ckpt")


@pytest.mark.parametrize(
    "bad, message",
    [
        ("builtin:huge-llama", "unknown built-in model 'builtin:huge-llama': expected one of builtin:tiny-llama"),
        ("./no/such/dir", "model path './no/such/dir' does not exist"),
        ("/no/such/dir", "model path '/no/such/dir' does not exist"),
        ("org/name with space", "invalid model 'org/name with space'"),
        ("", "invalid model ''"),
    ],
)
def test_bad_model_references(bad, message):
    with pytest.raises(LLMLoadUsageError) as info:
        parse_model(bad)
    assert message in str(info.value)


def test_model_path_without_config(tmp_path):
    with pytest.raises(LLMLoadUsageError, match="has no config.json"):
        parse_model(str(tmp_path))


def test_split_values_keeps_json_commas():
    assert split_values(['auto, sequential', '{"a": 0, "b": "cpu"}', "cpu,"]) == [
        "auto", "sequential", '{"a": 0, "b": "cpu"}', "cpu"]


def test_spec_ids_and_attributes():
    spec = make_spec("builtin:tiny-llama", "sequential", "int8")
    assert spec.id == "tiny-llama-sequential-int8"
    assert (spec.model, spec.device_map, spec.precision) == ("builtin:tiny-llama", "sequential", "int8")
    assert make_spec("builtin:tiny-gpt2", 0, "fp16").id == "tiny-gpt2-cuda0-fp16"


@pytest.fixture
def hostile_map_files(tmp_path):
    import os

    fifo = tmp_path / "map.fifo"
    os.mkfifo(fifo)
    big = tmp_path / "big.json"
    big.write_text("{" + " " * (5 * 2**20) + "}")
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100000)
    return {"/dev/zero": "/dev/zero is a character device, not a regular file",
            str(fifo): f"{fifo} is a FIFO, not a regular file",
            str(big): f"invalid device map file {big}: more than 4194304 bytes",
            str(deep): f"invalid device map file {deep}: nested 100000 levels deep (at most 64 accepted)",
            str(tmp_path): f"{tmp_path} is a directory, not a regular file",
            str(tmp_path / "nope.json"): f"{tmp_path / 'nope.json'} does not exist"}


def test_a_map_file_is_read_with_the_bounds_of_a_checkpoint_file(hostile_map_files):
    """@/dev/zero grew to 22 GB and a FIFO hung until killed (issue 24, item 1)."""
    from pytest_llmload._internal.config.specs import parse_device_map

    for path, message in hostile_map_files.items():
        with pytest.raises(LLMLoadUsageError) as caught:
            parse_device_map(f"@{path}")
        assert message in str(caught.value) and "\n" not in str(caught.value)


def test_hostile_map_files_are_one_line_in_pytest_and_the_cli(pytester, hostile_map_files):
    import subprocess
    import sys

    pytester.makepyfile("def test_x():\n    pass\n")
    for path, message in hostile_map_files.items():
        result = pytester.runpytest_subprocess(f"--llm-device-map=@{path}", timeout=120)
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        assert message in result.stderr.str() and "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
        cli = subprocess.run([sys.executable, "-m", "pytest_llmload", "validate", "builtin:tiny-llama", f"@{path}",
                              "--gpus", "2"], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert cli.returncode == 2 and message in cli.stderr and len(cli.stderr.strip().splitlines()) == 1, cli.stderr


def test_budgets_parsed_once_are_given_back_as_they_are():
    """A cell's budgets were parsed again by make_spec, prepare_load and the planner (issue 23)."""
    from pytest_llmload._internal.config.specs import Budgets, parse_max_memory

    budgets = parse_max_memory("0=1GiB,cpu=2GiB")
    assert isinstance(budgets, Budgets) and budgets == {0: 2**30, "cpu": 2 * 2**30}
    assert parse_max_memory(budgets) is budgets
    cell = make_spec("builtin:tiny-llama", "auto", "fp32", budgets)
    assert isinstance(cell.max_memory_dict, Budgets) and cell.max_memory_dict == budgets
