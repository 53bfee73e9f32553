"""The numbers users write have one parser (issues 23 and 24): card specs mean the same to --llm-virtual-gpus,
--llm-coverage and ``llmload plan --gpus``; digits are ASCII; counts are bounded before anything is built."""

from __future__ import annotations

import time

import pytest

from pytest_llmload import LLMLoadUsageError, parse_fleet, parse_size, virtual_gpus


def _answers(spec: str) -> list[str]:
    """What each consumer of a card spec says of ``spec`` ("ok" or its error)."""
    from pytest_llmload._internal.session.runners import parse_runners

    answers = []
    for consumer in (parse_fleet, virtual_gpus, parse_runners):
        try:
            consumer(spec)
            answers.append("ok")
        except LLMLoadUsageError as exc:
            answers.append(str(exc).split(": ", 1)[1])  # the reason, without the consumer's name for the value
    return answers


@pytest.mark.parametrize("spec", ["٣x1GiB", "2*1GiB", "2x٦٤MiB", "-2x1GiB", "0x1GiB", "2x64MiB@", "2x64MiB@٩.٠",
                                  "1x64MiB@999999999999999999999.0", "5000x1GiB", "1e3x1GiB"])
def test_one_answer_everywhere_for_a_bad_spec(spec):
    answers = _answers(spec)
    assert "ok" not in answers and len(set(answers)) == 1, answers


@pytest.mark.parametrize("spec", ["2x64MiB", "1X64MiB", "2 x 64 MiB", "2x64MiB@9.0"])
def test_one_answer_everywhere_for_a_good_spec(spec):
    assert _answers(spec) == ["ok"] * 3


def test_the_count_is_named_when_it_is_the_problem():
    with pytest.raises(LLMLoadUsageError, match=r"card count '-2' is not a whole number from 1 to 4096"):
        virtual_gpus("-2x1GiB")
    with pytest.raises(LLMLoadUsageError, match=r"card size '2\*1GiB'"):
        virtual_gpus("2*1GiB")


def test_a_huge_count_is_refused_before_anything_is_built():
    started = time.perf_counter()
    for spec in ("20000000x80GiB", "5000000x1GiB", "9" * 5000 + "x1GiB"):
        with pytest.raises(LLMLoadUsageError, match="at most 4096|from 1 to 4096"):
            virtual_gpus(spec)
    assert time.perf_counter() - started < 1.0  # it took 7.5 s and 600 MB for 5000000x1GiB


def test_a_card_larger_than_any_gpu_says_so():
    with pytest.raises(LLMLoadUsageError, match="larger than any memory"):
        virtual_gpus("1x9223372036854775807")
    with pytest.raises(LLMLoadUsageError, match="larger than any GPU's memory"):
        virtual_gpus("1x2048TiB")


@pytest.mark.parametrize("text", ["１GiB", "٢GiB", "²", "1.٥GiB"])
def test_sizes_take_ascii_digits_only(text):
    with pytest.raises(LLMLoadUsageError, match="invalid size"):
        parse_size(text)


def test_a_capability_after_the_last_item_is_the_fleets_and_one_after_an_item_is_its_own():
    assert [card.capability for card in virtual_gpus("24GiB,16GiB@9.0").cards] == [(9, 0), (9, 0)]
    assert [card.capability for card in virtual_gpus("24GiB@7.5,16GiB@9.0").cards] == [(7, 5), (9, 0)]
    assert [card.capability for card in virtual_gpus("2x1GiB").cards] == [(8, 0), (8, 0)]


def test_coverage_counts_two_spellings_of_one_runner_as_one_named_twice():
    from pytest_llmload._internal.session.runners import parse_runners

    with pytest.raises(LLMLoadUsageError, match=r"runner '1X24GiB' is '1x24GiB' named twice"):
        parse_runners("1x24GiB,1X24GiB")


