"""GPU CI beyond gating: one GPU probe order, --llm-coverage, limit_gpu_memory/--llm-max-gpu-peak,
--llm-emulate-gpu, ROCm visibility variables."""

from __future__ import annotations

import json
import re

import pytest

from pytest_llmload._internal import hardware
from pytest_llmload import GPU
from pytest_llmload._internal.hardware import sources

GiB = 2**30


# -- one probe order ------------------------------------------------------------------------------------
@pytest.fixture
def fake_sources(monkeypatch):
    """Replace the source registry; no visibility variable set."""
    for name in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)

    def install(*entries):
        monkeypatch.setattr(sources, "SOURCES", list(entries))

    return install


def test_every_caller_takes_gpus_from_the_same_order_and_nvidia_smi_is_not_skipped(fake_sources):
    smi = [GPU(0, "NVIDIA L4", 24 * GiB, 23 * GiB, (8, 9)), GPU(1, "NVIDIA L4", 24 * GiB, 23 * GiB, (8, 9))]
    asked = []
    fake_sources(("virtual", lambda: asked.append("virtual")), ("nvml", lambda: asked.append("nvml")),
                 ("nvidia-smi", lambda: asked.append("nvidia-smi") or smi))
    inventory = hardware.probe_inventory(bitsandbytes=False)
    assert (inventory.source, inventory.count) == ("nvidia-smi", 2)  # the old probe_inventory chain skipped it
    assert asked == ["virtual", "nvml", "nvidia-smi"]
    assert hardware.visible_gpu_count() == 2
    assert hardware.outer_visible_gpus() == ["0", "1"]
    assert hardware.header_line().startswith("llmload: 2 GPUs (NVIDIA L4 x2);")


# -- --llm-coverage ---------------------------------------------------------------------------------------
COVERAGE_SUITE = """
import pytest

def test_plain():
    pass

@pytest.mark.requires_gpus(1)
def test_one_gpu():
    pass

@pytest.mark.requires_gpus(2, memory="40GiB")
def test_two_big():
    pass

@pytest.mark.requires_bitsandbytes
def test_bnb():
    pass

@pytest.mark.llm(precisions="bf16", device_maps="cuda:0")
def test_bf16(llm_model):
    raise AssertionError("coverage runs nothing")

@pytest.mark.llm(device_maps=["cpu", "cuda:0"])
def test_matrix(llm_model):
    raise AssertionError("coverage runs nothing")

@pytest.mark.requires_gpus(4)
def test_four():
    pass
"""

EXPECTED = {
    "test_plain": ["run", "run", "run"],
    "test_one_gpu": ["skip", "run", "run"],
    "test_two_big": ["skip", "skip", "run"],
    "test_bnb": ["run", "run", "run"],
    "test_bf16[tiny-llama-cuda0-bf16]": ["skip", "run", "run"],
    "test_matrix[tiny-llama-cpu-auto]": ["run", "run", "run"],
    "test_matrix[tiny-llama-cuda0-auto]": ["skip", "run", "run"],
    "test_four": ["skip", "skip", "skip"],
}


def coverage_table(lines: list[str]) -> dict[str, list[str]]:
    table = {}
    for line in lines:
        match = re.match(r"^test_coverage_suite\.py::(\S+)\s+(.*)$", line)
        if match:
            table[match.group(1)] = [re.sub(r" \[\d+\]$", "", c) for c in re.split(r"\s{2,}", match.group(2))]
    return table


