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
    assert data["schema"] == "pytest-llmload/report" and data["version"] == 2
    cells = {c["id"]: c for c in data["cells"]}
    assert sorted(cells) == ["tiny-gpt2-auto-fp16", "tiny-gpt2-auto-fp32", "tiny-llama-auto-fp16",
                             "tiny-llama-auto-fp32"]
    keys = {"id", "model", "device_map", "precision", "loads", "reloads", "private_loads", "load_seconds",
            "footprint_bytes", "bytes_per_device", "device_hops", "tests", "notes", "workers", "status", "reasons",
            "outcomes"}
    for cell in cells.values():
        assert set(cell) == keys
        assert (cell["status"], cell["reasons"], cell["outcomes"]) == ("loaded", [], {"passed": 3})
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
    [test] = data.pop("tests")  # every test is in the report, with its outcome
    assert (test["nodeid"], test["cell"], test["outcome"], test["reason"]) == (
        "test_report_is_quiet_without_llm_tests_but_still_written.py::test_plain", None, "passed", None)
    assert data == {"schema": "pytest-llmload/report", "version": 2, "cells": [], "notes": []}


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


# -- cell ids, outcomes, skipped cells, stable baseline keys, output folders -----------------------------

def _two_ckpts(pytester):
    import shutil

    from pytest_llmload._internal.loading.builtins import builtin_path

    shutil.copytree(builtin_path("tiny-gpt2"), pytester.path / "a" / "ckpt")
    shutil.copytree(builtin_path("tiny-llama"), pytester.path / "b" / "ckpt")


def test_report_cell_ids_are_the_test_ids_cell_part(pytester):
    """Checkpoints in folders named alike got distinct test ids (ckpt-auto-auto-03c280, ...-6a0c11) but one
    report id "ckpt-auto-auto", so the report could not be joined with test results (issue 10). A test
    whose own matrix holds only one of them names it as the others do."""
    import re

    _two_ckpts(pytester)
    pytester.makepyfile("""
        import pytest

        def test_both(llm_model):
            pass

        @pytest.mark.llm(models=["./b/ckpt"])
        def test_one(llm_model):
            pass
    """)
    result = pytester.runpytest("-v", "--llm-model=a/ckpt", "--llm-model=b/ckpt", "--llm-report=report.json")
    result.assert_outcomes(passed=3)
    ran = re.findall(r"::(test_\w+)\[(ckpt-auto-auto[^\]]*)\] PASSED", result.stdout.str())
    assert len(ran) == 3
    ids = {cell for _, cell in ran}
    assert len(ids) == 2 and all(re.fullmatch(r"ckpt-auto-auto-[0-9a-f]{6}", i) for i in ids), ran
    data = json.loads((pytester.path / "report.json").read_text())
    assert sorted(c["id"] for c in data["cells"]) == sorted(ids)
    b_cell = next(c["id"] for c in data["cells"] if c["model"].endswith("b/ckpt") or c["model"].endswith("b\\ckpt"))
    assert ("test_one", b_cell) in ran


OUTCOME_SUITE = """
    import pytest

    def test_loads(llm_model):
        pass

    def test_fails(llm_spec):
        assert llm_spec.precision == "nope", "wrong precision"

    @pytest.mark.xfail(reason="not yet")
    def test_xfail():
        assert False

    @pytest.mark.skip(reason="not today")
    def test_skip():
        pass

    def test_plain():
        pass
"""
OUTCOME_ARGS = ["--llm-device-map=disk", "--llm-precision=fp32", "--llm-precision=int8", "--llm-report=report.json"]


def _outcomes(data):
    tests = {t["nodeid"].split("::")[-1]: t for t in data["tests"]}
    return {name: (t["cell"], t["outcome"], t["reason"]) for name, t in tests.items()}


