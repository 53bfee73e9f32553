"""Why a test or a matrix cell cannot run on an :class:`~.inventory.Inventory`: pure functions."""

from __future__ import annotations

from pytest_llmload._internal.config.numbers import format_size, parse_size
from pytest_llmload._internal.config.specs import QUANTIZED_PRECISIONS, LLMSpec
from pytest_llmload._internal.hardware.inventory import Inventory


# -- reasons: pure functions of an inventory ------------------------------------------------------


def _gpu_list(gpus) -> str:
    if not gpus:
        return "found none"
    return f"found {len(gpus)} (" + ", ".join(format_size(g.total_memory) for g in gpus) + ")"


def gpu_reasons(inventory: Inventory, n: int = 1, memory: int | str | None = None) -> list[str]:
    """Why ``n`` GPUs with ``memory`` each are not available here (empty when they are)."""
    need = parse_size(memory) if memory is not None else None
    what = f"{n} GPU{'s' if n != 1 else ''}" + (f" with >= {format_size(need)} each" if need else "")
    usable = [g for g in inventory.gpus if need is None or g.total_memory >= need]
    if len(usable) < n:
        return [f"needs {what}; {_gpu_list(inventory.gpus)}"]
    return []


def bitsandbytes_reasons(inventory: Inventory) -> list[str]:
    if inventory.bitsandbytes_works:
        return []
    if inventory.bitsandbytes_version is None:
        return ["needs bitsandbytes; it is not installed"]
    return [f"needs a working bitsandbytes backend; bitsandbytes {inventory.bitsandbytes_version} "
            f"failed here: {inventory.bitsandbytes_error}"]


def map_gpu_indices(device_map) -> set[int]:
    """The GPU indices a device map names (``0``, ``"cuda:1"``, bare ``"cuda"`` = 0)."""
    if not isinstance(device_map, dict):
        return set()
    indices = set()
    for device in device_map.values():
        if isinstance(device, int):
            indices.add(device)
        elif isinstance(device, str) and device.startswith("cuda"):
            indices.add(int(device.split(":")[1]) if ":" in device else 0)
    return indices


def cell_reasons(spec: LLMSpec, inventory: Inventory) -> list[str]:
    """Why a matrix cell cannot run on this hardware (empty when it can).

    Strategies (auto, balanced, ...) and ``process`` are legitimate CPU loads without GPUs.
    """
    reasons = []
    indices = map_gpu_indices(spec.device_map)
    budgeted = sorted(d for d in (spec.max_memory_dict or {}) if isinstance(d, int))
    if budgeted and budgeted[-1] >= inventory.count:
        devices = ", ".join(f"cuda:{i}" for i in budgeted)
        reasons.append(f"max memory names {devices}; {_gpu_list(inventory.gpus)}")
    if indices:
        highest = max(indices)
        if highest >= inventory.count:
            devices = ", ".join(f"cuda:{i}" for i in sorted(indices))
            reasons.append(f"device map {spec.device_map_spec.label} needs {devices}; {_gpu_list(inventory.gpus)}")
    on_gpus = indices or (inventory.gpus and spec.device_map_spec.kind in ("strategy", "process", "tp"))
    if spec.precision == "bf16" and on_gpus:
        used = [g for g in inventory.gpus if not indices or g.index in indices]
        lacking = [g for g in used if not g.supports_bf16]
        if lacking:
            cap = ".".join(map(str, lacking[0].capability or ()))
            reasons.append(f"bf16 needs compute capability >= 8.0; {lacking[0].name} has {cap}")
    if spec.precision in QUANTIZED_PRECISIONS:
        reasons.extend(bitsandbytes_reasons(inventory))
    return reasons
