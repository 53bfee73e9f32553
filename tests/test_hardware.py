"""Hardware gating: reasons from inventories, markers end to end, strict mode, fit check, xdist slicing."""

from __future__ import annotations

import os

import pytest

from pytest_llmload.errors import LLMLoadUsageError
from pytest_llmload import GPU, Inventory, cell_reasons, gpu_reasons
from pytest_llmload._internal.hardware import bitsandbytes_reasons, worker_gpus, worker_index
from pytest_llmload._internal.config.marks import parse_mark
from pytest_llmload import make_spec

GiB = 2**30
BNB_OK = dict(bitsandbytes_version="0.50.2", bitsandbytes_backend="cuda")


def inventory(*sizes_gib, capability=(9, 0), **bnb):
    gpus = tuple(GPU(i, "NVIDIA H100 80GB" if s == 80 else f"GPU{s}", s * GiB, s * GiB, capability)
                 for i, s in enumerate(sizes_gib))
    return Inventory(gpus, **(bnb or BNB_OK))


NONE = inventory()
ONE_24 = inventory(24)
TWO_80 = inventory(80, 80)
MIXED = inventory(80, 24, 24)
NO_BNB = inventory(80, bitsandbytes_version=None, bitsandbytes_backend=None, bitsandbytes_error="not installed")
BROKEN_BNB = inventory(bitsandbytes_version="0.50.2", bitsandbytes_backend=None,
                       bitsandbytes_error="RuntimeError: no kernel")


@pytest.mark.parametrize(
    "inv, n, memory, expected",
    [
        (TWO_80, 2, "40 GiB", []),
        (ONE_24, 2, "40 GiB", ["needs 2 GPUs with >= 40.0 GiB each; found 1 (24.0 GiB)"]),
        (NONE, 1, None, ["needs 1 GPU; found none"]),
        (MIXED, 2, "40GiB", ["needs 2 GPUs with >= 40.0 GiB each; found 3 (80.0 GiB, 24.0 GiB, 24.0 GiB)"]),
        (MIXED, 3, "20GiB", []),
        (MIXED, 1, 80 * GiB, []),
    ],
)
def test_gpu_reasons(inv, n, memory, expected):
    assert gpu_reasons(inv, n, memory) == expected


def test_bitsandbytes_reasons():
    assert bitsandbytes_reasons(TWO_80) == []
    assert bitsandbytes_reasons(NO_BNB) == ["needs bitsandbytes; it is not installed"]
    assert bitsandbytes_reasons(BROKEN_BNB) == [
        "needs a working bitsandbytes backend; bitsandbytes 0.50.2 failed here: RuntimeError: no kernel"]


@pytest.mark.parametrize(
    "device_map, precision, inv, expected",
    [
        ("auto", "fp16", NONE, []),  # strategies are legitimate CPU loads
        ("balanced_low_0", "fp32", NONE, []),
        ("process", "fp32", NONE, []),
        ("cuda:1", "fp16", ONE_24, ["device map cuda1 needs cuda:1; found 1 (24.0 GiB)"]),
        ("0", "fp16", NONE, ["device map cuda0 needs cuda:0; found none"]),
        ({"model.embed_tokens": 0, "model.layers": 2, "model.norm": "cpu", "model.rotary_emb": "cpu",
          "lm_head": "cpu"}, "fp32", TWO_80, ["device map map-0+2+cpu-*needs cuda:0, cuda:2; found 2*"]),
        ("0", "bf16", inventory(16, capability=(7, 0)), ["bf16 needs compute capability >= 8.0; GPU16 has 7.0"]),
        ("auto", "bf16", NONE, []),
        ("0", "int8", NO_BNB, ["needs bitsandbytes; it is not installed"]),
        ("cpu", "nf4", BROKEN_BNB, ["needs a working bitsandbytes backend*"]),
        ("cpu", "int8", TWO_80, []),
    ],
)
def test_cell_reasons(device_map, precision, inv, expected):
    import fnmatch

    reasons = cell_reasons(make_spec("builtin:tiny-llama", device_map, precision), inv)
    assert len(reasons) == len(expected), reasons
    assert all(fnmatch.fnmatch(r, e) for r, e in zip(reasons, expected)), reasons


