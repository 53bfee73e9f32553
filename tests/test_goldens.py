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
        entry, large = encode(observe("w", {"v": value}, None), ("t", "n", "cpu"))
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


# -- what an adversarial review found (each fails without its fix) ---------------------------------------------

def test_infinities_match_only_themselves_and_nan_only_nan():
    import torch

    from pytest_llmload._internal.checks.golden import compare_tensor

    inf, nan = float("inf"), float("nan")
    for golden, got in ((inf, inf), (-inf, -inf), (nan, nan), (1.0, 1.0 + 1e-6)):
        assert compare_tensor("v", torch.tensor([got]), torch.tensor([golden]), 1e3, 1e3, "given") is None, golden
    for golden, got in ((-inf, 3.0), (inf, -inf), (-inf, inf), (inf, 1e30), (1.0, inf), (nan, 1.0), (1.0, nan),
                        (inf, nan)):
        assert compare_tensor("v", torch.tensor([got]), torch.tensor([golden]), 1e3, 1e3, "given"), (golden, got)
    lines = compare_tensor("v", torch.tensor([3.0, 2.0, 5.0]), torch.tensor([-inf, 1.0, 5.0]), 0.0, 0.0, "given")
    assert lines[1:3] == ["  max abs diff inf at (0,): got 3, golden -inf", "  also at (1,): abs diff 1, got 2, golden 1"]


def _golden_file(tmp_path, goldens: dict, tensors: dict | None = None, metadata: dict | None = None):
    from safetensors.torch import save_file

    from pytest_llmload._internal.session.golden_files import FORMAT, GoldenFile

    folder = tmp_path / "goldens"
    folder.mkdir(exist_ok=True)
    (folder / "test_m.json").write_text(json.dumps({"format": FORMAT, "goldens": goldens}))
    if tensors is not None:
        save_file(tensors, str(folder / "test_m.safetensors"), metadata=metadata)
    return GoldenFile(folder / "test_m.json", "goldens/test_m.json")


def test_recording_never_deletes_a_foreign_or_damaged_safetensors_nor_tensors_still_named(tmp_path):
    import torch

    from pytest_llmload._internal.checks.golden import observe
    from pytest_llmload._internal.session.golden_files import FORMAT, encode

    small = {("test_new", "x", "cpu"): encode(observe("w", torch.ones(2), None), ("test_new", "x", "cpu"))}
    file = _golden_file(tmp_path, {}, {"mine": torch.zeros(3)})  # a user's file, where ours would go
    foreign = file.tensors_path.read_bytes()
    with pytest.raises(ValueError) as refused:
        file.merge_and_write(dict(small), "../test_m.py")
    assert str(refused.value) == ("goldens/test_m.safetensors is not a golden file of pytest-llmload (no format "
                                  "metadata); move it away")
    assert file.tensors_path.read_bytes() == foreign and "test_new" not in file.path.read_text()
    file.tensors_path.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"^goldens/test_m.safetensors cannot be read \(SafetensorError: .*\); "
                                         r"move it away$"):
        file.merge_and_write(dict(small), "../test_m.py")

    # ours, but without the tensor an entry of a test not run names: kept, and said
    old = {"kind": "tensor", "dtype": "float32", "shape": [5000], "safetensors": "test_old/big/cpu"}
    file = _golden_file(tmp_path, {"test_old": {"big": {"cpu": old}}}, {"unnamed": torch.zeros(3)},
                        {"format": FORMAT})
    assert file.merge_and_write(dict(small), "../test_m.py") == ['goldens["test_old"]["big"]["cpu"]']
    assert file.tensors_path.exists() and json.loads(file.path.read_text())["goldens"]["test_old"]["big"]["cpu"] == old
    file = _golden_file(tmp_path, {}, {"unnamed": torch.zeros(3)}, {"format": FORMAT})
    assert file.merge_and_write(dict(small), "../test_m.py") == [] and not file.tensors_path.exists()  # ours, unused


