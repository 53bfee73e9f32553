"""Golden outputs (issue 25): assert_matches_golden / llm_golden, recorded by --llm-update-goldens per device
class, next to the test module; inner pytest runs on the built-in tiny checkpoints, real loads, no mocks."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest

import pytest_llmload._internal.checks.golden  # noqa: F401  (imported once, outside the in-process runs)
import pytest_llmload._internal.session.golden_files  # noqa: F401
from pytest_llmload import assert_matches_golden

LOGITS_TESTS = """
    import os
    import torch
    from pytest_llmload import assert_matches_golden, input_device

    def test_logits(llm_model, llm_tokenizer):
        inputs = llm_tokenizer("Hello world", return_tensors="pt").to(input_device(llm_model))
        with torch.no_grad():
            logits = llm_model(**inputs).logits
        logits[0, 3, 17] += float(os.environ.get("GOLDEN_BUMP", "0"))
        assert_matches_golden("logits", logits)
"""
BATCH_TEST = """
    def test_batch(llm_model, llm_golden):  # 4 x 10 x 320 logits: more than 4096 values, kept in safetensors
        ids = torch.arange(40).reshape(4, 10) % 300 + 1
        with torch.no_grad():
            out = llm_model(ids.to(input_device(llm_model)))
        llm_golden.check("outputs", {"logits": out.logits, "input_ids": ids})
