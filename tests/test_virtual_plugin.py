"""The virtual GPU fleet in a pytest run: --llm-virtual-gpus for the session, the virtual_gpus marker."""

from __future__ import annotations

import os

import pytest
import torch

MACHINE_CUDA = torch.cuda.is_available()  # what the machine has, outside any fleet
MACHINE_GPUS = torch.cuda.device_count()


@pytest.fixture(autouse=True)
def _no_fleet_leaks():
    yield
    assert torch.cuda.is_available() == MACHINE_CUDA, "a fleet outlived its pytest run"


def test_session_fleet_header_inventory_and_requires_gpus(pytester):
    pytester.makepyfile(
        """
        import pytest, torch
        from pytest_llmload import probe_inventory

        def test_cuda_is_the_fleet():
            assert torch.cuda.device_count() == 2
            assert probe_inventory(bitsandbytes=False).source == "virtual"

        @pytest.mark.requires_gpus(2, memory="64MiB")
        def test_two_cards():
            pass

        @pytest.mark.requires_gpus(3)
        def test_three_cards():
            pass
        """
    )
    result = pytester.runpytest("--llm-virtual-gpus=2x64MiB", "-rs")
    result.stdout.fnmatch_lines(["llmload: 2 virtual GPUs (2x64.0 MiB, on the CPU)*", "*needs 3 GPUs; found 2*"])
    result.assert_outcomes(passed=2, skipped=1)


def test_downstream_suite_loads_over_both_cards_and_computes_what_the_cpu_does(pytester):
    pytester.makepyfile(
        """
        import torch
        import pytest_llmload

        def test_split(llm_model):
            devices = {str(p.device) for p in llm_model.parameters()}
            assert {"cuda:0", "cuda:1"} <= devices, devices
            ids = torch.tensor([[1, 2, 3, 4, 5]])
            cpu = pytest_llmload.load_model("builtin:tiny-llama", device_map="cpu", precision="fp32")
            got = llm_model(ids.cuda()).logits.cpu()
            assert (got - cpu(ids).logits).abs().max().item() == 0.0
        """
    )
    result = pytester.runpytest(
        "--llm-virtual-gpus=2x64MiB", "--llm-device-map=balanced", "--llm-max-memory=0=400KiB,1=400KiB",
        "--llm-precision=fp32",
    )
    result.assert_outcomes(passed=1)


def test_cuda_cells_run_and_quantized_gpu_cells_skip_on_the_fleet(pytester):
    pytester.makepyfile(
        """
        def test_cell(llm_model):
            assert next(llm_model.parameters()).device.type in ("cuda", "cpu")
        """
    )
    result = pytester.runpytest(
        "--llm-virtual-gpus=2x64MiB", "--llm-device-map=cuda:1", "--llm-precision=fp32", "--llm-precision=int8",
        "-rs",
    )
    result.stdout.fnmatch_lines(["*int8 does not run on virtual GPUs*"])
    result.assert_outcomes(passed=1, skipped=1)


def test_marker_runs_one_test_on_a_fleet(pytester):
    pytester.makepyfile(
        """
        import pytest, torch

        MACHINE_CUDA = torch.cuda.is_available()  # collected before any fleet starts

        @pytest.fixture
        def cards():
            return torch.cuda.device_count()

        @pytest.mark.virtual_gpus("3x64MiB@9.0")
        def test_on_fleet(cards):
            assert cards == 3 and torch.cuda.get_device_capability(2) == (9, 0)

        @pytest.mark.virtual_gpus("3x64MiB")
        @pytest.mark.requires_gpus(3)
        def test_requirement_met_by_the_fleet():
            pass

        def test_after():
            assert torch.cuda.is_available() == MACHINE_CUDA
        """
    )
    pytester.makepyfile(test_bad="""
        import pytest

        @pytest.mark.virtual_gpus("lots")
        def test_bad_spec():
            pass
    """)
    result = pytester.runpytest("-p", "no:randomly", "--continue-on-collection-errors")
    # a bad spec is found at collection, in one line naming the test and the marker
    result.stdout.fnmatch_lines(["test_bad.py::test_bad_spec: @pytest.mark.virtual_gpus('lots'): invalid virtual GPU "
                                 "spec 'lots': card size 'lots': expected a number of bytes*"])
    result.assert_outcomes(passed=3, errors=1)


