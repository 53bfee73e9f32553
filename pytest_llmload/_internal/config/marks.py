"""The plugin's markers, one plain function each: its real signature checks the arguments.

``MARKERS`` is the registry (as in pytest-memray): the marker's help line is generated from the
function, Python's own binding rejects wrong arguments, and the body checks the values. Each returns
the marker's parsed arguments. :func:`parse_mark` turns any problem into one line naming the marker
and the test.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import pytest

from pytest_llmload.errors import LLMLoadUsageError

_PARSED = pytest.StashKey[dict]()  # id(mark) -> (mark, its parsed arguments), for the session


def llm(*, models: Any = None, device_maps: Any = None, precisions: Any = None) -> dict[str, list]:
    """this test's own matrix of models, device maps and precisions (None: the command line's)"""
    from pytest_llmload._internal.config.specs import parse_device_map, parse_model, parse_precision, unique

    axes: dict[str, list] = {}
    for axis, values, parse in (("models", models, parse_model), ("device_maps", device_maps, parse_device_map),
                                ("precisions", precisions, parse_precision)):
        if values is None:
            continue
        if isinstance(values, (str, dict, int)) and not isinstance(values, bool):
            values = [values]
        if not isinstance(values, (list, tuple)):
            raise LLMLoadUsageError(f"{axis}={values!r}: expected a value or a list of values")
        if not values:
            raise LLMLoadUsageError(f"{axis}=... is empty")
        axes[axis] = unique(parse(v) for v in values)
    return axes


def requires_gpus(n: int = 1, *, memory: Any = None) -> tuple[int, int | None]:
    """skip unless n visible GPUs, each with at least `memory` (e.g. '24 GiB')"""
    from pytest_llmload._internal.config.numbers import parse_size

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise LLMLoadUsageError(f"n must be a whole number >= 1, got {n!r}")
    return n, (parse_size(memory) if memory is not None else None)


def requires_bitsandbytes() -> None:
    """skip unless bitsandbytes is installed and has a working backend here"""
    return None


def max_footprint(limit: Any) -> int:
    """fail if the llm_model the test used has a larger get_memory_footprint()"""
    from pytest_llmload._internal.config.numbers import parse_size

    return parse_size(limit)


def limit_gpu_memory(limit: Any, *, device: Any = None, kind: str = "allocated") -> tuple[int, int | None, str]:
    """fail if the test's peak allocated (or kind='reserved') memory on any GPU (or `device`) exceeded `limit`"""
    from pytest_llmload._internal.config.numbers import parse_size

    size = parse_size(limit)
    if size < 1:
        raise LLMLoadUsageError(f"limit {limit!r}: expected a size > 0 such as '6 GiB'")
    if kind not in ("allocated", "reserved"):
        raise LLMLoadUsageError(f"kind={kind!r}: expected 'allocated' or 'reserved'")
    from pytest_llmload._internal.config.numbers import is_whole_number

    index = None
    if device is not None:
        text = str(device).strip() if isinstance(device, (int, str)) and not isinstance(device, bool) else ""
        if text.startswith("cuda:"):
            text = text[5:]
        if not is_whole_number(text) or len(text) > 6:  # ASCII digits: "²" and "٠" are no GPU index
            raise LLMLoadUsageError(f"device={device!r}: expected a GPU index such as 0 or 'cuda:0'")
        index = int(text)
    return size, index, kind


def requires_world_size(n: int) -> int:
    """skip unless launched (torchrun/accelerate launch) with at least n processes"""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise LLMLoadUsageError(f"n must be a whole number >= 1, got {n!r}")
    return n


def virtual_gpus(spec: Any, *, name: Any = None) -> Any:
    """run this test on a virtual GPU fleet (e.g. '2x24GiB', '24GiB,16GiB@9.0'): CPU-backed cards with real values"""
    from pytest_llmload._internal.virtual.fleet import parse_virtual_spec

    if name is not None and not isinstance(name, str):
        raise LLMLoadUsageError(f"name={name!r}: expected a card name (a string)")
    return parse_virtual_spec(spec, name)


def no_gpu_leak() -> None:
    """fail if GPU memory allocated after this test's teardown is more than before its setup (--llm-leak-check=tests for every test)"""
    return None


MARKERS: dict[str, Callable[..., Any]] = {
    "llm": llm,
    "requires_gpus": requires_gpus,
    "requires_bitsandbytes": requires_bitsandbytes,
    "max_footprint": max_footprint,
    "virtual_gpus": virtual_gpus,
    "limit_gpu_memory": limit_gpu_memory,
    "requires_world_size": requires_world_size,
    "no_gpu_leak": no_gpu_leak,
}


def signature_text(function: Callable[..., Any]) -> str:
    """``(n=1, *, memory=None)``: the signature as a user writes the marker (no annotations)."""
    signature = inspect.signature(function)
    plain = signature.replace(parameters=[p.replace(annotation=p.empty) for p in signature.parameters.values()],
                              return_annotation=signature.empty)
    return str(plain)


def help_lines() -> list[str]:
    """``name(signature): help`` for ``config.addinivalue_line("markers", ...)``."""
    lines = []
    for name, function in MARKERS.items():
        signature = signature_text(function)
        if signature == "()":
            signature = ""
        lines.append(f"{name}{signature}: {(function.__doc__ or '').strip().splitlines()[0]}")
    return lines


def _call_text(name: str, args: tuple, kwargs: dict) -> str:
    return f"@pytest.mark.{name}(" + ", ".join([repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]) + ")"


def parsed_marks(node: Any, name: str, config: Any = None) -> list[Any]:
    """The parsed arguments of each ``name`` marker on ``node`` (an item or a function definition), closest
    first. Each marker is parsed once per session: at collection, where the matrix checks every marker, and
    the checks at setup (gating, limits, footprints, world size, coverage) read the same value."""
    config = config if config is not None else node.config
    cache = config.stash.setdefault(_PARSED, {})
    values = []
    for mark in node.iter_markers(name):
        entry = cache.get(id(mark))
        if entry is None or entry[0] is not mark:
            entry = cache[id(mark)] = (mark, parse_mark(mark, node.nodeid))
        values.append(entry[1])
    return values


def closest_mark(node: Any, name: str) -> Any:
    """The parsed arguments of the closest ``name`` marker, or None when there is none."""
    mark = node.get_closest_marker(name)
    return parsed_marks(node, name)[0] if mark is not None else None


def parse_mark(mark: Any, where: str) -> Any:
    """The parsed arguments of ``mark`` (a ``pytest.Mark``), or one :class:`LLMLoadUsageError` line
    naming the test, the marker as written and the problem."""
    function = MARKERS[mark.name]
    call = _call_text(mark.name, mark.args, mark.kwargs)
    try:
        inspect.signature(function).bind(*mark.args, **mark.kwargs)
    except TypeError as exc:
        raise LLMLoadUsageError(f"{where}: {call}: {exc}; expected {mark.name}{signature_text(function)}") from None
    try:
        return function(*mark.args, **mark.kwargs)
    except LLMLoadUsageError as exc:
        raise LLMLoadUsageError(f"{where}: {call}: {exc}") from None