def test_an_entry_of_the_wrong_structure_is_one_line_that_names_it(tmp_path):
    from pytest_llmload._internal.session.golden_files import GoldenEntryError

    ids = {"kind": "ids", "ids": [[1, 2, 3, 4]], "scored_from": 2, "topk": [[5, 6], [7, 8]]}  # one level lost
    file = _golden_file(tmp_path, {
        "test_a": [1], "test_b": {"x": "cpu"}, "test_c": {"x": {"cpu": "zz"}}, "test_d": {"x": {"cpu": ids}},
        "test_e": {"x": {"cpu": {"kind": "text", "texts": "ab"}}},
        "test_f": {"x": {"cpu": {"kind": "tensor", "dtype": "float32", "shape": [3], "data": [0, 1, 2, 3]}}}})
    expected = {
        "test_a": 'entry goldens["test_a"] is not an object (golden name -> device class -> entry)',
        "test_b": 'entry goldens["test_b"]["x"] is not an object (device class -> entry)',
        "test_c": 'entry goldens["test_c"]["x"]["cpu"] is not an object with a \'kind\'',
        "test_d": 'entry goldens["test_d"]["x"]["cpu"] is not token ids (',
        "test_e": 'entry goldens["test_e"]["x"]["cpu"] is not text (',
        "test_f": 'entry goldens["test_f"]["x"]["cpu"] is not a tensor (',
    }
    for test, text in expected.items():
        with pytest.raises(GoldenEntryError) as bad:
            file.classes(test, "x")
            file.read(test, "x", "cpu")
        assert str(bad.value).startswith(f"goldens/test_m.json: {text}"), str(bad.value)
        assert str(bad.value).endswith("; fix it or record it again") and "\n" not in str(bad.value)


def test_a_name_checked_twice_in_a_test_is_a_usage_error():
    with pytest.raises(pytest.fail.Exception, match="^no golden 'twice'"):
        assert_matches_golden("twice", "a")
    with pytest.raises(pytest.fail.Exception, match=r"^assert_matches_golden\('twice', \.\.\.\): 'twice' was already "
                       r"checked in this test on device class \S+; give each check of a test its own name$"):
        assert_matches_golden("twice", "b")