@pytest.mark.parametrize("args, ini, expected", [
    (["--llm-virtual-gpus="], None, "--llm-virtual-gpus was given an empty value ''"),
    (["--llm-virtual-gpus= "], None, "--llm-virtual-gpus was given an empty value ' '"),
    ([], "llm_virtual_gpus =\n", "llm_virtual_gpus (ini) was given an empty value ''"),
    (["--llm-virtual-gpus=2x64MiB", "--llm-virtual-gpus=4x64MiB"], None,
     "--llm-virtual-gpus was given 2 times ('2x64MiB', '4x64MiB'): a session runs on one fleet; give it once"),
    (["--llm-virtual-gpus=٢x64MiB"], None, "invalid --llm-virtual-gpus value '٢x64MiB': card count '٢'*"),
    (["--llm-virtual-gpus=10000x1GiB"], None, "invalid --llm-virtual-gpus value '10000x1GiB': 10000 cards; a fleet "
                                              "has at most 4096"),
    (["--llm-coverage=cpu"], "llm_virtual_gpus = 2x64MiB\n",
     "--llm-coverage evaluates runner profiles; leave out llm_virtual_gpus ('2x64MiB')"),
    (["--llm-coverage=٢x24GiB"], None, "invalid --llm-coverage runner '٢x24GiB': card count '٢'*"),
])
def test_bad_fleet_options_are_one_usage_error_line(pytester, args, ini, expected):
    if ini is not None:
        pytester.makeini("[pytest]\n" + ini)
    pytester.makepyfile("def test_x():\n    pass\n")
    result = pytester.runpytest_subprocess(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: {expected}*"])
    assert "Traceback" not in result.stderr.str()


def test_an_empty_command_line_fleet_does_not_silently_drop_one_from_pytest_addopts(pytester, monkeypatch):
    monkeypatch.setenv("PYTEST_ADDOPTS", "--llm-virtual-gpus=2x64MiB")
    pytester.makepyfile("def test_x():\n    pass\n")
    result = pytester.runpytest_subprocess("--llm-virtual-gpus=")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: --llm-virtual-gpus was given 2 times ('2x64MiB', ''):*"])


@pytest.mark.parametrize("option, expected", [
    ("--llm-emulate-gpu=٦MiB", "invalid --llm-emulate-gpu value '٦MiB'"),
    ("--llm-dist-timeout=٥", "invalid --llm-dist-timeout value '٥'"),
    ("--llm-dist-timeout=1e300", "invalid --llm-dist-timeout value '1e300': expected a number of seconds > 0 and "
                                 "at most 604800 (a week)"),
    ("--llm-dist-timeout=nan", "invalid --llm-dist-timeout value 'nan'"),
    ("--llm-max-memory=0=٢GiB", "invalid size '٢GiB'"),
    ("--llm-require-gpus=٢", "invalid --llm-require-gpus value '٢'"),
    ("--llm-cache-size=٢", "invalid --llm-cache-size value '٢'"),
])
def test_options_take_ascii_digits_and_bounded_timeouts(pytester, option, expected):
    """Each was accepted ('٥' as 5 seconds; 1e300 failed later under torchrun with an OverflowError)."""
    pytester.makepyfile("def test_x():\n    pass\n")
    result = pytester.runpytest_subprocess(option)
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str()
    result.stderr.fnmatch_lines([f"ERROR: *{expected}*"])


@pytest.mark.parametrize("args, expected", [
    (["plan", "builtin:tiny-llama", "--gpus", "٢x24GiB"], "card count '٢'"),
    (["plan", "builtin:tiny-llama", "--gpus", "2x24GiB", "--max-memory", "0=٢GiB"], "invalid size '٢GiB'"),
    (["plan", "builtin:tiny-llama", "--cpu-memory", "٥GiB"], "invalid size '٥GiB'"),
    (["validate", "builtin:tiny-llama", "auto", "--gpus", "٢"], "'٢'"),
    (["validate", "builtin:tiny-llama", "auto", "--gpus", "99999999999999999999"], "from 0 to 4096"),
    (["estimate", "builtin:tiny-llama", "--lora-r", "٨"], "invalid value '٨': expected a whole number >= 1"),
    (["estimate", "builtin:tiny-llama", "--seq-len", "9" * 400], "expected a whole number >= 1"),
])
def test_the_cli_takes_ascii_digits(args, expected):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "pytest_llmload", *args], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr, result.stderr
