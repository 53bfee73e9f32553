"""Where a load puts its modules: the device map ``from_pretrained`` gets, the devices it names, whether it
may spill to disk, and why a bitsandbytes precision cannot honour it."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

from pytest_llmload._internal.config.specs import QUANTIZED_PRECISIONS, DeviceMapSpec
from pytest_llmload._internal.config.numbers import is_whole_number

ACCELERATOR_FREE = {"cpu", "disk", "meta"}


def local_process_index() -> int:
    """The process's index on its node under ``accelerate launch`` or ``torchrun`` (0 otherwise)."""
    for var in ("LOCAL_RANK", "ACCELERATE_LOCAL_PROCESS_INDEX", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK"):
        if is_whole_number(os.environ.get(var, "")):
            return int(os.environ[var])
    return 0


def resolve_device_map(spec: DeviceMapSpec) -> Any:
    """The value ``from_pretrained`` gets: ``process`` becomes this process's own device."""
    if spec.kind == "process":
        import torch

        if torch.cuda.is_available():
            return {"": local_process_index() % torch.cuda.device_count()}
        return {"": "cpu"}
    return spec.as_user_value()


def map_devices(device_map: Any) -> set:
    return set(device_map.values()) if isinstance(device_map, dict) else set()


@dataclass(frozen=True)
class Placement:
    """Where a cell's load puts its modules, worked out once per (precision, map, budget) in the process:
    the gate, the load call, the cache and the runners all read this one value."""

    device_map: Any  # what the user asked for (``process`` is resolved per process, at the load)
    devices: frozenset
    needs_offload: bool
    fp32_offload: bool  # a bitsandbytes load keeps its cpu/disk modules in fp32
    bitsandbytes_problem: str | None  # a bitsandbytes precision on a map of only cpu and disk

    def quantized_problem(self, precision: str) -> str | None:
        """Why a bitsandbytes ``precision`` cannot honour this map here, or None (the virtual-fleet part is
        asked now: a fleet may start and stop between two tests)."""
        if self.bitsandbytes_problem:
            return self.bitsandbytes_problem
        if precision in QUANTIZED_PRECISIONS and _on_virtual_gpus(self.device_map, set(self.devices)):
            return (
                f"{precision} does not run on virtual GPUs (bitsandbytes' parameter classes cannot hold a virtual "
                "card's tensor); use device_map 'cpu' for bitsandbytes' CPU backend, or a real GPU"
            )
        return None


@functools.lru_cache(maxsize=1024)
def placement(precision: str, map_spec: DeviceMapSpec | None, max_memory: tuple | None) -> Placement:
    """The :class:`Placement` of a load (cached: a cell's is computed once)."""
    device_map = map_spec.as_user_value() if map_spec is not None and map_spec.kind != "tp" else (
        "tp" if map_spec is not None else None)
    devices = frozenset(map_devices(device_map))
    problem = None
    if precision in QUANTIZED_PRECISIONS and "disk" in devices and not (devices - ACCELERATOR_FREE):
        problem = (
            f"{precision} on a map of only cpu and disk would keep every module in fp32 "
            "(bitsandbytes' llm_int8_enable_fp32_cpu_offload), so nothing would be quantized; "
            "use device_map 'cpu' for quantized loads without a GPU"
        )
    # a process map is one device of this process (resolved at the load): nothing spills
    spills = needs_offload_folder(device_map, max_memory) and not (map_spec is not None and map_spec.kind == "process")
    return Placement(device_map, devices, spills,
                     bool(devices & {"cpu", "disk"} and devices - ACCELERATOR_FREE), problem)


def cell_placement(spec: Any) -> Placement:
    """The placement of a matrix cell (an ``LLMSpec``)."""
    return placement(spec.precision, spec.device_map_spec, spec.max_memory)


def virtual_gpus_running() -> bool:
    from pytest_llmload._internal.hardware import virtual_gpus_now

    return virtual_gpus_now()


def _on_virtual_gpus(device_map: Any, devices: set) -> bool:
    """Would this map put modules on the cards of a running virtual GPU fleet?"""
    if not virtual_gpus_running():
        return False
    if isinstance(device_map, dict):
        return bool(devices - ACCELERATOR_FREE)
    return device_map not in ACCELERATOR_FREE


def needs_offload_folder(device_map: Any, max_memory: Any = None) -> bool:
    """Whether a load may put weights on disk: a strategy or a budget can spill, a map can name disk."""
    if device_map is None:
        return False
    return (isinstance(device_map, str) and device_map != "tp") or "disk" in map_devices(device_map) or bool(max_memory)


def effective_device_map(model) -> dict[str, Any]:
    """``model.hf_device_map`` where transformers set one, else ``{"": device}`` of its parameters.

    transformers 5 sets no ``hf_device_map`` for a single-device load.
    """
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        return dict(device_map)
    import itertools

    device = next((t.device for t in itertools.chain(model.parameters(), model.buffers())), None)
    if device is None:
        return {"": "cpu"}
    if device.type == "cuda":
        return {"": device.index if device.index is not None else 0}
    return {"": device.type if device.index is None else f"{device.type}:{device.index}"}