"""
CELL = "tiny-llama-auto-auto"
# The inner runs' failures hold their models in pytester's recorded tracebacks: the leak check is another
# issue's subject, and off here.
QUIET = ("-p", "no:cacheprovider", "--llm-leak-check=off")


def _goldens(pytester, stem: str) -> dict:
    return json.loads(pytester.path.joinpath("goldens", f"{stem}.json").read_text())["goldens"]


def test_missing_golden_names_the_command_that_records_it_then_checks_pass_and_a_1e_3_change_fails(
        pytester, monkeypatch):
    pytester.makepyfile(test_model=LOGITS_TESTS)
    result = pytester.runpytest(*QUIET, "--llm-precision=auto")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        f"no golden 'logits' for test_logits[{CELL}] on device class cpu in goldens/test_model.json; record it with:",
        f"  pytest 'test_model.py::test_logits[{CELL}]' --llm-precision=auto --llm-update-goldens",
    ])
    assert not pytester.path.joinpath("goldens").exists()  # a check never writes

    command = next(line.strip() for line in result.outlines if line.strip().startswith("pytest 'test_model.py"))
    recorded = pytester.runpytest(*QUIET, *shlex.split(command)[1:])  # the command, as printed
    recorded.assert_outcomes(passed=1)
    recorded.stdout.fnmatch_lines(["llmload: recorded 1 golden (cpu) in goldens/test_model.json"])
    entry = _goldens(pytester, "test_model")[f"test_logits[{CELL}]"]["logits"]["cpu"]
    assert (entry["kind"], entry["dtype"], entry["shape"]) == ("tensor", "float32", [1, 12, 320])
    assert len(entry["data"][0]) == 12 and len(entry["data"][0][0]) == 320  # small: inline, by rows

    pytester.runpytest(*QUIET).assert_outcomes(passed=1)
    monkeypatch.setenv("GOLDEN_BUMP", "1e-3")
    changed = pytester.runpytest(*QUIET)
    changed.assert_outcomes(failed=1)
    changed.stdout.fnmatch_lines([
        f"golden 'logits' of test_logits[{CELL}] does not match, device class cpu, in goldens/test_model.json:",
        "logits: 1 of 3840 values out of tolerance",
        "  max abs diff 0.001 at (0, 3, 17): got *, golden *",
        "  tolerance: |got - golden| <= atol + rtol * |golden| with atol 1e-05, rtol 1e-05 "
        "(the default for fp32: the model's precision)",
        f"if the new value is right, record it with: pytest 'test_model.py::test_logits[{CELL}]' --llm-update-goldens",
    ])
    failure = changed.stdout.str().split(" FAILURES ")[1].split(" short test summary ")[0]
    assert "Traceback" not in failure and "golden.py" not in failure and "goldens.py" not in failure  # one message


def test_another_device_class_is_used_with_a_warning_and_updates_touch_only_this_class(pytester):
    pytester.makepyfile(test_model=LOGITS_TESTS + BATCH_TEST)
    pytester.runpytest(*QUIET, "--llm-update-goldens").assert_outcomes(passed=2)
    path = pytester.path / "goldens" / "test_model.json"
    large = json.loads(path.read_text())["goldens"][f"test_batch[{CELL}]"]["outputs"]["cpu"]["items"]
    assert large["logits"]["safetensors"] and "data" not in large["logits"] and large["input_ids"]["data"][0][0] == 1
    assert path.with_suffix(".safetensors").exists()
    document = json.loads(path.read_text())
    goldens = document["goldens"]
    # keys this run must leave alone: another class (hand-edited so that a rewrite would show), a test not run
    goldens[f"test_logits[{CELL}]"]["logits"]["cpu"]["data"][0][0][0] += 0.5
    goldens[f"test_logits[{CELL}]"]["logits"]["cuda-sm90"] = {"kind": "text", "text": "kept"}
    goldens["test_gone"] = {"value": {"cpu": {"kind": "text", "text": "kept"}}}
    path.write_text(json.dumps(document))
    before = json.loads(path.read_text())["goldens"]

    fleet = pytester.runpytest(*QUIET, "--llm-virtual-gpus=2x1GiB", "-k", "batch")
    fleet.assert_outcomes(passed=1)
    fleet.stdout.fnmatch_lines([f"*GoldenDeviceClassWarning: golden 'outputs' of test_batch[[]{CELL}]: none "
                                "recorded for device class virtual, compared with the one recorded for cpu *"])
    fleet.stdout.fnmatch_lines([f"*record one for virtual: pytest 'test_model.py::test_batch[[]{CELL}]' "
                                "--llm-virtual-gpus=2x1GiB --llm-update-goldens"])

    record = pytester.runpytest(*QUIET, "--llm-virtual-gpus=2x1GiB", "--llm-update-goldens")
    record.assert_outcomes(passed=2)
    record.stdout.fnmatch_lines(["llmload: recorded 2 goldens (virtual) in goldens/test_model.json"])
    after = _goldens(pytester, "test_model")
    assert after["test_gone"] == before["test_gone"]
    for test, name in ((f"test_logits[{CELL}]", "logits"), (f"test_batch[{CELL}]", "outputs")):
        assert set(after[test][name]) == set(before[test][name]) | {"virtual"}
        for device_class in before[test][name]:
            assert after[test][name][device_class] == before[test][name][device_class]
    assert after[f"test_logits[{CELL}]"]["logits"]["virtual"]["data"][0][0][0] != \
        before[f"test_logits[{CELL}]"]["logits"]["cpu"]["data"][0][0][0]
    # the fleet has its own goldens now: no warning; the cpu run sees its (hand-edited) golden and fails
    pytester.runpytest(*QUIET, "--llm-virtual-gpus=2x1GiB", "-W", "error").assert_outcomes(passed=2)
    cpu = pytester.runpytest(*QUIET, "-k", "logits")
    cpu.assert_outcomes(failed=1)
    cpu.stdout.fnmatch_lines(["  max abs diff 0.5 at (0, 0, 0): *"])


GENERATION_TESTS = """
    import os
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList
    from pytest_llmload import assert_matches_golden, input_device

    class FirstStepChoice(LogitsProcessor):
        # Makes the token of rank RANK (by score) win the first generated step, as a near tie that flips
        # on another machine would; the generation then continues from it.
        def __init__(self, rank):
            self.rank, self.step = rank, 0

        def __call__(self, input_ids, scores):
            if self.step == 0 and self.rank:
                target = scores.argsort(dim=-1, descending=True)[:, self.rank]
                scores = scores.clone()
                scores[torch.arange(scores.shape[0]), target] = scores.max(dim=-1).values + 1e-3
            self.step += 1
            return scores

    def test_generate(llm_model, llm_tokenizer):
        inputs = llm_tokenizer("Hello world", return_tensors="pt").to(input_device(llm_model))
        out = llm_model.generate(**inputs, max_new_tokens=6, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True,
                                 logits_processor=LogitsProcessorList([FirstStepChoice(int(os.environ["RANK_WINS"]))]))
        assert_matches_golden("greedy", out, topk=int(os.environ["TOPK"]) or None)
