"""Device names compared by meaning: ``0``, ``"cuda:0"`` and ``torch.device("cuda", 0)`` are one device."""

from __future__ import annotations

import re
from typing import Any

from pytest_llmload._internal.compat.accelerate import hook_execution_device


def normalize_device(device: Any) -> str:
    """A canonical name: ``"cuda:0"``, ``"cpu"``, ``"disk"``, ``"meta"``, ``"mps"``, ``"xpu:1"``..."""
    if hasattr(device, "type") and hasattr(device, "index"):  # torch.device, without importing torch
        return f"{device.type}:{device.index if device.index is not None else 0}" if device.type in (
            "cuda", "xpu", "npu", "hpu", "mlu") else device.type
    if isinstance(device, bool):
        raise ValueError(f"invalid device {device!r}")
    if isinstance(device, int):
        return f"cuda:{device}"
    if isinstance(device, str):
        text = device.strip().lower()
        if text.isascii() and text.isdigit():
            return f"cuda:{int(text)}"
        if text in ("cuda", "xpu", "npu", "hpu", "mlu"):
            return f"{text}:0"
        return text
    raise ValueError(f"invalid device {device!r}: expected an index, a name such as 'cuda:0' or 'cpu', or a torch.device")


def device_label(device: int | str) -> str:
    """How a planned device reads in messages and tables: ``0`` -> ``cuda:0``, ``"cpu"`` -> ``cpu``."""
    return f"cuda:{device}" if isinstance(device, int) else str(device)


def plan_key(device: Any) -> int | str:
    """The key transformers' plans use: GPU index as an int, else the name (``"cuda:1"`` -> ``1``)."""
    name = normalize_device(device)
    return int(name.split(":")[1]) if name.startswith("cuda:") else name


def resolve(device_map: dict[str, Any], name: str) -> tuple[str | None, Any]:
    """The entry of ``device_map`` that places ``name`` (the longest prefix on a dot boundary), and its device."""
    if name in device_map:
        return name, device_map[name]
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in device_map:
            return prefix, device_map[prefix]
    if "" in device_map:
        return "", device_map[""]
    return None, None


def execution_order_hops(devices_in_order: list[Any]) -> int:
    """How many times a forward pass moves from one device to the next (disk counts as cpu)."""
    hops, previous = 0, None
    for device in devices_in_order:
        name = normalize_device(device)
        name = "cpu" if name == "disk" else name
        if previous is not None and name != previous:
            hops += 1
        previous = name
    return hops


def input_device(model: Any):
    """The ``torch.device`` inputs go to for ``model``, under any device map, offload included.

    For a model dispatched by accelerate (a map over several devices, or with cpu/disk offload) that is
    the execution device of the first module that runs: the outermost module whose accelerate hook
    names one (``dispatch_model`` gives the root a hook on its main device, which moves the inputs
    there). ``model.device`` is not it: under disk offload the first parameters are on ``meta``.
    Without hooks, it is the device of the first parameter or buffer that holds data (``meta`` only
    for a model with no data at all).
    """
    import itertools

    import torch

    if not hasattr(model, "named_modules"):
        raise TypeError(f"input_device needs a torch module (a loaded model), got {type(model).__name__}")
    for _, module in model.named_modules():
        device = hook_execution_device(module)
        if device is not None:
            return device if isinstance(device, torch.device) else torch.device(device)
    tensors = list(itertools.chain(model.parameters(), model.buffers()))
    for tensor in tensors:
        if tensor.device.type != "meta":
            return tensor.device
    return tensors[0].device if tensors else torch.device("cpu")


def execution_order(model, device_map: dict[str, Any]) -> list[str]:
    """The entries of ``device_map`` in the order the model's modules are defined (their usual run order)."""
    position = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(device_map, key=lambda entry: position.get(entry, len(position)))


def device_hops(model) -> int:
    """How many times a forward pass crosses from one device to the next, in the map's execution order.

    With naive model parallelism only one device works at a time and each hop is a transfer, so a map
    that zig-zags (layer 0 on GPU 0, layer 1 on GPU 1, layer 2 on GPU 0) is slower than it needs to be.
    """
    from pytest_llmload._internal.loading.placement import effective_device_map

    device_map = effective_device_map(model)
    return execution_order_hops([device_map[e] for e in execution_order(model, device_map)])


def device_order(device: int | str) -> tuple[int, int]:
    """Sort key of planned devices: GPUs by index, then mps, cpu, disk."""
    return (0, device) if isinstance(device, int) else (1, ["mps", "cpu", "disk"].index(device) if device in (
        "mps", "cpu", "disk") else 9)


def name_hint(name: str, known: set[str]) -> str:
    """A hint after "names no module": the blocks a numbered container has, or a near miss."""
    import difflib

    parent, _, last = name.rpartition(".")
    if re.fullmatch(r"[0-9]+", last) and parent in known:
        numbers = sorted(int(k[len(parent) + 1:]) for k in known
                         if k.startswith(parent + ".") and re.fullmatch(r"[0-9]+", k[len(parent) + 1:]))
        if numbers:
            return f" ({parent} has {len(numbers)}: {numbers[0]}..{numbers[-1]})"
    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
