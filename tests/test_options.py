"""Options and ini keys read once at start-up: every bad value is one usage-error line (issues 11 and 12)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys

import pytest

from pytest_llmload import builtin_path
from pytest_llmload._internal.config.options import OPTIONS


def usage_error(result, message: str) -> None:
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str() + result.stderr.str()
    result.stderr.fnmatch_lines([f"ERROR: {message}"])
    assert "Traceback" not in result.stderr.str() and "INTERNALERROR" not in result.stdout.str()


def test_help_runs_and_lists_every_option(pytester):
    result = pytester.runpytest("--help")
    assert result.ret == 0, result.stderr.str()  # a bare % in a help string crashed argparse's formatting
    text = result.stdout.str()
    for option, ini, *_ in OPTIONS:
        assert option in text and ini in text, option


@pytest.mark.parametrize("option", ["--llm-model", "--llm-device-map", "--llm-precision", "--llm-max-memory",
                                    "--llm-report", "--llm-cache-size", "--llm-footprint-baseline"])
@pytest.mark.parametrize("value", ["", " "])
def test_an_empty_value_is_a_usage_error_not_the_ini(pytester, option, value):
    pytester.makeini("[pytest]\nllm_models = builtin:tiny-gpt2\n")
    pytester.makepyfile("def test_x(): pass")
    usage_error(pytester.runpytest(f"{option}={value}"), f"{option} was given an empty value {value!r}*")


def test_command_line_values_are_not_split_on_commas(pytester):
    ckpt = pytester.path / "data" / "llama,v2"
    shutil.copytree(builtin_path("tiny-llama"), ckpt)
    pytester.makepyfile("def test_x(llm_spec): pass")
    result = pytester.runpytest("--collect-only", "-q", f"--llm-model={ckpt}", "--llm-device-map=cpu")
    result.stdout.fnmatch_lines(["*test_x[[]llama,v2-cpu-auto[]]", "1 test collected*"])


def test_ini_paths_resolve_against_the_ini_folder(pytester, monkeypatch):
    pytester.makeini("[pytest]\nllm_device_maps = @maps/cpu.json\nllm_footprint_baseline = footprints.json\n"
                     "llm_precisions = fp16\n")
    (pytester.path / "maps").mkdir()
    (pytester.path / "maps" / "cpu.json").write_text('{"": "cpu"}')
    tests = pytester.mkdir("tests")
    (tests / "test_x.py").write_text("def test_x(llm_model): pass\n")
    pytester.runpytest().assert_outcomes(passed=1)
    baseline = pytester.path / "footprints.json"
    recorded = json.loads(baseline.read_text())
    assert recorded["footprints"] == {"builtin:tiny-llama cpu fp16": 378048}
    recorded["footprints"]["builtin:tiny-llama cpu fp16"] = 300000  # a real regression
    baseline.write_text(json.dumps(recorded))
    monkeypatch.chdir(tests)  # pytest started from tests/: the ini's paths still mean the ini's folder
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*footprint of tiny-llama-cpu-fp16 grew by 26.0%*"])
    assert not (tests / "footprints.json").exists()


def test_command_line_paths_resolve_against_the_invocation_folder(pytester, monkeypatch):
    tests = pytester.mkdir("tests")
    (tests / "map.json").write_text('{"": "cpu"}')
    (tests / "test_x.py").write_text("def test_x(llm_spec): assert llm_spec.device_map == {'': 'cpu'}\n")
    monkeypatch.chdir(tests)
    pytester.runpytest("--llm-device-map=@map.json").assert_outcomes(passed=1)


@pytest.mark.parametrize("option", ["--llm-report", "--llm-footprint-baseline"])
def test_an_unwritable_output_path_is_refused_at_start_up(pytester, option):
    pytester.makepyfile("def test_x(): pass")
    (pytester.path / "afile").write_text("")  # a missing folder is created at the end, unless it cannot be
    usage_error(pytester.runpytest(f"{option}=afile/dir/r.json"),
                f"{option}=*/afile/dir/r.json: cannot create the folder */afile/dir: */afile is not a folder")
    pytester.mkdir("adir")
    usage_error(pytester.runpytest(f"{option}=adir"), f"{option}=*adir: is a directory; expected a file path to write")


def test_report_is_written_without_the_terminal_plugin(pytester):
    pytester.makepyfile("def test_x(llm_model): pass")
    result = pytester.runpytest("-p", "no:terminal", "--llm-report=report.json")
    assert result.ret == 0
    data = json.loads((pytester.path / "report.json").read_text())
    assert [c["id"] for c in data["cells"]] == ["tiny-llama-auto-auto"]
    assert [p.name for p in pytester.path.iterdir() if p.name.startswith(".llmload-")] == []  # no temp file left


@pytest.mark.parametrize("value, shown", [(0, "0"), ("1e400", "inf"), (-5, "-5"), ('"big"', "'big'"), (1.5, "1.5")])
def test_a_damaged_baseline_is_one_usage_error(pytester, value, shown):
    (pytester.path / "footprints.json").write_text('{"footprints": {"tiny-llama-auto-auto": %s}}' % value)
    pytester.makepyfile("def test_x(llm_model): pass")
    usage_error(pytester.runpytest("--llm-footprint-baseline=footprints.json"),
                f"invalid footprint baseline */footprints.json: entry 'tiny-llama-auto-auto' is {shown}; expected a "
                "whole number of bytes > 0*")


@pytest.mark.parametrize("value", ["nan", "inf", "-0.1", "lots"])
def test_footprint_tolerance_must_be_a_finite_fraction(pytester, value):
    pytester.makepyfile("def test_x(): pass")
    usage_error(pytester.runpytest(f"--llm-footprint-tolerance={value}"),
                f"invalid --llm-footprint-tolerance value '{value}': expected a finite fraction >= 0*")


@pytest.mark.parametrize("args, message", [
    (["--llm-device-map=²"], "invalid device map '²'*"),
    (["--llm-device-map=cuda:²"], "invalid device map 'cuda:²'*"),
    (["--llm-cache-size=²"], "invalid --llm-cache-size value '²': expected a whole number >= 1"),
    (["--llm-require-gpus=²"], "invalid --llm-require-gpus value '²'*"),
    (["--llm-max-memory=²=1GiB"], "invalid max memory '²=1GiB': device '²' is not a GPU index*"),
    (["--llm-gpus-per-worker=²"], "invalid --llm-gpus-per-worker value '²': expected a whole number >= 1"),
])
def test_unicode_digits_are_not_numbers(pytester, args, message):
    pytester.makepyfile("def test_x(): pass")
    usage_error(pytester.runpytest(*args), message)


@pytest.mark.parametrize("device", ["mps", "xpu:0", "npu", "meta", "hpu:1"])
def test_device_kinds_it_cannot_load_on_are_refused_at_start_up(pytester, device):
    pytester.makepyfile("def test_x(): pass")
    usage_error(pytester.runpytest(f"--llm-device-map={device}"),
                f"unsupported device '{device}': pytest-llmload loads on cpu, disk, cuda, cuda:N or a GPU index N*")
    usage_error(pytester.runpytest(f'--llm-device-map={{"model": "{device}", "lm_head": "cpu"}}'),
                f"unsupported device '{device}' for module 'model' in device map*")


def test_a_gpu_budget_without_gpus_skips_the_cell(pytester):
    pytester.makepyfile("def test_x(llm_model): pass")
    result = pytester.runpytest("-rs", "--llm-max-memory=0=1GiB,cpu=4GiB")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*max memory names cuda:0; found none*"])
    result = pytester.runpytest("--llm-max-memory=0=1GiB,cpu=4GiB", "--llm-require-gpus")
    result.assert_outcomes(errors=1)


def test_require_gpus_zero_means_off(pytester):
    pytester.makepyfile("""
        import pytest

        @pytest.mark.requires_gpus(1)
        def test_gpu():
            pass
    """)
    pytester.runpytest("--llm-require-gpus=0").assert_outcomes(skipped=1)
    pytester.runpytest("--llm-require-gpus=false").assert_outcomes(skipped=1)
    pytester.runpytest("--llm-require-gpus").assert_outcomes(errors=1)


def test_one_device_spelled_three_ways_is_one_cell(pytester):
    pytester.makepyfile("def test_x(llm_spec): pass")
    result = pytester.runpytest("--collect-only", "-q", "--llm-device-map=0", "--llm-device-map=cuda:0",
                                "--llm-device-map=cuda", '--llm-device-map={"": "cuda:0"}')
    result.stdout.fnmatch_lines(["*test_x[[]tiny-llama-cuda0-auto[]]", "1 test collected*"])


def test_checkpoints_that_share_a_folder_name_get_distinct_ids(pytester):
    for parent in ("a", "b"):
        shutil.copytree(builtin_path("tiny-gpt2"), pytester.path / parent / "ckpt")
    pytester.makepyfile("def test_x(llm_spec): pass")
    result = pytester.runpytest("--collect-only", "-q", "--llm-model=a/ckpt", "--llm-model=b/ckpt")
    ids = [line for line in result.stdout.lines if "test_x[" in line]
    assert len(ids) == 2 and len(set(ids)) == 2
    assert all("ckpt-auto-auto-" in line for line in ids), ids  # a short hash tells them apart, not 0/1


def test_strict_mode_summary_survives_xdist(pytester):
    pytester.makepyfile("""
        import pytest

        @pytest.mark.requires_gpus(1)
        def test_gpu():
            pass

        def test_plain():
            pass
    """)
    result = pytester.runpytest_subprocess("-n", "2", "--llm-require-gpus")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*llmload: missing hardware (--llm-require-gpus)*",
                                 "ERROR *test_gpu: needs 1 GPU; found none"])


FAKE_NVIDIA_SMI = """#!/bin/sh
# Two 24 GiB cards, as nvidia-smi --query-gpu=index,name,memory.total,memory.free,compute_cap prints them.
echo "0, Fake GPU, 24576, 24000, 8.9"
echo "1, Fake GPU, 24576, 24000, 8.9"
"""


@pytest.mark.skipif(sys.platform == "win32", reason="a shell-script nvidia-smi")
def test_readme_gpu_ci_command_runs_under_xdist(pytester, monkeypatch):
    """The README's GPU CI recipe: only the controller checks the total; each worker has its own slice."""
    bin_dir = pytester.mkdir("bin")
    smi = bin_dir / "nvidia-smi"
    smi.write_text(FAKE_NVIDIA_SMI)
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):  # this test may itself run in an xdist worker
        monkeypatch.delenv(name, raising=False)
    pytester.makepyfile("""
        import os

        def test_a():
            assert os.environ["CUDA_VISIBLE_DEVICES"] in ("0", "1")

        def test_b():
            assert os.environ["CUDA_VISIBLE_DEVICES"] in ("0", "1")
    """)
    result = pytester.runpytest_subprocess("-n", "2", "--llm-gpus-per-worker=1", "--llm-require-gpus=2")
    assert "needs 2 visible GPUs" not in result.stdout.str() + result.stderr.str()
    result.assert_outcomes(passed=2)
    assert result.ret == 0
    result = pytester.runpytest_subprocess("-n", "2", "--llm-gpus-per-worker=1", "--llm-require-gpus=3")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: --llm-require-gpus=3: this GPU CI job needs 3 visible GPUs; found 2"])


def test_checkpoints_that_share_a_folder_name_keep_separate_baselines(pytester):
    """Two local checkpoints named alike (a/ckpt, b/ckpt) used to share one baseline entry, and the next
    unchanged run failed one of them with "footprint grew"."""
    shutil.copytree(builtin_path("tiny-gpt2"), pytester.path / "a" / "ckpt")
    shutil.copytree(builtin_path("tiny-llama"), pytester.path / "b" / "ckpt")
    pytester.makeini("[pytest]\nllm_models = a/ckpt, b/ckpt\nllm_precisions = fp32\n")
    pytester.makepyfile("def test_x(llm_model): pass")
    args = ["--llm-footprint-baseline=footprints.json"]
    pytester.runpytest(*args).assert_outcomes(passed=2)
    recorded = json.loads((pytester.path / "footprints.json").read_text())["footprints"]
    assert sorted(recorded) == ["a/ckpt auto fp32", "b/ckpt auto fp32"]  # relative to the project: portable
    assert recorded["a/ckpt auto fp32"] != recorded["b/ckpt auto fp32"]
    pytester.runpytest(*args).assert_outcomes(passed=2)  # unchanged: both pass