@pytest.mark.parametrize("xdist", [False, True], ids=["plain", "xdist-n2"])
def test_coverage_table_lists_unrun_tests_first_and_exits_1(pytester, xdist):
    pytester.makepyfile(test_coverage_suite=COVERAGE_SUITE)
    args = ["-p", "xdist", "-n", "2"] if xdist else []
    result = pytester.runpytest(*args, "--llm-coverage=cpu,1x24GiB,2x80GiB@9.0", "--llm-report=report.json")
    assert result.ret == 1
    lines = result.stdout.lines
    assert coverage_table(lines) == EXPECTED
    first = lines.index("tests no runner runs: 1 of 8")
    assert lines[first + 1].startswith("  test_coverage_suite.py::test_four (cpu: needs 4 GPUs; found none;")
    assert first < min(i for i, line in enumerate(lines) if line.startswith("test_coverage_suite.py::"))
    result.stdout.fnmatch_lines(["[[]*[]] needs 2 GPUs with >= 40.0 GiB each; found 1 (24.0 GiB)",
                                 "runs per runner: cpu 3, 1x24GiB 6, 2x80GiB@9.0 7"])
    report = json.loads((pytester.path / "report.json").read_text())["coverage"]
    assert report["runners"] == ["cpu", "1x24GiB", "2x80GiB@9.0"]
    assert report["unrun"] == ["test_coverage_suite.py::test_four"]
    verdicts = {t["nodeid"].split("::")[1]: [t["runners"][r]["verdict"] for r in report["runners"]]
                for t in report["tests"]}
    assert verdicts == EXPECTED


def test_coverage_allow_unrun_strict_fit_check_and_bad_runner(pytester):
    pytester.makepyfile(test_coverage_suite=COVERAGE_SUITE)
    result = pytester.runpytest("--llm-coverage=cpu,1x300MiB", "--llm-coverage-allow-unrun",
                                "--llm-require-gpus=2")  # strict; the GPU count is not checked on this machine
    assert result.ret == 0
    table = coverage_table(result.stdout.lines)
    assert table["test_one_gpu"] == ["FAIL (strict)", "run"]
    # tiny-llama's fp32 weights and a 500 MiB CUDA context do not fit a 300 MiB card: the fit check says so
    assert table["test_matrix[tiny-llama-cuda0-auto]"] == ["FAIL (strict)", "FAIL (strict)"]
    result.stdout.fnmatch_lines(["*needs ~*(incl. ~500.0 MiB CUDA context) on cuda:0; * usable (300.0 MiB free, * kept spare)*"])
    bad = pytester.runpytest("--llm-coverage=cpu,2x")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["*invalid --llm-coverage runner '2x': expected cpu or NxSIZE[[]@MAJOR.MINOR[]]*"])


# -- limit_gpu_memory / --llm-max-gpu-peak -----------------------------------------------------------------
def test_limit_gpu_memory_on_a_virtual_fleet(pytester):
    pytester.makepyfile(
        """
        import pytest, torch

        MiB = 2**20

        def hold(mib, device="cuda:0"):
            return torch.empty(mib * MiB, dtype=torch.uint8, device=device)

        def reserved_40_allocated_8():
            x = hold(40)
            del x  # the allocator keeps it reserved
            torch.cuda.reset_peak_memory_stats(0)
            return hold(8)

        @pytest.mark.limit_gpu_memory("32MiB")
        def test_over():
            hold(40)

        @pytest.mark.limit_gpu_memory("64 MiB")
        def test_under():
            hold(40)

        @pytest.mark.limit_gpu_memory("32MiB", device=1)
        def test_other_card():
            hold(40)

        @pytest.mark.limit_gpu_memory("32MiB")
        def test_allocated_peak_is_small():
            reserved_40_allocated_8()

        @pytest.mark.limit_gpu_memory("32MiB", kind="reserved")
        def test_reserved_peak_is_not():
            reserved_40_allocated_8()

        def test_session_limit():
            hold(50, "cuda:1")
        """
    )
    result = pytester.runpytest("--llm-virtual-gpus=2x64MiB", "--llm-max-gpu-peak=48MiB")
    result.assert_outcomes(passed=3, failed=3)
    result.stdout.fnmatch_lines([
        "_*_ test_over _*_",
        "Test was limited to 32.0 MiB of allocated GPU memory on cuda:0 but its peak "
        "was 40.0 MiB (limit_gpu_memory)",
        "_*_ test_reserved_peak_is_not _*_",
        "Test was limited to 32.0 MiB of reserved GPU memory on cuda:0 "
        "but its peak was 40.0 MiB (limit_gpu_memory)",
        "_*_ test_session_limit _*_",
        "Test was limited to 48.0 MiB of allocated GPU memory on cuda:1 but its "
        "peak was 50.0 MiB (--llm-max-gpu-peak)",
    ])
    from pytest_llmload.errors import LLMLoadUsageError
    from pytest_llmload._internal.config.marks import parse_mark

    assert parse_mark(pytest.mark.limit_gpu_memory("6 GiB", device="cuda:1").mark, "t") == (6 * GiB, 1, "allocated")
    with pytest.raises(LLMLoadUsageError, match="kind='peak': expected 'allocated' or 'reserved'"):
        parse_mark(pytest.mark.limit_gpu_memory("1MiB", kind="peak").mark, "t")