def _check_outcome_report(path):
    data = json.loads(path.read_text())
    skipped_int8 = ("int8 on a map of only cpu and disk would keep every module in fp32 (bitsandbytes' "
                    "llm_int8_enable_fp32_cpu_offload), so nothing would be quantized; use device_map 'cpu' for "
                    "quantized loads without a GPU")
    assert _outcomes(data) == {
        "test_loads[tiny-llama-disk-fp32]": ("tiny-llama-disk-fp32", "passed", None),
        "test_loads[tiny-llama-disk-int8]": ("tiny-llama-disk-int8", "skipped", skipped_int8),
        "test_fails[tiny-llama-disk-fp32]": ("tiny-llama-disk-fp32", "failed", "AssertionError: wrong precision\n"
                                             "assert 'fp32' == 'nope'\n  \n  - nope\n  + fp32"),
        "test_fails[tiny-llama-disk-int8]": ("tiny-llama-disk-int8", "failed", "AssertionError: wrong precision\n"
                                             "assert 'int8' == 'nope'\n  \n  - nope\n  + int8"),
        "test_xfail": (None, "xfailed", "not yet"),
        "test_skip": (None, "skipped", "not today"),
        "test_plain": (None, "passed", None),
    }
    assert all(t["duration"] >= 0 for t in data["tests"])
    cells = {c["id"]: c for c in data["cells"]}
    assert sorted(cells) == ["tiny-llama-disk-fp32", "tiny-llama-disk-int8"]  # the skipped cell too
    loaded, skipped = cells["tiny-llama-disk-fp32"], cells["tiny-llama-disk-int8"]
    assert (loaded["status"], loaded["loads"], loaded["reasons"]) == ("loaded", 1, [])
    assert loaded["outcomes"] == {"passed": 1, "failed": 1}
    assert (skipped["status"], skipped["loads"], skipped["footprint_bytes"]) == ("skipped", 0, None)
    assert skipped["reasons"] == [skipped_int8] and skipped["outcomes"] == {"skipped": 1, "failed": 1}
    assert (skipped["model"], skipped["device_map"], skipped["precision"]) == ("builtin:tiny-llama", {"": "disk"}, "int8")
    return data


def test_report_holds_every_test_outcome_and_every_cell(pytester):
    """The report had "tests": [] unless a test used llm_memory, left out skipped cells (int8 on an offload
    map) and held no outcome (issue 12)."""
    pytester.makepyfile(OUTCOME_SUITE)
    result = pytester.runpytest(*OUTCOME_ARGS)
    result.assert_outcomes(passed=2, failed=2, skipped=2, xfailed=1)
    _check_outcome_report(pytester.path / "report.json")
    assert [p.name for p in pytester.path.iterdir() if p.name.startswith(".llmload-")] == []


def test_report_outcomes_and_cells_are_merged_under_xdist(pytester):
    pytester.makepyfile(OUTCOME_SUITE)
    result = pytester.runpytest_subprocess("-n", "2", *OUTCOME_ARGS)
    result.assert_outcomes(passed=2, failed=2, skipped=2, xfailed=1)
    data = _check_outcome_report(pytester.path / "report.json")
    assert {w for c in data["cells"] for w in c["workers"]} <= {"gw0", "gw1"}


def test_a_checkpoint_outside_the_project_is_keyed_by_its_content_not_its_path(pytester, tmp_path_factory):
    """A model shipped in a package (site-packages/.../model) was keyed by the venv's absolute path, and a
    custom map by its whole JSON: after a Python upgrade or a venv move the baseline silently recorded anew
    instead of checking (issue 11)."""
    import shutil

    from pytest_llmload._internal.loading.builtins import builtin_path

    outside = tmp_path_factory.mktemp("venvs")
    old = outside / "venv" / "lib" / "python3.11" / "site-packages" / "pkg" / "model"
    shutil.copytree(builtin_path("tiny-gpt2"), old)
    pytester.makepyfile("def test_x(llm_model): pass")
    args = ["--llm-precision=fp32", "--llm-device-map=auto", '--llm-device-map={"transformer": "cpu", "lm_head": "cpu"}',
            "--llm-footprint-baseline=footprints.json"]
    pytester.runpytest(f"--llm-model={old}", *args).assert_outcomes(passed=2)
    recorded = json.loads((pytester.path / "footprints.json").read_text())
    keys = sorted(recorded["footprints"])
    assert len(keys) == 2 and all(k.startswith("GPT2LMHeadModel@") for k in keys), keys
    assert not any(str(outside) in k or "python3" in k or "{" in k for k in keys), keys
    custom = next(k for k in keys if " map-" in k)
    assert recorded["device_maps"] == {custom.split()[1]: {"lm_head": "cpu", "transformer": "cpu"}}
    # A Python upgrade (or a venv move) puts the same checkpoint elsewhere: it is checked, not recorded anew.
    new = outside / "venv2" / "lib" / "python3.12" / "site-packages" / "pkg" / "model"
    shutil.copytree(old, new)
    recorded["footprints"] = {k: 300000 for k in keys}
    (pytester.path / "footprints.json").write_text(json.dumps(recorded))
    result = pytester.runpytest(f"--llm-model={new}", *args)
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*footprint of model-auto-fp32 grew by*", "*footprint of model-map-cpu-*-fp32 grew by*"])


