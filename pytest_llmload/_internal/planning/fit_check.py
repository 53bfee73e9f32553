"""The fit check: will a cell's weights fit the memory free here? Computed before loading, from the config.

What a cell needs per device comes from the same sizes transformers plans with (meta model,
quantized sizes for int8/4-bit); strategies are planned with the free memory of this machine.
A GPU that this process has not used yet also needs room for its CUDA context.
"""

from __future__ import annotations

from typing import Any

from pytest_llmload._internal.planning.devices import device_label, plan_key
from pytest_llmload._internal.config.numbers import format_size
from pytest_llmload._internal.config.specs import LLMSpec

DEFAULT_MARGIN = 0.10  # share of free memory kept free for activations and the allocator
DEFAULT_CUDA_CONTEXT = 500 * 2**20  # a CUDA context takes hundreds of MB; measured when a GPU is present


def fit_problems(
    need: dict[int | str, int],
    free: dict[int | str, int],
    *,
    margin: float = DEFAULT_MARGIN,
    context_bytes: dict[int | str, int] | None = None,
) -> list[str]:
    """Why ``need`` (bytes per device) does not fit ``free`` (bytes per device), keeping ``margin`` spare.

    Pure arithmetic: a device needs its weights plus its CUDA context (``context_bytes``, for GPUs
    this process has not initialised yet), and may use ``(1 - margin)`` of what is free. ``disk``
    and ``meta`` are not checked.
    """
    problems = []
    for device, weights in need.items():
        if device in ("disk", "meta") or weights <= 0:
            continue
        total = weights + (context_bytes or {}).get(device, 0)
        available = free.get(device)
        if available is None:
            problems.append(f"needs ~{format_size(total)} on {device_label(device)}, which is not here")
            continue
        usable = int(available * (1 - margin))
        if total > usable:
            extra = f" (incl. ~{format_size(total - weights)} CUDA context)" if total != weights else ""
            where = f"needs ~{format_size(total)}{extra} on {device_label(device)}"
            problems.append(
                f"{where}; {format_size(usable)} usable ({format_size(available)} free, {margin:.0%} kept spare)"
                if margin else f"{where}; {format_size(available)} free"
            )
    return problems


def bytes_per_device(device_map: dict[str, Any], sizes: dict[str, int]) -> dict[int | str, int]:
    """Sum module sizes per device; a prefix entry counts everything under it."""
    need: dict[int | str, int] = {}
    for module, device in device_map.items():
        key = plan_key(device)
        need[key] = need.get(key, 0) + sizes.get(module, 0)
    return need


ALLOCATOR_ROUNDING = 512  # CUDA's caching allocator rounds every block up to a multiple of 512 bytes


def allocator_padding(network: Any, quantized: bool) -> dict[str, int]:
    """Bytes the allocator adds per module name (``""``: the whole model) when each tensor is rounded up to
    :data:`ALLOCATOR_ROUNDING`: measured on a virtual card, it made the fit check's need up to 1.7% lower than
    ``memory_allocated`` after the load (calibration). A quantized tensor (still a float tensor on the meta
    device) counts the most it can add."""
    padding: dict[str, int] = {}
    seen: set[int] = set()
    tensors = list(network.named_parameters(remove_duplicate=False)) + list(network.named_buffers(remove_duplicate=False))
    for name, tensor in tensors:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        extra = ALLOCATOR_ROUNDING - 1 if quantized else -(tensor.numel() * tensor.element_size()) % ALLOCATOR_ROUNDING
        parts = name.split(".")
        for depth in range(len(parts)):
            prefix = ".".join(parts[:depth])
            padding[prefix] = padding.get(prefix, 0) + extra
    return padding


def cell_need(spec: LLMSpec, free: dict[int | str, int]) -> dict[int | str, int]:
    """Bytes per device the cell's weights take once loaded (each tensor rounded up as the allocator does),
    planned from the config (no weights)."""
    from pytest_llmload._internal.config.specs import QUANTIZED_PRECISIONS, parse_device_map
    from pytest_llmload._internal.loading.placement import resolve_device_map
    from pytest_llmload._internal.planning.planner import meta_model, module_sizes, plan_device_map

    kind = spec.device_map_spec.kind
    network, quantizer = meta_model(spec.model_spec, spec.precision)
    padding = allocator_padding(network, spec.precision in QUANTIZED_PRECISIONS)
    if kind == "strategy":
        gpus = [free[d] for d in sorted(d for d in free if isinstance(d, int))]
        plan = plan_device_map(
            spec.model_spec, spec.device_map_spec.value, precision=spec.precision,
            max_memory=spec.max_memory_dict, gpus=gpus or None, cpu_memory=free.get("cpu"),
        )
        need = dict(plan.bytes_per_device)
        for device, extra in bytes_per_device(plan.device_map, padding).items():
            if device in need:
                need[device] += extra
        return need
    sizes = module_sizes(network, quantizer=quantizer)
    sizes = {name: size + padding.get(name, 0) for name, size in sizes.items()}
    # tp: each rank holds at most one whole copy on its own device, as under ``process`` (an upper bound)
    map_spec = parse_device_map("process") if kind == "tp" else spec.device_map_spec
    return bytes_per_device(resolve_device_map(map_spec), sizes)


