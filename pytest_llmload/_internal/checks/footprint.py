"""What a model weighs: ``assert_memory_footprint``, ``expected_footprint``, ``module_footprints``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pytest_llmload._internal.config.numbers import format_size, parse_size
from pytest_llmload._internal.tables import format_table
from pytest_llmload._internal.checks.common import fail


_SIZE_WORDS = {"max": "limit", "min": "floor"}


def module_footprints(model, *, depth: int | None = None) -> dict[str, int]:
    """Bytes of parameters and buffers per module, counted as ``get_memory_footprint()`` counts them."""
    sizes: dict[str, int] = {}
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        module = name.rsplit(".", 1)[0] if "." in name else ""
        if depth is not None:
            module = ".".join(module.split(".")[:depth])
        sizes[module] = sizes.get(module, 0) + tensor.nelement() * tensor.element_size()
    return sizes


def _biggest(model, count: int = 5) -> str:
    sizes = module_footprints(model)
    top = sorted(sizes.items(), key=lambda kv: -kv[1])[:count]
    return format_table(("biggest modules", "bytes"), [(m or "(root)", format_size(s)) for m, s in top], indent="  ")


def footprint_message(model, limit: int, footprint: int | None = None) -> str:
    footprint = model.get_memory_footprint() if footprint is None else footprint
    return (f"{type(model).__name__} has a memory footprint of {format_size(footprint)} ({footprint} bytes), "
            f"over the limit of {format_size(limit)} ({limit} bytes)")


def assert_memory_footprint(model, *, max: Any = None, min: Any = None) -> None:  # noqa: A002
    """Assert ``min <= model.get_memory_footprint() <= max``; sizes as bytes or strings (``"2 GiB"``)."""
    if max is None and min is None:
        raise TypeError("assert_memory_footprint needs max=, min= or both")
    footprint = model.get_memory_footprint()
    upper = parse_size(_total(max)) if max is not None else None
    lower = parse_size(_total(min)) if min is not None else None
    if upper is not None and footprint > upper:
        fail(footprint_message(model, upper, footprint), _biggest(model))
    if lower is not None and footprint < lower:
        fail(f"{type(model).__name__} has a memory footprint of {format_size(footprint)} ({footprint} bytes), "
              f"under the floor of {format_size(lower)} ({lower} bytes): is it missing weights, or quantized "
              f"when it should not be?", _biggest(model))


def _total(value: Any) -> Any:
    return value.total if isinstance(value, Footprint) else value


@dataclass(frozen=True)
class Footprint:
    """What a model costs in a precision, from its config: transformers' own size accounting.

    ``quantized`` is the bytes of the linear layers bitsandbytes converts in int8/4-bit (the same
    layers in every precision, so ratios compare like with like); ``other`` is everything else.
    """

    precision: str
    total: int
    quantized: int
    other: int
    modules: dict[str, int] = field(default_factory=dict, repr=False)


def _quantized_module_names(model: Any) -> set[str]:
    from pytest_llmload._internal.compat.bitsandbytes import import_bitsandbytes
    bnb = import_bitsandbytes()

    from pytest_llmload._internal.planning.planner import meta_model

    network, _ = meta_model(model, "int8")
    return {n for n, m in network.named_modules() if isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))}


def expected_footprint(model: Any, precision: str) -> Footprint:
    """What ``get_memory_footprint()`` will report for ``model`` loaded in ``precision`` (from the config).

    Computed from the model's own modules and dtypes on the meta device, with the quantizer's sizes
    for int8/4-bit, so an assertion needs no magic number::

        int8, fp16 = expected_footprint(m, "int8"), expected_footprint(m, "fp16")
        assert int8.quantized <= 0.6 * fp16.quantized
        assert_memory_footprint(model, max=int8)
    """
    from pytest_llmload._internal.planning.planner import module_sizes
    from pytest_llmload._internal.config.specs import parse_precision

    precision = parse_precision(precision)
    source = getattr(model, "config", model)
    sizes = module_sizes(source, precision)
    quantizable = _quantized_module_names(source)
    quantized = sum(sizes.get(name, 0) for name in quantizable)
    return Footprint(precision, sizes[""], quantized, sizes[""] - quantized, sizes)
