"""Plan the device map ``from_pretrained`` would build, for a fleet of GPUs you may not have.

The plan runs transformers' own planning code on a model built on the meta device (no weights):
the quantizer's module replacement and size adjustments for int8/4-bit, ``get_balanced_memory``
(with ``low_zero`` for balanced_low_0, and the 10% reserve a lone GPU keeps when no budget is
given) and ``infer_auto_device_map``. Only the hardware is simulated: the free memory per GPU that
transformers would read from the driver comes from ``gpus=`` instead.
"""

from __future__ import annotations

import copy
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from pytest_llmload._internal.planning.devices import device_label, device_order
from pytest_llmload._internal.planning.reasons import ISSUE_4297
from pytest_llmload.errors import LLMLoadError, LLMLoadUsageError
from pytest_llmload._internal.config.numbers import MAX_CARDS, card_sizes, format_size, parse_cards, parse_size
from pytest_llmload._internal.config.specs import QUANTIZED_PRECISIONS, DEVICE_MAP_STRATEGIES, parse_max_memory, parse_precision

# Limits that keep a plan from running for minutes on an absurd input (a plan of a real model takes
# well under a second): GPUs in a fleet, layers per stack and experts per layer built on the meta device.
MAX_GPUS = MAX_CARDS
MAX_LAYERS = 1024
MAX_EXPERTS = 1024
MAX_EXPERT_MODULES = 65536  # layers x experts
_LAYER_KEYS = re.compile(r"^(num_(hidden_|encoder_|decoder_)?layers|n_layers?|(encoder|decoder)_layers)$")
_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


class PlanRefusedError(LLMLoadError, ValueError):
    """transformers itself refuses the planned load (e.g. int8 spilling to cpu/disk without fp32 offload)."""


class PlannerUnavailableError(LLMLoadError, RuntimeError):
    """The installed transformers moved the private planning functions the planner calls."""


def parse_fleet(gpus: Any) -> list[int]:
    """GPU sizes from ``"4x24GiB"``, ``"24GiB,24GiB,80GiB"`` (the one card-spec grammar; a capability after
    ``@`` is accepted and plays no part in a plan), or a list of sizes."""
    if gpus is None:
        return []
    if isinstance(gpus, (list, tuple)):
        _check_fleet_size(len(gpus), "invalid GPU fleet")
        return [parse_size(g) for g in gpus]
    if isinstance(gpus, int) and not isinstance(gpus, bool):
        raise LLMLoadUsageError(f"invalid GPU fleet {gpus!r}: give sizes, e.g. '{gpus}x24GiB'")
    return card_sizes(parse_cards(gpus, "GPU fleet", max_cards=MAX_GPUS))


def _check_fleet_size(count: int, what: str) -> None:
    if count > MAX_GPUS:
        raise LLMLoadUsageError(f"{what}: {count} GPUs; the planner plans at most {MAX_GPUS}")