"""


def test_topk_generation_passes_a_near_tie_flip_and_fails_a_real_change(pytester, monkeypatch):
    pytester.makepyfile(test_gen=GENERATION_TESTS)
    monkeypatch.setenv("RANK_WINS", "0")
    monkeypatch.setenv("TOPK", "3")
    pytester.runpytest(*QUIET, "--llm-update-goldens").assert_outcomes(passed=1)
    entry = _goldens(pytester, "test_gen")[f"test_generate[{CELL}]"]["greedy"]["cpu"]
    # generate()'s sequences are a batch (of one): per sequence, per generated token, the top 5 token ids
    assert entry["kind"] == "ids" and entry["scored_from"] == len(entry["ids"][0]) - 6
    assert len(entry["topk"][0]) == 6 and {len(top) for top in entry["topk"][0]} == {5}
    reference_top = entry["topk"][0][0]

    monkeypatch.setenv("RANK_WINS", "1")  # the runner-up wins the first step: in the golden's top-3
    pytester.runpytest(*QUIET).assert_outcomes(passed=1)
    monkeypatch.setenv("TOPK", "0")  # the same flip, compared exactly
    exact = pytester.runpytest(*QUIET)
    exact.assert_outcomes(failed=1)
    exact.stdout.fnmatch_lines(["greedy: the sequence first differs at position 12 (generated token 1)",
                                "  tolerance: exact ids"])

    monkeypatch.setenv("TOPK", "3")
    monkeypatch.setenv("RANK_WINS", "200")  # a token far down the list wins: a real change
    changed = pytester.runpytest(*QUIET)
    changed.assert_outcomes(failed=1)
    changed.stdout.fnmatch_lines([
        "greedy: the sequence first differs at position 12 (generated token 1)",
        "  got:    '*'", "  golden: '*'", "  got ids:    [[]1, *]", "  golden ids: [[]1, *]",
        f"  at position 12: got token * '*', golden token {reference_top[0]} '*'",
        "  golden top-3 there: " + ", ".join(f"{token} '*'" for token in reference_top[:3]),
        "  got top-3 there: *",
        "  tolerance: topk=3: a token may differ from the golden only where the golden's top-3 at that position "
        "holds it",
    ])


def test_two_xdist_workers_on_a_virtual_fleet_write_one_merged_file(pytester, monkeypatch, tmp_path_factory):
    log = tmp_path_factory.mktemp("workers")
    monkeypatch.setenv("WORKER_LOG", str(log))
    pytester.makepyfile(test_spread="""
        import os
        import pytest
        import torch
        from pytest_llmload import assert_matches_golden, input_device

        @pytest.mark.parametrize("n", range(4))
        def test_on_the_fleet(llm_model, n):
            with torch.no_grad():
                logits = llm_model(torch.tensor([[n + 1, 2, 3]]).to(input_device(llm_model))).logits
            assert_matches_golden("logits", logits)  # on the fleet's cards: device class virtual
            assert_matches_golden("ids", logits.argmax(-1)[0].tolist())
            assert_matches_golden("cpu", torch.full((2,), float(n)))  # a cpu tensor: device class cpu
            with open(os.path.join(os.environ["WORKER_LOG"], f"worker-{n}"), "w") as log:
                log.write(os.environ.get("PYTEST_XDIST_WORKER", "none"))
    """)
    args = (*QUIET, "-n", "2", "--llm-virtual-gpus=2x1GiB")
    result = pytester.runpytest_subprocess(*args, "--llm-update-goldens")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["llmload: recorded 12 goldens (cpu, virtual) in goldens/test_spread.json"])
    workers = {p.read_text() for p in log.glob("worker-*")}
    assert workers == {"gw0", "gw1"}, workers  # both workers recorded keys
    goldens = _goldens(pytester, "test_spread")
    assert sorted(goldens) == [f"test_on_the_fleet[{CELL}-{n}]" for n in range(4)]
    for entries in goldens.values():
        assert {name: sorted(classes) for name, classes in entries.items()} == {
            "logits": ["virtual"], "ids": ["virtual"], "cpu": ["cpu"]}
    assert [p.name for p in pytester.path.joinpath("goldens").iterdir()] == ["test_spread.json"]  # no leftovers


def test_bad_input_is_one_line_naming_the_value_and_what_is_accepted():
    import torch

    cases = [
        (("", "text"), {}, "name '' is not accepted; expected a non-empty string"),
        (("x", object()), {}, "value is an object; expected a tensor, a dict of tensors, token ids"),
        (("x", {"a": 1}), {}, "value['a'] is an int"),
        (("x", torch.ones(2)), {"atol": -1}, "atol=-1 is not accepted; expected a finite number >= 0"),
        (("x", [1, 2, 3]), {"topk": 2}, "topk=2 needs the scores of each generated position"),
        (("x", torch.ones(2)), {"topk": 2}, "topk=2 applies to generated token ids; the value is a tensor"),
        (("x", [1, 2]), {"topk": 0}, "topk=0 is not accepted; expected a whole number >= 1"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(pytest.fail.Exception) as failure:
            assert_matches_golden(*args, **kwargs)
        assert message in str(failure.value) and "\n" not in str(failure.value), str(failure.value)
        assert str(failure.value).startswith("assert_matches_golden")


def test_outside_a_test_it_is_one_clear_error():
    code = "from pytest_llmload import assert_matches_golden\nassert_matches_golden('text', 'hello')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "pytest_llmload.errors.LLMLoadUsageError: assert_matches_golden: no pytest test is running; call it from a "
        "test (goldens are kept per test), or use the llm_golden fixture")


def test_stored_values_come_back_exactly_and_tolerances_follow_the_precision():
    import torch

    from pytest_llmload._internal.checks.golden import compare_text, observe, tolerance
    from pytest_llmload._internal.session.golden_files import decode, dumps, encode
    from pytest_llmload._internal.session.goldens import nearest_class

    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64):
        value = (torch.randn(50, 7, dtype=torch.float64) * 10.0 ** torch.randint(-6, 6, (50, 7))).to(dtype)
        entry, large = encode(observe("w", {"v": value}, None), "key")
        back = decode(json.loads(dumps(entry)), None)["tensors"]["v"]
        assert not large and back.dtype == dtype and torch.equal(back, value), dtype
    assert tolerance("float32", None, None, None)[:2] == (1e-5, 1e-5)
    assert tolerance("float32", ("bf16", "the cell's precision"), None, None) == (
        5e-2, 5e-2, "the default for bf16: the cell's precision")
    assert tolerance("float16", ("int8", "the cell's precision"), None, 0.0)[:2] == (0.5, 0.0)
    assert tolerance("int64", ("fp16", "the cell's precision"), None, None)[:2] == (0.0, 0.0)
    assert compare_text("reply", observe("w", "Paris is big", None), {"rows": ["Paris is small"]}) == [
        "reply: the text first differs at character 9", "  got:    Paris is big", "  golden: Paris is small",
        "  tolerance: exact"]
    assert nearest_class("virtual", {"cuda-sm90": {}, "cpu": {}}) == "cpu"
    assert nearest_class("cuda-sm89", {"cuda-sm80": {}, "cuda-sm90": {}, "cpu": {}}) == "cuda-sm90"
