"""What users pass to llm_load/load_model, configured custom maps, exports and the noise a load makes (issue 12)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import pytest_llmload
from pytest_llmload import load_model
from pytest_llmload.errors import LLMLoadUsageError
from pytest_llmload._internal.loading.precision import reconcile_precision

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_name_readme_imports_from_the_package_exists():
    names = set()
    for block in re.findall(r"from pytest_llmload import (\([^)]*\)|[^\n]+)", README.read_text()):
        names |= {n.strip(" ()#") for n in block.replace("\n", " ").split(",") if n.strip(" ()")}
    assert "estimate_training_memory" in names and "input_device" in names
    missing = sorted(n for n in names if not hasattr(pytest_llmload, n))
    assert not missing, missing
    assert set(pytest_llmload.__all__) >= names


def test_config_overrides_reach_the_config():
    model = load_model("builtin:tiny-bert", model_class="AutoModelForSequenceClassification", num_labels=3,
                       device_map="cpu")
    assert model.config.num_labels == 3 and model.classifier.out_features == 3
    assert load_model("builtin:tiny-llama", device_map="cpu", use_cache=False).config.use_cache is False


@pytest.mark.parametrize("precision, kwargs, expected, left", [
    (None, {"dtype": torch.float16}, "fp16", {}),
    ("fp16", {"torch_dtype": torch.float16}, "fp16", {}),
    ("8bit", {"load_in_8bit": True}, "int8", {"quantization_config"}),
    (None, {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}, "fp4", {"quantization_config"}),
    ("int8", {"dtype": torch.float16}, "int8", {"dtype"}),  # dtype of the modules left unquantized
    (None, {}, None, set()),
])
def test_one_precedence_rule(precision, kwargs, expected, left):
    kwargs = dict(kwargs)
    assert reconcile_precision(precision, kwargs) == expected
    assert set(kwargs) == set(left)


@pytest.mark.parametrize("precision, kwargs, message", [
    ("fp32", {"dtype": torch.float16}, "precision='fp32' contradicts dtype=torch.float16 (which means 'fp16')*"),
    ("fp16", {"load_in_8bit": True}, "precision='fp16' contradicts the legacy bitsandbytes kwargs*'int8'*"),
    ("nf4", {"load_in_8bit": True}, "precision='nf4' contradicts*"),
    (None, {"dtype": torch.int8}, "dtype=torch.int8 is not a float dtype*"),
])
def test_contradictions_are_one_error(precision, kwargs, message):
    import fnmatch

    with pytest.raises(LLMLoadUsageError) as info:
        reconcile_precision(precision, dict(kwargs))
    assert fnmatch.fnmatch(str(info.value), message), str(info.value)


def test_llm_load_keywords(pytester):
    pytester.makepyfile("""
        import pytest
        import torch

        def test_keywords(llm_load, llm_spec):
            assert llm_load("builtin:tiny-gpt2", trust_remote_code=True) is not None
            assert llm_load("builtin:tiny-gpt2", allow_pickle=True) is not None
            assert llm_load("builtin:tiny-gpt2", config=None) is not None
            assert llm_load("builtin:tiny-llama", device_map="cpu", load_in_8bit=True, precision="8bit") is not None
            half = llm_load("builtin:tiny-gpt2", device_map="cpu", dtype=torch.float16)
            assert half.dtype == torch.float16

        def test_contradiction(llm_load):
            llm_load("builtin:tiny-gpt2", precision="fp32", dtype=torch.float16)
    """)
    result = pytester.runpytest("--llm-report=report.json", "-W", "ignore::DeprecationWarning")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*precision='fp32' contradicts dtype=torch.float16 (which means 'fp16'): "
                                 "pass one of them"])
    cells = {c["id"]: c for c in json.loads((pytester.path / "report.json").read_text())["cells"]}
    assert "tiny-gpt2-cpu-fp16" in cells  # the report says what was loaded
    assert cells["tiny-gpt2-cpu-fp16"]["bytes_per_device"] == {"cpu": cells["tiny-gpt2-cpu-fp16"]["footprint_bytes"]}


def test_a_configured_map_naming_a_missing_module_fails_its_cell(pytester):
    pytester.makepyfile("def test_x(llm_model): pass")
    result = pytester.runpytest('--llm-device-map={"model.foo": "cpu", "model": "cpu", "lm_head": "cpu"}')
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*device map map-cpu-* does not fit builtin:tiny-llama:",
                                 "- entry 'model.foo' names no module or parameter of LlamaForCausalLM*"])


def test_no_noise_from_bitsandbytes_or_progress_bars(pytester):
    pytester.makepyfile("""
        def test_x(llm_model):
            pass
    """)
    result = pytester.runpytest_subprocess("-rA", "--llm-precision=int8", "--llm-device-map=cpu", "-W",
                                           "default::DeprecationWarning")
    result.assert_outcomes(passed=1)
    output = result.stdout.str() + result.stderr.str()
    assert "script_method" not in output
    assert "Loading weights" not in output
    assert "gemm_4bit_forward" not in output


def test_transformers_load_report_lands_in_the_warnings_summary(pytester):
    pytester.makepyfile("""
        def test_x(llm_load):
            llm_load("builtin:tiny-bert", model_class="AutoModelForSequenceClassification", device_map="cpu")
    """)
    result = pytester.runpytest_subprocess("-n", "2")
    result.assert_outcomes(passed=1)
    lines = result.stdout.lines
    summary = max(i for i, line in enumerate(lines) if "passed" in line and "==" in line)
    report = [i for i, line in enumerate(lines) if "LOAD REPORT" in line]
    assert report and max(report) < summary  # in the warnings summary, not printed after the final line
    assert "LOAD REPORT" not in result.stderr.str()


def test_llm_memory_is_readable_in_the_test_and_reported(pytester):
    pytester.makepyfile("""
        import torch

        def test_peak(llm_memory, llm_model):
            block = torch.ones(64 * 2**20 // 4)  # 64 MiB
            assert llm_memory.usage.cpu_peak_delta >= 32 * 2**20
            del block
    """)
    result = pytester.runpytest("--llm-report=report.json")
    result.assert_outcomes(passed=1)
    tests = json.loads((pytester.path / "report.json").read_text())["tests"]
    assert [t["nodeid"] for t in tests] == [
        "test_llm_memory_is_readable_in_the_test_and_reported.py::test_peak[tiny-llama-auto-auto]"]
    assert tests[0]["cpu_peak_delta"] >= 32 * 2**20


@pytest.mark.parametrize("endpoint", ["http://localhost:99999", "http://[::1", "ftp://example.org", "huggingface.co"])
def test_a_malformed_hf_endpoint_is_one_line(pytester, monkeypatch, endpoint):
    import huggingface_hub.constants

    from pytest_llmload._internal.loading import safety

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(safety, "_hub_state", {})
    pytester.makepyfile("""
        def test_a(llm_model):
            pass

        def test_b(llm_model):
            pass
    """)
    result = pytester.runpytest("--llm-model=someorg/somemodel")
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines([f"*invalid HF_ENDPOINT {endpoint!r}: *; expected a URL such as https://huggingface.co"])
    assert "Traceback" not in result.stdout.str() and "pytest_llmload/" not in result.stdout.str()