def test_bad_option_value_is_one_usage_error_line(pytester):
    pytester.makepyfile("def test_x():\n    pass\n")
    result = pytester.runpytest("--llm-virtual-gpus=2x24XB")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: invalid --llm-virtual-gpus value '2x24XB': card size '24XB': expected a number "
                                 "of bytes*"])


def test_ini_key(pytester):
    pytester.makeini("[pytest]\nllm_virtual_gpus = 24GiB,16GiB\n")
    pytester.makepyfile(
        """
        import torch

        def test_x():
            assert [torch.cuda.get_device_properties(i).total_memory for i in range(2)] == [24 * 2**30, 16 * 2**30]
        """
    )
    result = pytester.runpytest()
    result.stdout.fnmatch_lines(["llmload: 2 virtual GPUs (24.0 GiB,16.0 GiB, on the CPU)*"])
    result.assert_outcomes(passed=1)


def test_fit_check_skips_a_cell_that_would_not_fit_a_virtual_card_and_runs_one_that_fits(pytester):
    pytester.makepyfile(
        """
        def test_cell(llm_model):
            assert next(llm_model.parameters()).device.type == "cuda"
        """
    )
    args = ("--llm-model=builtin:tiny-mixtral", "--llm-device-map=cuda:0", "--llm-precision=fp32", "-rs")
    small = pytester.runpytest("--llm-virtual-gpus=2x1MiB", *args)
    small.assert_outcomes(skipped=1)
    small.stdout.fnmatch_lines(["*cuda:0*1.0 MiB*"])
    big = pytester.runpytest("--llm-virtual-gpus=2x64MiB", *args)
    big.assert_outcomes(passed=1)


def test_require_gpus_counts_virtual_cards(pytester):
    pytester.makepyfile("def test_x():\n    pass\n")
    pytester.runpytest("--llm-virtual-gpus=2x64MiB", "--llm-require-gpus=2").assert_outcomes(passed=1)
    short = pytester.runpytest("--llm-virtual-gpus=2x64MiB", "--llm-require-gpus=3")
    assert short.ret == pytest.ExitCode.USAGE_ERROR
    short.stderr.fnmatch_lines(["*needs 3 visible GPUs; found 2*"])


def test_llm_memory_reports_per_card_peaks(pytester):
    pytester.makepyfile(
        """
        import torch

        def test_peaks(llm_memory):
            with llm_memory.track() as usage:
                x = torch.empty(3 * 2**20, dtype=torch.uint8, device="cuda:1")
                del x
            assert usage.gpu_allocated_peak[1] == 3 * 2**20
            assert usage.gpu_allocated_peak[0] == 0
        """
    )
    pytester.runpytest("--llm-virtual-gpus=2x64MiB").assert_outcomes(passed=1)


def test_xdist_workers_get_their_own_virtual_cards(pytester):
    pytester.makepyfile(
        """
        import os, pytest, torch

        @pytest.mark.parametrize("i", range(4))
        def test_slice(i):
            assert torch.cuda.device_count() == 1
            assert os.environ["CUDA_VISIBLE_DEVICES"] in ("0", "1")
        """
    )
    result = pytester.runpytest_subprocess("-n", "2", "--llm-virtual-gpus=2x64MiB", "--llm-gpus-per-worker=1")
    result.assert_outcomes(passed=4)


