"""The load report (pytest_llmload._internal.session.report) and footprint baselines (pytest_llmload._internal.session.baseline)."""

from __future__ import annotations

import json

import pytest

# -- the load report -------------------------------------------------------------------------------

REPORT_SUITE = """
    import pytest

    @pytest.mark.parametrize("i", range(3))
    def test_uses(llm_model, i):
        pass

    def test_plain():
        pass
"""
MATRIX = ["--llm-model=builtin:tiny-llama", "--llm-model=builtin:tiny-gpt2", "--llm-precision=fp32",
          "--llm-precision=fp16"]


def _check_report(path):
    data = json.loads(path.read_text())
    assert data["schema"] == "pytest-llmload/report" and data["version"] == 1
    cells = {c["id"]: c for c in data["cells"]}
    assert sorted(cells) == ["tiny-gpt2-auto-fp16", "tiny-gpt2-auto-fp32", "tiny-llama-auto-fp16",
                             "tiny-llama-auto-fp32"]
    keys = {"id", "model", "device_map", "precision", "loads", "reloads", "private_loads", "load_seconds",
            "footprint_bytes", "bytes_per_device", "device_hops", "tests", "notes", "workers"}
    for cell in cells.values():
        assert set(cell) == keys
        assert cell["tests"] == 3 and cell["loads"] >= 1 and cell["device_hops"] == 0
        assert cell["bytes_per_device"] == {"cpu": cell["footprint_bytes"]}
    assert cells["tiny-llama-auto-fp32"]["footprint_bytes"] == 756032
    return data


def test_report_table_and_json(pytester):
    pytester.makepyfile(REPORT_SUITE)
    result = pytester.runpytest(*MATRIX, "--llm-report=report.json")
    result.assert_outcomes(passed=13)
    result.stdout.fnmatch_lines([
        "*llmload: load report*",
        "llmload: 4 load(s) of 4 cell(s): 4 first load(s), 0 reload(s) after eviction, 0 private copies; used 12 time(s)",
        "cell*loads*load s*footprint*per device*hops*tests",
        "tiny-gpt2-auto-fp16 *1 *",
        "*tiny-llama-auto-fp32 *1 * 738.3 KiB *cpu 738.3 KiB *0 *3",
    ])
    _check_report(pytester.path / "report.json")


def test_report_is_merged_under_xdist(pytester):
    pytester.makepyfile(REPORT_SUITE)
    result = pytester.runpytest_subprocess("-n", "2", *MATRIX, "--llm-report=report.json")
    result.assert_outcomes(passed=13)
    data = _check_report(pytester.path / "report.json")
    workers = {w for c in data["cells"] for w in c["workers"]}
    assert workers <= {"gw0", "gw1"} and workers


def test_report_is_quiet_without_llm_tests_but_still_written(pytester):
    # A run that loads nothing must not leave the previous run's report for CI to archive.
    (pytester.path / "report.json").write_text('{"stale": true}')
    pytester.makepyfile("def test_plain(): pass")
    result = pytester.runpytest("--llm-report=report.json")
    assert "llmload: load report" not in result.stdout.str()
    data = json.loads((pytester.path / "report.json").read_text())
    assert data == {"schema": "pytest-llmload/report", "version": 1, "cells": [], "tests": [], "notes": []}


def test_footprint_baseline_records_then_fails_on_growth(pytester):
    pytester.makepyfile("def test_x(llm_model): pass")
    args = ["--llm-precision=fp16", "--llm-footprint-baseline=footprints.json"]
    pytester.runpytest(*args).assert_outcomes(passed=1)
    baseline = json.loads((pytester.path / "footprints.json").read_text())
    assert baseline["footprints"] == {"builtin:tiny-llama auto fp16": 378048}
    pytester.runpytest(*args).assert_outcomes(passed=1)  # unchanged: passes
    baseline["footprints"]["builtin:tiny-llama auto fp16"] = 300000  # as if the model grew by 26%
    (pytester.path / "footprints.json").write_text(json.dumps(baseline))
    result = pytester.runpytest(*args)
    result.assert_outcomes(failed=1)  # the test fails (not an error at setup), as README says
    result.stdout.fnmatch_lines(["*footprint of tiny-llama-auto-fp16 grew by 26.0%: 293.0 KiB (300000 bytes) in the "
                                 "baseline */footprints.json, 369.2 KiB (378048 bytes) now; the tolerance is 5%*"])
    pytester.runpytest(*args, "--llm-footprint-tolerance=0.3").assert_outcomes(passed=1)


def test_bad_baseline_file_is_a_usage_error(pytester):
    (pytester.path / "footprints.json").write_text("[1, 2]")
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest("--llm-footprint-baseline=footprints.json")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: invalid footprint baseline */footprints.json*"])