# -- --llm-emulate-gpu ------------------------------------------------------------------------------------
def test_emulate_gpu_shrinks_the_virtual_cards_for_markers_allocations_and_the_header(pytester):
    pytester.makepyfile(
        """
        import pytest, torch

        def test_a_32mib_tensor_does_not_fit():
            assert torch.cuda.get_device_properties(1).total_memory == 16 * 2**20
            with pytest.raises(torch.OutOfMemoryError):
                torch.empty(32 * 2**20, dtype=torch.uint8, device="cuda:0")

        @pytest.mark.requires_gpus(1, memory="24MiB")
        def test_needs_a_bigger_card():
            pass
        """
    )
    result = pytester.runpytest("--llm-virtual-gpus=2x64MiB", "--llm-emulate-gpu=16MiB", "-rs")
    result.stdout.fnmatch_lines([
        "llmload: 2 virtual GPUs (2x16.0 MiB, on the CPU), emulated as 16.0 MiB each (--llm-emulate-gpu)*",
        "*needs 1 GPU with >= 24.0 MiB each; found 2 (16.0 MiB, 16.0 MiB)*"])
    result.assert_outcomes(passed=1, skipped=1)
    assert hardware.emulated_memory() is None  # the session put things back
    bad = pytester.runpytest("--llm-emulate-gpu=0")
    bad.stderr.fnmatch_lines(["*invalid --llm-emulate-gpu value '0': expected a size > 0*"])


# -- ROCm ---------------------------------------------------------------------------------------------------
ROCM_SMI = """#!/bin/sh
cat <<'EOF'
{"card0": {"Card Series": "AMD Instinct MI300X", "VRAM Total Memory (B)": "205822885888", "VRAM Total Used Memory (B)": "0"},
 "card1": {"Card Series": "AMD Instinct MI300X", "VRAM Total Memory (B)": "205822885888", "VRAM Total Used Memory (B)": "0"},
 "card2": {"Card Series": "AMD Instinct MI300X", "VRAM Total Memory (B)": "205822885888", "VRAM Total Used Memory (B)": "1048576"},
 "card3": {"Card Series": "AMD Instinct MI300X", "VRAM Total Memory (B)": "205822885888", "VRAM Total Used Memory (B)": "0"}}
EOF
"""


def test_rocm_worker_slices_set_hip_and_rocr_and_the_header_says_rocm(monkeypatch, tmp_path, fake_sources):
    import torch

    tool = tmp_path / "rocm-smi"
    tool.write_text(ROCM_SMI)
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    monkeypatch.setattr(torch.version, "hip", "6.2.41133")
    fake_sources(*[s for s in sources.SOURCES if s[0] != "virtual"])  # the real registry, no fleet running
    assert hardware.is_rocm() and hardware.visibility_variable() == "HIP_VISIBLE_DEVICES"
    assert hardware.header_line().startswith("llmload: 4 ROCm GPUs (AMD Instinct MI300X x4);")

    note = hardware.assign_worker_gpus("gw1", 2)
    import os

    assert {k: os.environ[k] for k in ("ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES")} \
        == {"ROCR_VISIBLE_DEVICES": "2,3", "HIP_VISIBLE_DEVICES": "0,1", "CUDA_VISIBLE_DEVICES": "0,1"}
    assert note == ("--llm-gpus-per-worker=2 gives worker gw1 2 of 4 visible GPUs "
                    "(ROCR_VISIBLE_DEVICES=2,3, HIP_VISIBLE_DEVICES=0,1)")
    probe = hardware.probe_gpus()  # the worker's view: physical cards 2 and 3, numbered 0 and 1
    assert probe.source == "rocm-smi"
    assert [(g.index, g.free_memory) for g in probe.gpus] == [(0, 205822885888 - 2**20), (1, 205822885888)]