@dataclass
class DevicePlan:
    """A planned device map and what it puts where."""

    device_map: dict[str, int | str]
    bytes_per_device: dict[int | str, int]
    strategy: str
    precision: str
    budgets: dict[int | str, int]
    model_bytes: int
    modules_per_device: dict[int | str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # why GPUs hold nothing, budgets above a card...

    @property
    def offloaded(self) -> dict[str, str]:
        """Modules that did not fit on the GPUs: ``{module: "cpu" | "disk"}``."""
        return {m: d for m, d in self.device_map.items() if d in ("cpu", "disk")}

    @property
    def devices(self) -> list[int | str]:
        return list(self.bytes_per_device)

    def to_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "precision": self.precision,
            "model_bytes": self.model_bytes,
            "device_map": self.device_map,
            "bytes_per_device": {str(k): v for k, v in self.bytes_per_device.items()},
            "budgets": {str(k): v for k, v in self.budgets.items()},
            "offloaded": self.offloaded,
            **({"notes": list(self.notes)} if self.notes else {}),
        }

    def table(self) -> str:
        """A per-device table for a terminal: bytes, share of the model, budget, modules."""
        rows = [("device", "bytes", "share", "budget", "modules")]
        for device, size in self.bytes_per_device.items():
            share = size / self.model_bytes if self.model_bytes else 0.0
            budget = self.budgets.get(device)
            modules = self.modules_per_device.get(device, [])
            rows.append((
                device_label(device), format_size(size), f"{share:.0%}",
                format_size(budget) if budget is not None else "-", _summarize_modules(modules),
            ))
        from pytest_llmload._internal.tables import format_table

        lines = [f"plan: {self.strategy}, {self.precision}, model {format_size(self.model_bytes)}",
                 format_table(rows[0], rows[1:])]
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def _summarize_modules(modules: list[str]) -> str:
    """``model.layers.0 .. model.layers.15`` ranges instead of sixteen names."""
    out: list[str] = []
    run: list[tuple[str, int]] = []

    def flush() -> None:
        if len(run) > 2:
            out.append(f"{run[0][0]}.{run[0][1]}-{run[-1][1]}")
        else:
            out.extend(f"{p}.{i}" for p, i in run)
        run.clear()

    for name in modules:
        prefix, _, last = name.rpartition(".")
        if last.isdigit() and run and run[-1][0] == prefix and run[-1][1] + 1 == int(last):
            run.append((prefix, int(last)))
            continue
        flush()
        if last.isdigit():
            run.append((prefix, int(last)))
        else:
            out.append(name or "(whole model)")
    flush()
    return ", ".join(out)


def _planning_functions(quantized: bool = False):
    """transformers' private planning functions (one line naming the one a release lacks)."""
    from pytest_llmload._internal.compat import MissingInternalError
    from pytest_llmload._internal.compat.transformers import planning_functions

    try:
        return planning_functions(quantized)
    except MissingInternalError as exc:
        raise PlannerUnavailableError(str(exc)) from None


def meta_model(model: Any, precision: str | None = "auto", *, device_map: Any = "auto",
               trust_remote_code: bool = False, model_class: Any = None):
    """``(model, hf_quantizer)``: the model ``from_pretrained`` would build, on the meta device, no weights.

    For int8/4-bit the quantizer has replaced the linear layers, as it does before loading.
    """
    import torch
    from transformers.utils import ContextManagers

    from pytest_llmload._internal.compat.transformers import (
        init_context,
        plan_dtype,
        plan_quantizer,
        quantize_on_meta,
    )
    from pytest_llmload._internal.loading.files import load_config, model_class_for
    from pytest_llmload._internal.loading.precision import quantization_config_for

    precision = parse_precision(precision or "auto")
    _, _, _get_dtype, get_hf_quantizer = _planning_functions(quantized=precision in QUANTIZED_PRECISIONS)
    config = copy.deepcopy(load_config(model, trust_remote_code=trust_remote_code))
    check_config_size(config)
    cls = model_class_for(config, model_class)
    hf_quantizer = None
    if get_hf_quantizer is not None or getattr(config, "quantization_config", None) is not None:
        if get_hf_quantizer is None:  # a pre-quantized checkpoint
            get_hf_quantizer = _planning_functions(quantized=True)[3]
        hf_quantizer, config = plan_quantizer(get_hf_quantizer, config, quantization_config_for(precision), device_map)
    if precision in ("fp32", "fp16", "bf16"):
        dtype: Any = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    elif precision == "auto" and getattr(config, "dtype", None) is not None:
        dtype = "auto"
    else:
        dtype = None
    config, dtype = plan_dtype(_get_dtype, dtype, config, hf_quantizer)

    contexts = init_context(cls, dtype, hf_quantizer is not None, config)
    with ContextManagers(contexts):
        network = cls(copy.deepcopy(config))
        if hf_quantizer is not None:
            quantize_on_meta(hf_quantizer, network, dtype, device_map)
    return network, hf_quantizer


