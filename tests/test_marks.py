"""Marker arguments are checked once, at collection, by the marker functions' own signatures (issue 12)."""

from __future__ import annotations

import pytest

from pytest_llmload._internal.config.marks import MARKERS, help_lines


@pytest.mark.parametrize("mark, message", [
    ("max_footprint(None)", "@pytest.mark.max_footprint(None): invalid size None*"),
    ("max_footprint(float('inf'))", "@pytest.mark.max_footprint(inf): invalid size*"),
    ("max_footprint()", "@pytest.mark.max_footprint(): missing a required argument: 'limit'; "
                        "expected max_footprint(limit)"),
    ("requires_gpus(1, memory='lots')", "@pytest.mark.requires_gpus(1, memory='lots'): invalid size 'lots'*"),
    ("requires_gpus('2')", "@pytest.mark.requires_gpus('2'): n must be a whole number >= 1, got '2'"),
    ("requires_bitsandbytes('x')", "@pytest.mark.requires_bitsandbytes('x'): too many positional arguments; "
                                   "expected requires_bitsandbytes()"),
    ("llm(precisions=['fp8'])", "@pytest.mark.llm(precisions=['fp8']): invalid precision 'fp8'*"),
    ("llm(precisions=3.5)", "@pytest.mark.llm(precisions=3.5): precisions=3.5: expected a value or a list of values"),
    ("llm('builtin:tiny-gpt2')", "@pytest.mark.llm('builtin:tiny-gpt2'): too many positional arguments*"),
])
def test_bad_marker_arguments_are_one_line_naming_marker_and_test(pytester, mark, message):
    pytester.makepyfile(test_marked=f"""
        import pytest

        @pytest.mark.{mark}
        def test_it():
            pass
    """)
    result = pytester.runpytest()
    assert result.ret != 0
    pattern = message.replace("[", "\x00").replace("]", "[]]").replace("\x00", "[[]")
    result.stdout.fnmatch_lines([f"test_marked.py::test_it: {pattern}"])
    output = result.stdout.str()
    assert "During handling" not in output and "Traceback" not in output
    assert [line.startswith("test_marked.py::test_it: @pytest.mark") for line in result.stdout.lines].count(True) == 1


def test_llm_marker_axis_none_means_the_command_line(pytester):
    pytester.makepyfile("""
        import pytest

        @pytest.mark.llm(precisions=None, models="builtin:tiny-gpt2")
        def test_it(llm_spec):
            pass
    """)
    result = pytester.runpytest("--collect-only", "-q", "--llm-precision=fp16")
    result.stdout.fnmatch_lines(["*test_it[[]tiny-gpt2-auto-fp16[]]"])


def test_help_lines_come_from_the_functions():
    lines = help_lines()
    assert "requires_gpus(n=1, *, memory=None): skip unless n visible GPUs, each with at least `memory` " \
           "(e.g. '24 GiB')" in lines
    assert "requires_bitsandbytes: skip unless bitsandbytes is installed and has a working backend here" in lines
    assert len(lines) == len(MARKERS)


def test_marker_help_in_pytest_markers(pytester):
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.max_footprint(limit): fail if the llm_model*"])


def test_each_marker_is_parsed_once_per_session(pytester, monkeypatch):
    """Parsed at collection, read at setup by the gate, limits and the footprint check (it was parsed again by
    each of them)."""
    from pytest_llmload._internal.config import marks

    calls = []
    for name in ("requires_gpus", "limit_gpu_memory", "max_footprint"):
        original = marks.MARKERS[name]

        def counted(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        counted.__signature__ = __import__("inspect").signature(original)
        counted.__doc__ = original.__doc__
        monkeypatch.setitem(marks.MARKERS, name, counted)
    pytester.makepyfile("""
        import pytest

        @pytest.mark.requires_gpus(0 + 1)
        @pytest.mark.limit_gpu_memory("1GiB")
        @pytest.mark.max_footprint("1GiB")
        @pytest.mark.parametrize("x", [1, 2, 3])
        def test_x(x):
            pass
    """)
    result = pytester.runpytest_inprocess("-p", "no:randomly")
    result.assert_outcomes(skipped=3)
    assert sorted(calls) == ["limit_gpu_memory", "max_footprint", "requires_gpus"]


@pytest.mark.parametrize("device, expected", [
    ('"²"', "device='²': expected a GPU index such as 0 or 'cuda:0'"),
    ('"٠"', "device='٠': expected a GPU index such as 0 or 'cuda:0'"),
    ("7", "limit_gpu_memory(device=7): this process sees 2 GPU(s) (cuda:0 to cuda:1); no GPU 7"),
    ('"cuda:7"', "limit_gpu_memory(device=7): this process sees 2 GPU(s) (cuda:0 to cuda:1); no GPU 7"),
])
def test_limit_gpu_memory_device_is_an_ascii_index_of_a_card_that_exists(pytester, device, expected):
    """'²' failed collection with a traceback through marks.py, '٠' was card 0, device=7 on 2 cards passed."""
    pytester.makepyfile(f"""
        import pytest

        @pytest.mark.limit_gpu_memory("1KiB", device={device})
        def test_x():
            pass
    """)
    result = pytester.runpytest_subprocess("--llm-virtual-gpus=2x64MiB")
    result.assert_outcomes(errors=1)  # at collection (a bad index) or at setup (no such card)
    result.stdout.fnmatch_lines([f"*{expected}*"])
    assert "Traceback" not in result.stdout.str() and "ValueError" not in result.stdout.str()