def test_record_refuses_a_foreign_or_damaged_safetensors_and_a_repeated_name(pytester):
    import torch
    from safetensors.torch import save_file

    body = "import torch\nfrom pytest_llmload import assert_matches_golden\n\ndef test_a():\n    {}\n"
    pytester.makepyfile(test_user=body.format('assert_matches_golden("x", torch.ones(2))'),
                        test_broken=body.format('assert_matches_golden("x", torch.ones(2))'),
                        test_twice=body.format('assert_matches_golden("x", "a"); assert_matches_golden("x", "b")'))
    pytester.mkdir("goldens")
    save_file({"mine": torch.zeros(3)}, str(pytester.path / "goldens" / "test_user.safetensors"))
    pytester.path.joinpath("goldens", "test_broken.safetensors").write_bytes(b"garbage")
    result = pytester.runpytest(*QUIET, "--llm-update-goldens")
    result.assert_outcomes(passed=2, failed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines_random([
        "llmload: goldens NOT written to goldens/test_user.json: goldens/test_user.safetensors is not a golden file "
        "of pytest-llmload (no format metadata); move it away",
        "llmload: goldens NOT written to goldens/test_broken.json: goldens/test_broken.safetensors cannot be read "
        "(SafetensorError: *); move it away",
        "*assert_matches_golden('x', ...): 'x' was already checked in this test on device class *; give each *",
    ])
    assert "Traceback" not in result.stdout.str()
    assert sorted(p.name for p in pytester.path.joinpath("goldens").iterdir()) == [
        "test_broken.safetensors", "test_twice.json", "test_user.safetensors"]
    assert list(_goldens(pytester, "test_twice")["test_a"]["x"]) == ["cpu"]


def test_dict_keys_cannot_collide_in_the_safetensors_and_old_names_still_read(tmp_path):
    import torch

    from pytest_llmload._internal.checks.golden import observe
    from pytest_llmload._internal.session.golden_files import FORMAT, encode

    big = torch.zeros(5000)
    first = encode(observe("w", {"k/cpu/j": big}, None), ("test_k", "x", "cpu"))[1]
    second = encode(observe("w", {"j": big}, None), ("test_k", "x/cpu/k", "cpu"))[1]
    assert len(set(first) | set(second)) == 2, (first, second)
    old = {"kind": "tensors", "items": {"j": {"dtype": "float32", "shape": [5000], "safetensors": "test_k/x/cpu/j"}}}
    file = _golden_file(tmp_path, {"test_k": {"x": {"cpu": old}}}, {"test_k/x/cpu/j": big + 1}, {"format": FORMAT})
    assert torch.equal(file.read("test_k", "x", "cpu")["tensors"]["j"], big + 1)


def test_topk_must_be_below_the_vocabulary():
    import torch

    from pytest_llmload._internal.checks.golden import observe
    from pytest_llmload.errors import LLMLoadUsageError

    value = {"ids": torch.tensor([[1, 2, 3]]), "scores": torch.randn(1, 2, 10)}
    assert len(observe("w", value, 9).topk[0][0]) == 9
    for topk in (10, 10**9):
        with pytest.raises(LLMLoadUsageError) as large:
            observe("w", value, topk)
        assert str(large.value) == (f"w: topk={topk} is not below the vocabulary's 10 tokens: every token would be in "
                                    f"the top-{topk} and nothing compared; pass a topk below 10, or None for exact ids")


def test_non_finite_values_are_written_as_standard_json_and_both_forms_read(tmp_path):
    import torch

    from pytest_llmload._internal.checks.golden import observe
    from pytest_llmload._internal.session.golden_files import dumps, encode

    value = torch.tensor([1.5, float("nan"), float("inf"), float("-inf")])
    entry = encode(observe("w", value, None), ("t", "n", "cpu"))[0]
    assert entry["data"] == [1.5, "nan", "inf", "-inf"]
    text = dumps(entry)
    assert "NaN" not in text and "Infinity" not in text
    json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard JSON: {name}"))
    bare = {**entry, "data": [1.5, float("nan"), float("inf"), float("-inf")]}  # as files had them before
    file = _golden_file(tmp_path, {"t": {"n": {"cpu": entry}, "bare": {"cpu": bare}}})
    for name in ("n", "bare"):
        back = file.read("t", name, "cpu")["tensors"][""]
        assert torch.equal(back.nan_to_num(), value.nan_to_num()) and back.isnan().tolist() == value.isnan().tolist()


def test_messages_say_what_is_missing_and_read_well(tmp_path):
    from pytest_llmload._internal.checks.golden import tolerance
    from pytest_llmload._internal.session.golden_files import GoldenEntryError

    entry = {"kind": "tensor", "dtype": "float32", "shape": [5000], "safetensors": "t/n/cpu"}
    file = _golden_file(tmp_path, {"t": {"n": {"cpu": entry}}})
    with pytest.raises(GoldenEntryError) as missing:
        file.read("t", "n", "cpu")
    assert str(missing.value) == ('goldens/test_m.json: entry goldens["t"]["n"]["cpu"] keeps its values in '
                                  'goldens/test_m.safetensors, which is missing; record it again')
    assert tolerance("int64", None, None, None)[2] == "exact for int64 values"
    assert tolerance("int64", None, 1, None)[2] == "atol given, else exact for int64 values"


def test_numpy_scalars_are_numbers():
    import numpy as np

    from pytest_llmload._internal.checks.golden import check_arguments
    from pytest_llmload.errors import LLMLoadUsageError

    atol, rtol, topk = check_arguments("w", "x", np.float32(0.5), np.int64(0), np.int64(3))
    assert (atol, rtol, topk) == (0.5, 0.0, 3) and type(atol) is float and type(topk) is int
    for bad in ({"atol": True}, {"topk": np.float64(3.0)}, {"topk": np.bool_(True)}, {"rtol": np.float64("nan")}):
        with pytest.raises(LLMLoadUsageError):
            check_arguments("w", "x", bad.get("atol"), bad.get("rtol"), bad.get("topk"))


def test_under_torchrun_only_rank_0_records(request, monkeypatch):
    """Every rank computes the same goldens; only rank 0 keeps them to write (RANK as torchrun sets it)."""
    from types import SimpleNamespace

    from pytest_llmload._internal.checks.golden import observe
    from pytest_llmload._internal.session.goldens import Goldens

    observed = observe("assert_matches_golden('text', ...)", "hello", None)
    recorded = {}
    for rank in ("1", "0"):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", rank)
        goldens = Goldens(request.config, SimpleNamespace(update_goldens=True))
        goldens._record("goldens/test_x.json", "test_x", "text", "cpu", observed)
        recorded[rank] = goldens.recorded
    assert recorded["1"] == {}
    assert list(recorded["0"]["goldens/test_x.json"]) == [("test_x", "text", "cpu")]