def check_config_size(config: Any) -> None:
    """Refuse a config that would take minutes to build on the meta device (see :data:`MAX_LAYERS`)."""
    layers: list[tuple[str, int]] = []
    experts: list[tuple[str, int]] = []
    stack = [config.to_dict() if hasattr(config, "to_dict") else dict(config)]
    while stack:
        values = stack.pop()
        for key, value in values.items():
            if isinstance(value, dict):
                stack.append(value)
            elif isinstance(value, int) and not isinstance(value, bool):
                if _LAYER_KEYS.match(key):
                    layers.append((key, value))
                elif key in _EXPERT_KEYS:
                    experts.append((key, value))
    for found, limit, what in ((layers, MAX_LAYERS, "layers per stack"), (experts, MAX_EXPERTS, "experts per layer")):
        for key, value in found:
            if value > limit:
                raise LLMLoadUsageError(
                    f"config {key}={value} is more than the planner builds on the meta device ({limit} {what} "
                    "at most; real checkpoints have a few hundred at most)")
    most_layers = max((v for _, v in layers), default=1)
    most_experts = max((v for _, v in experts), default=1)
    if most_layers * most_experts > MAX_EXPERT_MODULES:
        raise LLMLoadUsageError(
            f"config has {most_layers} layers x {most_experts} experts: more than the planner builds on the meta "
            f"device ({MAX_EXPERT_MODULES} expert modules at most)")


class _PlannedGpuFilter:
    """Drops accelerate's "Device N is not available" warning: planned GPUs are absent by design."""

    def filter(self, record) -> bool:
        return "is not available, available devices are" not in record.getMessage()


@contextmanager
def simulated_hardware(free_memory: dict[int | str, int] | None) -> Iterator[None]:
    """Make transformers read ``free_memory`` where it would ask the driver and psutil (``max_memory=None``)."""
    import logging

    from pytest_llmload._internal.compat.transformers import free_memory_function

    hf_accelerate, name = free_memory_function()
    quiet = _PlannedGpuFilter()
    from pytest_llmload._internal.compat.accelerate import PLANNER_LOGGER

    logger = logging.getLogger(PLANNER_LOGGER)
    logger.addFilter(quiet)
    real = getattr(hf_accelerate, name)

    def fake(max_memory=None):
        return real(dict(free_memory) if max_memory is None else max_memory)

    if free_memory is not None:
        setattr(hf_accelerate, name, fake)
    try:
        yield
    finally:
        setattr(hf_accelerate, name, real)
        logger.removeFilter(quiet)


def balanced_low_0_problem(max_memory: Any) -> str | None:
    """Why ``balanced_low_0`` with these budgets hits huggingface/accelerate#4297, or None.

    transformers (and accelerate) read the budgets of balanced_low_0 by position: GPU ids that are not
    0, 1, 2, ... in a row raise ``KeyError`` inside from_pretrained.
    """
    budget = parse_max_memory(max_memory)
    if not budget:
        return None
    ids = sorted(d for d in budget if isinstance(d, int))
    positive = [d for d in ids if budget[d] > 0]
    count = len(positive)
    # What get_balanced_memory(low_zero=True) does: max_memory[i] for i in range(1, count), then max_memory[0].
    key_error = count > 1 and (0 not in budget or any(i not in budget for i in range(1, count)))
    misplaced = 0 in positive and set(range(1, count)) != set(positive) - {0}
    if key_error or misplaced:
        what = "raises KeyError" if key_error else "loads GPU 0 instead of keeping it light"
        return (
            f"balanced_low_0 with budgets for GPUs {', '.join(map(str, ids))} {what} inside transformers/accelerate "
            f"({ISSUE_4297}: it reads the budgets by position, as if the GPUs with a budget were 0, 1, 2, ...); "
            "number the GPUs in a row (CUDA_VISIBLE_DEVICES=0,2,3 makes them 0, 1, 2) and give budgets for "
            "0, 1, 2, or use --strategy balanced"
        )
    return None


