"""The plugin end to end: options, ini keys, the matrix, markers, bad input and the session cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from maps import GPT2_CPU_DISK

TEST_GENERATE = """
import torch

def test_generate(llm_model, llm_tokenizer, llm_spec):
    ids = llm_tokenizer("hello", return_tensors="pt").input_ids
    with torch.no_grad():
        out = llm_model.generate(ids, max_new_tokens=2, do_sample=False)
    assert out.shape[-1] == ids.shape[-1] + 2
"""


def test_matrix_ids_from_the_command_line(pytester):
    pytester.makepyfile(TEST_GENERATE)
    result = pytester.runpytest(
        "-v", "--llm-model=builtin:tiny-llama", "--llm-device-map=auto", "--llm-device-map=sequential",
        "--llm-precision=fp32", "--llm-precision=int8",
    )
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines([
        "*test_generate[[]tiny-llama-auto-fp32[]] PASSED*",
        "*test_generate[[]tiny-llama-auto-int8[]] PASSED*",
        "*test_generate[[]tiny-llama-sequential-fp32[]] PASSED*",
        "*test_generate[[]tiny-llama-sequential-int8[]] PASSED*",
    ])


def test_defaults_without_options(pytester):
    pytester.makepyfile("""
        def test_spec(llm_spec, llm_model):
            assert llm_spec.model == "builtin:tiny-llama"
            assert llm_spec.device_map == "auto"
            assert llm_spec.precision == "auto"
            assert type(llm_model).__name__ == "LlamaForCausalLM"
    """)
    result = pytester.runpytest("-v")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*test_spec[[]tiny-llama-auto-auto[]] PASSED*"])


def test_ini_values_and_command_line_precedence(pytester):
    pytester.makeini("""
        [pytest]
        llm_models = builtin:tiny-gpt2
        llm_device_maps =
            cpu, {"": "cpu"}
            sequential
        llm_precisions = fp16
    """)
    pytester.makepyfile("def test_x(llm_spec): pass")
    result = pytester.runpytest("--collect-only", "-q")
    result.stdout.fnmatch_lines(["*test_x[[]tiny-gpt2-cpu-fp16[]]", "*test_x[[]tiny-gpt2-sequential-fp16[]]"])
    assert "2 tests collected" in result.stdout.str()  # cpu and {"": "cpu"} are the same cell
    result = pytester.runpytest("--collect-only", "-q", "--llm-precision=bf16", "--llm-model=builtin:tiny-t5")
    result.stdout.fnmatch_lines(["*test_x[[]tiny-t5-cpu-bf16[]]", "*test_x[[]tiny-t5-sequential-bf16[]]"])


def test_marker_carries_its_own_matrix(pytester):
    pytester.makepyfile("""
        import pytest

        @pytest.mark.llm(models=["builtin:tiny-gpt2", "builtin:tiny-bert"], precisions="fp16")
        def test_marked(llm_spec):
            pass

        def test_unmarked(llm_spec):
            pass
    """)
    result = pytester.runpytest("--collect-only", "-q", "--llm-precision=int8")
    result.stdout.fnmatch_lines([
        "*test_marked[[]tiny-gpt2-auto-fp16[]]", "*test_marked[[]tiny-bert-auto-fp16[]]",
        "*test_unmarked[[]tiny-llama-auto-int8[]]",
    ])


def test_bad_marker_argument_is_a_collection_error(pytester):
    pytester.makepyfile("""
        import pytest

        @pytest.mark.llm(precisions=["fp8"])
        def test_marked(llm_spec):
            pass
    """)
    result = pytester.runpytest()
    result.stdout.fnmatch_lines(["*invalid precision 'fp8': expected one of auto, fp32, fp16, bf16, int8, nf4, fp4*"])
    assert result.ret != 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--llm-precision=fp12"], "invalid precision 'fp12': expected one of auto, fp32, fp16, bf16, int8, nf4, fp4"),
        (["--llm-device-map=everywhere"], "invalid device map 'everywhere': expected auto, balanced, balanced_low_0,"
                                          " sequential, cpu, cuda, cuda:N, N, disk, process*"),
        (['--llm-device-map={"lm_head": 0,'], "invalid device map*not valid JSON*"),
        (["--llm-device-map=@missing.json"], "invalid device map '@missing.json': */missing.json does not exist"),
        (["--llm-max-memory=0=lots"], "invalid max memory '0=lots': invalid size 'lots'*"),
        (["--llm-model=builtin:gpt5"], "unknown built-in model 'builtin:gpt5': expected one of builtin:tiny-llama*"),
        (["--llm-model=./models/missing"], "model path './models/missing' does not exist*"),
        (["--llm-cache-size=0"], "invalid --llm-cache-size value '0'*"),
    ],
)
def test_bad_options_are_usage_errors_with_one_line(pytester, args, message):
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: {message}"])
    assert "Traceback" not in result.stderr.str()


def test_bad_json_file_is_named(pytester):
    pytester.path.joinpath("map.json").write_text('{"lm_head": }')
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest("--llm-device-map=@map.json")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: invalid device map file */map.json: not valid JSON*line 1*"])


def test_load_error_is_a_clean_test_failure(pytester, tmp_path):
    import shutil

    from pytest_llmload import builtin_path

    broken = tmp_path / "no-weights"
    shutil.copytree(builtin_path("tiny-gpt2"), broken)
    (broken / "model.safetensors").unlink()
    pytester.makepyfile("def test_a(llm_model): pass\ndef test_b(llm_model): pass")
    result = pytester.runpytest(f"--llm-model={broken}")
    result.assert_outcomes(errors=2)  # the fixture fails, so pytest reports errors at setup
    result.stdout.fnmatch_lines([f"*cannot load checkpoint {broken}:*"])
    assert "pytest_llmload/" not in result.stdout.str()  # no traceback through our internals
    assert "During handling" not in result.stdout.str()


def test_unreachable_hub_id_is_tried_once_per_session(pytester, offline_hub):
    pytester.makeconftest("""
        def pytest_sessionfinish(session):
            from pytest_llmload.fixtures import SESSION_KEY
            cache = session.config.stash[SESSION_KEY].cache
            print("config attempts:", cache.config_attempts)
    """)
    pytester.makepyfile("""
        def test_a(llm_model): pass
        def test_b(llm_model): pass
        def test_c(llm_tokenizer): pass
    """)
    result = pytester.runpytest("-s", "--llm-model=someorg/unreachable", "--llm-precision=fp32",
                                "--llm-precision=fp16")
    result.assert_outcomes(errors=6)
    assert result.stdout.str().count("cannot load model 'someorg/unreachable': the hub is not reachable") >= 6
    result.stdout.fnmatch_lines(["*config attempts: {'someorg/unreachable': 1}*"])


def test_each_cell_loads_once_for_any_number_of_tests(pytester):
    pytester.makepyfile("""
        import pytest

        @pytest.mark.parametrize("i", range(5))
        def test_many(llm_model, i):
            pass

        def test_count(llm_load):
            info = llm_load.cache_info()
            assert info.loads == 3, info
    """)
    result = pytester.runpytest("-p", "no:randomly", "--llm-precision=fp32", "--llm-precision=fp16",
                                "--llm-precision=bf16", "--llm-cache-size=1",
                                "-k", "test_many or test_count")
    # 15 tests over 3 cells; test_count also runs per cell (it asks for llm_load only, so once)
    result.assert_outcomes(passed=16)
    result.stdout.fnmatch_lines(["llmload: 3 load(s) of 3 cell(s): 3 first load(s), 0 reload(s) after eviction, 0 private copies; used 15 time(s)"])


def test_private_model_is_not_the_shared_one(pytester):
    pytester.makepyfile("""
        def test_private(llm_model, llm_private_model):
            assert llm_private_model is not llm_model
            for p in llm_private_model.parameters():
                p.data.zero_()
            assert any(p.abs().sum() > 0 for p in llm_model.parameters())
    """)
    pytester.runpytest().assert_outcomes(passed=1)


def test_llm_load_factory(pytester):
    pytester.makepyfile("""
        import pytest, torch

        def test_factory(llm_load):
            a = llm_load("builtin:tiny-gpt2", precision="fp16")
            assert llm_load("builtin:tiny-gpt2", precision="fp16") is a
            assert a.dtype == torch.float16
            b = llm_load("builtin:tiny-gpt2", precision="fp16", private=True)
            assert b is not a
            with pytest.deprecated_call():
                c = llm_load("builtin:tiny-llama", device_map="cpu", load_in_8bit=True)
            import bitsandbytes as bnb
            assert isinstance(c.model.layers[0].mlp.up_proj, bnb.nn.Linear8bitLt)
            assert llm_load.tokenizer("builtin:tiny-gpt2")("hi").input_ids
    """)
    pytester.runpytest().assert_outcomes(passed=1)


def test_int8_on_cpu_and_disk_skips_with_the_reason(pytester):
    mapping = {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.h": "disk",
               "transformer.ln_f": "cpu", "lm_head": "cpu"}
    pytester.makepyfile("def test_x(llm_model): pass")
    result = pytester.runpytest("-rs", "--llm-model=builtin:tiny-gpt2", f"--llm-device-map={json.dumps(mapping)}",
                                "--llm-precision=int8", "--llm-precision=fp32")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*int8 on a map of only cpu and disk would keep every module in fp32*"])


def test_offload_folders_removed_at_session_end_and_on_interrupt(pytester, isolated_tmp):
    mapping = GPT2_CPU_DISK
    pytester.makepyfile("""
        import os, tempfile

        def test_loaded(llm_model):
            assert os.listdir(tempfile.gettempdir())  # the session's offload root exists meanwhile
            assert llm_model.hf_device_map["transformer.h.1"] == "disk"
    """)
    args = ["--llm-model=builtin:tiny-gpt2", f"--llm-device-map={json.dumps(mapping)}"]
    pytester.runpytest(*args).assert_outcomes(passed=1)
    assert os.listdir(isolated_tmp) == []
    pytester.makepyfile(test_loaded="""
        def test_interrupted(llm_model):
            raise KeyboardInterrupt
    """)
    result = pytester.runpytest(*args, no_reraise_ctrlc=True)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    assert os.listdir(isolated_tmp) == []


def test_plugin_import_is_cheap():
    code = textwrap.dedent("""
        import sys
        import pytest_llmload.plugin, pytest_llmload
        heavy = [m for m in ("torch", "transformers", "accelerate", "bitsandbytes", "peft") if m in sys.modules]
        print(heavy)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_suite_without_llm_tests_never_imports_torch(pytester):
    pytester.makepyfile("""
        import sys
        def test_plain():
            assert "torch" not in sys.modules and "transformers" not in sys.modules
    """)
    result = pytester.runpytest_subprocess("-p", "llmload")
    result.assert_outcomes(passed=1)