def test_baseline_entries_under_old_keys_are_still_checked(pytester):
    """Files written before keys changed: a custom map's entry under its whole JSON is still read."""
    import shutil

    from pytest_llmload._internal.loading.builtins import builtin_path

    shutil.copytree(builtin_path("tiny-gpt2"), pytester.path / "models" / "ckpt")
    old = {"models/ckpt auto fp32": 300000, 'models/ckpt {"lm_head":"cpu","transformer":"cpu"} fp32': 300000}
    (pytester.path / "footprints.json").write_text(json.dumps({"footprints": old}))
    pytester.makepyfile("def test_x(llm_model): pass")
    result = pytester.runpytest("--llm-model=models/ckpt", "--llm-precision=fp32", "--llm-device-map=auto",
                                '--llm-device-map={"transformer": "cpu", "lm_head": "cpu"}',
                                "--llm-footprint-baseline=footprints.json")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*footprint of ckpt-auto-fp32 grew by*", "*footprint of ckpt-map-cpu-*-fp32 grew by*"])


def test_recording_beside_an_entry_no_cell_matched_says_so(pytester):
    """A key that no longer matches its entry must not be recorded anew in silence (issue 11)."""
    stale = {"GPT2LMHeadModel@0123456789ab auto fp32": 500000}
    (pytester.path / "footprints.json").write_text(json.dumps({"footprints": stale}))
    pytester.makepyfile("def test_x(llm_model): pass")
    result = pytester.runpytest("--llm-precision=fp32", "--llm-footprint-baseline=footprints.json")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([
        "llmload: footprint baseline */footprints.json: recorded 1 new entry (builtin:tiny-llama auto fp32); "
        "1 entry matched no cell of this run (GPT2LMHeadModel@0123456789ab auto fp32): if it is the same cell under "
        "an old key, its check was lost: move its value to the new key"])
    recorded = json.loads((pytester.path / "footprints.json").read_text())["footprints"]
    assert sorted(recorded) == ["GPT2LMHeadModel@0123456789ab auto fp32", "builtin:tiny-llama auto fp32"]


def test_ini_output_folders_are_created_like_junitxml(pytester):
    """An ini llm_report whose folder was missing failed with an error naming --llm-report, an option the user
    never gave; pytest's --junitxml creates missing parent folders (issue 13)."""
    pytester.makeini("[pytest]\nllm_report = out/r.json\nllm_footprint_baseline = base/line/f.json\n")
    pytester.makepyfile("def test_x(llm_model): pass")
    pytester.runpytest().assert_outcomes(passed=1)
    assert [c["id"] for c in json.loads((pytester.path / "out" / "r.json").read_text())["cells"]] == [
        "tiny-llama-auto-auto"]
    assert json.loads((pytester.path / "base" / "line" / "f.json").read_text())["footprints"]
    pytester.runpytest("--llm-report=cli/out/r.json").assert_outcomes(passed=1)
    assert (pytester.path / "cli" / "out" / "r.json").is_file()


@pytest.mark.parametrize("option, ini", [("--llm-report", "llm_report"),
                                         ("--llm-footprint-baseline", "llm_footprint_baseline")])
def test_an_output_folder_that_cannot_be_created_names_where_the_value_came_from(pytester, option, ini):
    (pytester.path / "afile").write_text("")
    pytester.makeini(f"[pytest]\n{ini} = afile/out/r.json\n")
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: {ini} (ini) = */afile/out/r.json: cannot create the folder */afile/out: "
                                 "*/afile is not a folder"])
    assert option not in result.stderr.str()
    result = pytester.runpytest(f"{option}=afile/x/r.json")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: {option}=*/afile/x/r.json: cannot create the folder */afile/x: "
                                 "*/afile is not a folder"])
    assert not (pytester.path / "out").exists()