def test_strict_mode_fails_a_test_the_fleet_cannot_serve(pytester):
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.requires_gpus(2)
        def test_two():
            pass

        @pytest.mark.requires_gpus(3)
        def test_three():
            pass
        """
    )
    result = pytester.runpytest("--llm-virtual-gpus=2x64MiB", "--llm-require-gpus")
    result.stdout.fnmatch_lines(["*needs 3 GPUs; found 2*--llm-require-gpus*"])
    result.assert_outcomes(passed=1, errors=1)  # failed in setup, where the requirement is checked


def test_strict_mode_header_names_the_virtual_fleet(pytester):
    pytester.makepyfile("def test_x():\n    pass\n")
    result = pytester.runpytest("--llm-virtual-gpus=2x64MiB", "--llm-require-gpus")
    result.stdout.fnmatch_lines(["llmload: 2 virtual GPUs (2x64.0 MiB, on the CPU); bitsandbytes * (cpu)"])
    result.assert_outcomes(passed=1)


def test_marker_under_a_session_fleet_runs_on_it_when_the_same_and_skips_otherwise(pytester):
    pytester.makepyfile(
        """
        import pytest, torch

        @pytest.mark.virtual_gpus("2x64MiB")
        def test_same():
            assert torch.cuda.device_count() == 2

        @pytest.mark.virtual_gpus("4x64MiB")
        def test_other():
            pass

        def test_session_fleet_still_there():
            assert torch.cuda.device_count() == 2
        """
    )
    result = pytester.runpytest("--llm-virtual-gpus=2x64MiB", "-rs", "-p", "no:randomly")
    result.stdout.fnmatch_lines(["*needs virtual GPUs 4x64.0 MiB; this session runs on virtual GPUs 2x64.0 MiB*"])
    result.assert_outcomes(passed=2, skipped=1)


def test_a_child_pytest_inherits_the_sessions_fleet_and_says_so(pytester, monkeypatch):
    """transformers' run_test_using_subprocess and subprocess.run([python, -m, pytest, ...]) re-run a test in a
    child: it ran without the fleet, skipped, and the parent passed hollowly."""
    pytester.makepyfile(child_check="""
        import torch

        def test_in_the_child():
            assert torch.cuda.device_count() == 2 and torch.cuda.get_device_properties(1).total_memory == 64 * 2**20
    """)
    pytester.makepyfile(test_parent="""
        import os, subprocess, sys

        def test_rerun_in_a_child():
            child = subprocess.run([sys.executable, "-m", "pytest", "child_check.py", "-p", "no:cacheprovider",
                                    "-rs"], capture_output=True, text=True)
            assert child.returncode == 0, child.stdout + child.stderr
            assert "1 passed" in child.stdout
            assert "virtual GPUs 2x64MiB inherited from the parent process (LLMLOAD_VIRTUAL_GPUS)" in child.stdout
            plain = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                                   capture_output=True, text=True)
            assert plain.stdout.strip() == str(int(os.environ.get("MACHINE_GPUS", "0")))
    """)
    monkeypatch.setenv("MACHINE_GPUS", str(MACHINE_GPUS))
    result = pytester.runpytest_subprocess("test_parent.py", "--llm-virtual-gpus=2x64MiB", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert "LLMLOAD_VIRTUAL_GPUS" not in os.environ


def test_a_conftest_fleet_is_sliced_per_xdist_worker_on_a_machine_without_gpus(pytester, no_gpus):
    """A conftest that starts a fleet at import under --llm-gpus-per-worker=1: each worker got
    CUDA_VISIBLE_DEVICES="" (no GPU to give) and its fleet had no card ('invalid device ordinal')."""
    pytester.makeconftest("""
        from pytest_llmload import virtual_gpus

        _fleet = virtual_gpus("2x64MiB")
        _fleet.__enter__()
    """)
    pytester.makepyfile("""
        import torch

        def test_one():
            assert torch.cuda.device_count() == 1 and torch.ones(2, device="cuda:0").is_cuda

        def test_two():
            assert torch.cuda.device_count() == 1 and torch.ones(2, device="cuda:0").is_cuda
    """)
    result = pytester.runpytest_subprocess("-n", "2", "--llm-gpus-per-worker=1", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


def test_a_marker_fleet_the_session_fleet_hides_fails_under_require_gpus(pytester):
    """It stayed a skip under --llm-require-gpus (issue 24, item 7), unlike every other hardware skip."""
    pytester.makepyfile("""
        import pytest

        @pytest.mark.virtual_gpus("4x64MiB")
        def test_x():
            pass
    """)
    plain = pytester.runpytest_subprocess("--llm-virtual-gpus=2x64MiB", "-rs")
    plain.assert_outcomes(skipped=1)
    strict = pytester.runpytest_subprocess("--llm-virtual-gpus=2x64MiB", "--llm-require-gpus")
    strict.assert_outcomes(errors=1)  # at setup, as every hardware check under --llm-require-gpus
    strict.stdout.fnmatch_lines(["*needs virtual GPUs 4x64.0 MiB; this session runs on virtual GPUs 2x64.0 MiB "
                                 "(fleets do not nest) (--llm-require-gpus: missing hardware fails instead of "
                                 "skipping)*"])