def plan_device_map(
    model: Any,
    strategy: str = "auto",
    *,
    max_memory: Any = None,
    gpus: Any = None,
    precision: str | None = None,
    cpu_memory: Any = None,
    trust_remote_code: bool = False,
) -> DevicePlan:
    """The map ``from_pretrained(model, device_map=strategy, ...)`` would build, computed from the config.

    ``gpus`` simulates a fleet (``"4x24GiB"``: the free memory transformers would find on each GPU),
    ``cpu_memory`` the host RAM it would find (default: this machine's available RAM). ``max_memory``
    is the budget you would pass to ``from_pretrained``; with it, ``gpus`` only says which GPUs exist.
    """
    from pytest_llmload._internal.planning.reasons import (
        Recorder,
        fleet_and_budget_notes,
        recording,
        unused_gpu_notes,
    )

    if strategy not in DEVICE_MAP_STRATEGIES:
        raise LLMLoadUsageError(f"invalid strategy {strategy!r}: expected one of {', '.join(DEVICE_MAP_STRATEGIES)}")
    _get_device_map, compute_module_sizes, _, _ = _planning_functions()
    precision = parse_precision(precision or "auto")
    fleet = parse_fleet(gpus)
    budget = parse_max_memory(max_memory)
    notes: list[str] = []
    if budget:
        too_high = [d for d in budget if isinstance(d, int) and d >= MAX_GPUS]
        if too_high:
            raise LLMLoadUsageError(f"invalid max memory: GPU index {too_high[0]}; the planner plans at most "
                                    f"{MAX_GPUS} GPUs (0-{MAX_GPUS - 1})")
        if fleet:
            notes += fleet_and_budget_notes(fleet, budget)
    hardware = None
    if fleet or cpu_memory is not None:
        hardware = {i: size for i, size in enumerate(fleet)}
        hardware["cpu"] = parse_size(cpu_memory) if cpu_memory is not None else _available_ram()
    network, hf_quantizer = meta_model(model, precision, device_map=strategy, trust_remote_code=trust_remote_code)
    recorder = Recorder()
    with simulated_hardware(hardware), recording(recorder):
        try:
            device_map = _get_device_map(network, strategy, copy.deepcopy(budget), hf_quantizer)
        except ValueError as exc:  # what from_pretrained itself would raise on that fleet
            first = str(exc).strip().splitlines()[0]
            raise PlanRefusedError(f"from_pretrained would refuse this plan ({strategy}, {precision}): {first}") from None
    sizes, _ = compute_module_sizes(network, hf_quantizer)
    per_device: dict[int | str, int] = {}
    modules: dict[int | str, list[str]] = {}
    for name, device in device_map.items():
        per_device[device] = per_device.get(device, 0) + sizes.get(name, 0)
        modules.setdefault(device, []).append(name)
    budgets = budget if budget is not None else (hardware or {})
    gpus_known = sorted({d for d in budgets if isinstance(d, int)} | set(range(len(fleet))))
    unused = [g for g in gpus_known if g not in per_device]
    if unused:
        notes += unused_gpu_notes(unused, strategy, network, sizes, recorder, budgets, fleet, budget, per_device)
    return DevicePlan(
        device_map=dict(device_map),
        bytes_per_device=dict(sorted(per_device.items(), key=lambda kv: device_order(kv[0]))),
        strategy=strategy,
        precision=precision,
        budgets=dict(budgets),
        model_bytes=sizes.get("", 0),
        modules_per_device=modules,
        notes=notes,
    )


def _available_ram() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def module_sizes(model: Any, precision: str | None = "auto", *, quantizer: Any = None) -> dict[str, int]:
    """Bytes per module name (``""`` is the whole model) as transformers counts them for planning.

    For a meta model from :func:`meta_model`, pass its ``quantizer`` so int8/4-bit weights count at
    their quantized size (before loading they are still float tensors).
    """
    _, compute_module_sizes, _, _ = _planning_functions()
    if hasattr(model, "named_parameters"):
        network, quantizer = model, quantizer or getattr(model, "hf_quantizer", None)
    else:
        network, quantizer = meta_model(model, precision)
    sizes, _ = compute_module_sizes(network, quantizer)
    return dict(sizes)


__all__ = ["DevicePlan", "MAX_EXPERTS", "MAX_GPUS", "MAX_LAYERS", "PlannerUnavailableError", "balanced_low_0_problem",
           "check_config_size", "meta_model", "module_sizes", "parse_fleet",
           "plan_device_map", "QUANTIZED_PRECISIONS"]