def test_marker_arguments_are_checked():
    def reasons(inv, *args, **kwargs):
        return gpu_reasons(inv, *parse_mark(pytest.mark.requires_gpus(*args, **kwargs).mark, "t.py::test"))

    assert reasons(TWO_80, 2, memory="40GiB") == []
    assert reasons(ONE_24, n=2) == ["needs 2 GPUs; found 1 (24.0 GiB)"]
    with pytest.raises(LLMLoadUsageError, match=r"requires_gpus\(0\): n must be a whole number >= 1"):
        reasons(TWO_80, 0)
    with pytest.raises(LLMLoadUsageError, match=r"expected requires_gpus\(n=1, \*, memory=None\)"):
        reasons(TWO_80, 1, mem="1GiB")
    with pytest.raises(LLMLoadUsageError, match="invalid size 'lots'"):
        reasons(TWO_80, 1, memory="lots")


def test_header_line_describes_the_inventory():
    assert TWO_80.describe() == "llmload: 2 GPUs (NVIDIA H100 80GB x2); bitsandbytes 0.50.2 (cuda)"
    cpu = Inventory((), "0.50.2", "cpu")
    assert cpu.describe() == "llmload: no GPU; bitsandbytes 0.50.2 (cpu)"


# -- markers and strict mode, end to end ------------------------------------------------------------

MARKED = """
    import pytest

    @pytest.mark.requires_gpus(2, memory="40 GiB")
    def test_two_big_gpus():
        pass

    @pytest.mark.requires_gpus
    def test_one_gpu():
        pass

    @pytest.mark.requires_bitsandbytes
    def test_bnb():
        pass

    def test_plain():
        pass
"""


def test_markers_skip_here_with_what_was_needed(pytester, no_gpus):
    pytester.makepyfile(MARKED)
    result = pytester.runpytest("-rs", "--strict-markers")
    result.assert_outcomes(passed=2, skipped=2)  # bitsandbytes works on this CPU
    result.stdout.fnmatch_lines([
        "*needs 2 GPUs with >= 40.0 GiB each; found none*",
        "*needs 1 GPU; found none*",
    ])


def test_strict_mode_turns_hardware_skips_into_failures(pytester, no_gpus):
    pytester.makepyfile(MARKED)
    pytester.makepyfile(test_cells="""
        import pytest

        @pytest.mark.llm(device_maps=["cuda:1", "cpu"], precisions="fp32")
        def test_cell(llm_model):
            pass
    """)
    result = pytester.runpytest("--llm-require-gpus")
    result.assert_outcomes(passed=3, errors=3)  # failures at setup, so pytest counts them as errors
    result.stdout.fnmatch_lines([
        "*llmload: missing hardware (--llm-require-gpus)*",
        "ERROR *test_cell[[]tiny-llama-cuda1-fp32[]]: device map cuda1 needs cuda:1; found none",
        "ERROR *test_two_big_gpus: needs 2 GPUs with >= 40.0 GiB each; found none",
        "ERROR *test_one_gpu: needs 1 GPU; found none",
    ])


def test_strict_mode_from_ini(pytester, no_gpus):
    pytester.makeini("[pytest]\nllm_require_gpus = true\n")
    pytester.makepyfile(MARKED)
    pytester.runpytest().assert_outcomes(passed=2, errors=2)


def test_strict_mode_keeps_a_following_path_argument(pytester, no_gpus):
    pytester.makepyfile(MARKED)
    result = pytester.runpytest("--llm-require-gpus", "test_strict_mode_keeps_a_following_path_argument.py")
    result.assert_outcomes(passed=2, errors=2)


def test_require_gpus_count_fails_at_start_up(pytester, no_gpus):
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest("--llm-require-gpus=4")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: --llm-require-gpus=4: this GPU CI job needs 4 visible GPUs; found 0"])


def test_bad_marker_arguments_fail_the_test_with_one_line(pytester):
    pytester.makepyfile("""
        import pytest

        @pytest.mark.requires_gpus(memory="a lot")
        def test_x():
            pass
    """)
    result = pytester.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*invalid size 'a lot'*"])


def test_header_line_on_this_machine(pytester, no_gpus):
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest()
    result.stdout.fnmatch_lines(["llmload: no GPU; bitsandbytes * (backend tried on first use)"])
    result = pytester.runpytest("--llm-require-gpus")  # GPU CI mode tries bitsandbytes up front
    result.stdout.fnmatch_lines(["llmload: no GPU; bitsandbytes * (cpu)"])


def test_gpu_inventory_fixture(pytester, no_gpus):
    pytester.makepyfile("""
        def test_inventory(gpu_inventory):
            assert gpu_inventory.count == len(gpu_inventory.gpus) == 0
            assert gpu_inventory.bitsandbytes_backend == "cpu"
    """)
    pytester.runpytest().assert_outcomes(passed=1)