_FLOAT_TYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_TYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def weights_upper_bound(spec: LLMSpec) -> int | None:
    """A cheap upper bound of a local cell's weights, from the safetensors headers (no model is built).

    Float tensors count at 4 bytes whatever the precision (modules in ``_keep_in_fp32_modules`` and the
    unquantized parts of int8/4-bit stay fp32), other tensors as stored, plus 5% and 1 MiB for buffers
    the checkpoint does not store (rotary tables). None for hub ids or checkpoints without safetensors,
    and for damaged files or anything that is no regular file (a FIFO is never opened): the load names them.
    """
    if spec.model_spec.kind not in ("builtin", "path"):
        return None
    from pathlib import Path

    from pytest_llmload._internal.loading.files import resolve_source
    from pytest_llmload._internal.loading.safety import safetensors_header

    files = sorted(Path(resolve_source(spec.model_spec)).glob("*.safetensors"))
    if not files:
        return None
    per_float = 4
    total = 0
    try:
        for file in files:
            for name, tensor in safetensors_header(file).items():
                if name == "__metadata__":
                    continue
                count = 1
                for dim in tensor["shape"]:
                    count *= dim
                total += count * (per_float if tensor["dtype"] in _FLOAT_TYPES else _TYPE_BYTES.get(tensor["dtype"], 8))
    except (OSError, ValueError):  # safety.DamagedFile is a ValueError; headers come back checked
        return None  # a damaged file: the load reports it, naming the file
    return int(total * 1.05) + 2**20


def free_memory(inventory, *, current: bool = False) -> dict[int | str, int]:
    """Free bytes per device: each visible GPU, and the host's available RAM as ``cpu``.

    With ``current``, GPUs this process already uses are read again from the driver (earlier
    loads of the session occupy memory that the inventory, probed at start, still counted as free), and
    every card of a virtual fleet (its inventory is probed per test; reading a card starts no context).
    """
    import psutil

    free: dict[int | str, int] = {gpu.index: gpu.free_memory for gpu in inventory.gpus}
    if current:
        import torch

        for index in [g.index for g in inventory.gpus] if inventory.source == "virtual" else used_gpus():
            if index in free:
                free[index] = int(torch.cuda.mem_get_info(index)[0])
    from pytest_llmload._internal.hardware import emulated_memory

    emulated = emulated_memory()
    if current and emulated is not None and inventory.source != "virtual":  # --llm-emulate-gpu: the small card
        import torch

        for index in used_gpus():
            if index in free:
                free[index] = max(min(free[index], emulated - int(torch.cuda.memory_reserved(index))), 0)
    free["cpu"] = int(psutil.virtual_memory().available)
    return free


def used_gpus() -> set[int]:
    """GPUs on which this process already holds a CUDA context (torch has reserved memory there)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return set()
    return {i for i in range(torch.cuda.device_count()) if torch.cuda.memory_reserved(i) > 0}


def measure_cuda_context(device: int = 0) -> int:
    """Bytes the driver reports in use on ``device`` beyond what torch reserved: the context's cost."""
    import torch

    torch.cuda.init()
    torch.zeros(1, device=device)
    free, total = torch.cuda.mem_get_info(device)
    return int(total - free - torch.cuda.memory_reserved(device))


class FitChecker:
    """The fit check of a session: its margin, the CUDA context size (measured once) and the plans it made."""

    def __init__(self, margin: float | None, cuda_context: int | None) -> None:
        self.margin = margin  # None: the check is off
        self.cuda_context = cuda_context  # None: measured on the first GPU when first needed
        self._needs: dict[Any, dict] = {}

    def reasons(self, spec: LLMSpec, cache, inventory) -> list[str]:
        """Why the cell's weights would not fit the memory free now (empty if they would).

        Before a skip is decided, every time: the models ``cache`` holds are released and the need is
        planned again against the memory free then (a strategy's plan depends on what is free, so a need
        planned while other models were loaded is not reused).
        """
        from pytest_llmload.errors import LLMLoadError

        if self.margin is None or cache.holds(spec):
            return []
        try:
            bound = weights_upper_bound(spec)
            if bound is not None and spec not in self._needs:
                # Cheap first: if the whole model fits on every device it could use, no plan is needed.
                free = free_memory(inventory, current=True)
                if not fit_problems({d: bound for d in free}, free, margin=self.margin,
                                    context_bytes=self.context_bytes(inventory)):
                    return []
            problems = fit_problems(*self._need_and_free(spec, inventory), margin=self.margin,
                                    context_bytes=self.context_bytes(inventory))
            if problems:  # before a skip: what this process holds but no longer uses goes back first
                if cache.cache_info().size:
                    cache.clear()  # releases the cached models, then collects and empties the CUDA cache
                else:  # a freed model in a reference cycle, an earlier test's cached blocks
                    from pytest_llmload._internal.loading.call import release_memory

                    release_memory()
                problems = fit_problems(*self._need_and_free(spec, inventory, fresh=True), margin=self.margin,
                                        context_bytes=self.context_bytes(inventory))
        except LLMLoadError:
            return []  # the load itself reports a broken config, with its own message
        return problems

    def _need_and_free(self, spec: LLMSpec, inventory, fresh: bool = False):
        free = free_memory(inventory, current=True)
        if fresh or spec not in self._needs:
            self._needs[spec] = cell_need(spec, free)
        return self._needs[spec], free

    def context_bytes(self, inventory) -> dict:
        """CUDA context size for each visible GPU this process has not used yet."""
        if not inventory.gpus:
            return {}
        if inventory.source == "virtual":
            return {g.index: 0 for g in inventory.gpus}  # a virtual card has no CUDA context
        if self.cuda_context is None:
            try:
                self.cuda_context = measure_cuda_context(0)
            except Exception:  # noqa: BLE001 - a driver that cannot tell: use the usual size
                self.cuda_context = DEFAULT_CUDA_CONTEXT
        used = used_gpus()
        return {g.index: 0 if g.index in used else self.cuda_context for g in inventory.gpus}