# -- pytest-xdist ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "worker, per_worker, visible, expected",
    [
        ("gw0", 1, ["0", "1", "2", "3"], ["0"]),
        ("gw3", 1, ["0", "1", "2", "3"], ["3"]),
        ("gw1", 2, ["0", "1", "2", "3"], ["2", "3"]),
        ("gw2", 2, ["0", "1", "2", "3"], []),  # more workers than GPUs: none left, never GPU 0 again
        ("gw1", 2, ["4", "5", "6", "7"], ["6", "7"]),  # an outer CUDA_VISIBLE_DEVICES is respected
        ("gw0", 3, ["GPU-aaa", "GPU-bbb"], ["GPU-aaa", "GPU-bbb"]),
    ],
)
def test_worker_gpu_slices(worker, per_worker, visible, expected):
    assert worker_gpus(worker_index(worker), per_worker, visible) == expected


def test_worker_slices_are_disjoint_and_cover():
    visible = [str(i) for i in range(8)]
    for per_worker in (1, 2, 3, 4):
        slices = [worker_gpus(i, per_worker, visible) for i in range(8)]
        flat = [g for s in slices for g in s]
        assert sorted(flat, key=int) == visible and len(flat) == len(set(flat))


def test_worker_index():
    assert worker_index("gw12") == 12
    assert worker_index(None) is None and worker_index("master") is None


def test_assign_worker_gpus_sets_cuda_visible_devices(monkeypatch):
    import sys

    from pytest_llmload._internal.hardware import assign_worker_gpus

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():  # a GPU test ran first in this process
        with pytest.raises(LLMLoadUsageError, match="CUDA was initialised in this worker before the plugin"):
            assign_worker_gpus("gw1", 2)
        return

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    note = assign_worker_gpus("gw1", 2)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "6,7"
    assert note == "--llm-gpus-per-worker=2 gives worker gw1 2 of 4 visible GPUs"
    assert assign_worker_gpus(None, 2) is None


def test_xdist_run_of_a_small_matrix(pytester, no_gpus):
    pytester.makepyfile("""
        import os, pytest

        def test_cell(llm_model, llm_spec):
            assert os.environ["CUDA_VISIBLE_DEVICES"] == ""  # no GPUs here: every worker gets none

        @pytest.mark.requires_gpus
        def test_gpu():
            pass
    """)
    result = pytester.runpytest_subprocess(
        "-n", "2", "-rs", "--llm-gpus-per-worker=1", "--llm-precision=fp32", "--llm-precision=fp16",
        "--llm-device-map=auto", "--llm-device-map=cpu",
    )
    result.assert_outcomes(passed=4, skipped=1)
    result.stdout.fnmatch_lines(["*needs 1 GPU; found none; --llm-gpus-per-worker=1 gives worker gw* 0 of 0 visible GPUs*"])


def test_an_empty_cuda_visible_devices_means_no_gpu(monkeypatch):
    from pytest_llmload._internal.hardware.sources import probe_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    probe = probe_gpus(torch="import")
    assert probe.gpus == [] and probe.source == "CUDA_VISIBLE_DEVICES"


def test_nvml_total_is_what_cuda_reports_the_driver_reserve_taken_off():
    """Seen on an H200: NVML's total 143771 MiB, CUDA's 143155 MiB; the v2 info's reserved is the difference."""
    from types import SimpleNamespace

    from pytest_llmload._internal.hardware.sources import _nvml_memory

    MiB = 2**20

    class V2:
        nvmlMemory_v2 = object()

        @staticmethod
        def nvmlDeviceGetMemoryInfo(handle, version=None):
            if version is V2.nvmlMemory_v2:
                return SimpleNamespace(total=143771 * MiB, reserved=616 * MiB, free=143000 * MiB, used=0)
            return SimpleNamespace(total=143771 * MiB, free=143000 * MiB, used=0)

    class V1:
        @staticmethod
        def nvmlDeviceGetMemoryInfo(handle, version=None):
            if version is not None:
                raise TypeError("no version argument")
            return SimpleNamespace(total=24 * 1024 * MiB, free=20 * 1024 * MiB, used=0)

    assert _nvml_memory(V2, None)[1] == 143155 * MiB
    assert _nvml_memory(V1, None)[1] == 24 * 1024 * MiB
