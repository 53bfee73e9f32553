"""``validate_device_map``: every problem a custom device map has, as sentences a person can act on."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from pytest_llmload._internal.planning.devices import name_hint, normalize_device, resolve


def as_model(model: Any):
    """A module to check against: the model itself, or a meta-device model built from an id/config."""
    if hasattr(model, "named_parameters"):
        return model
    from pytest_llmload._internal.planning.planner import meta_model

    network, _ = meta_model(model, "fp32")
    network.tie_weights()
    return network


def _available_devices(gpus: int | None) -> set[str] | None:
    if gpus is None:
        import sys

        torch = sys.modules.get("torch")
        if torch is None:
            import torch
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        mps = hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    else:
        mps = False
    devices = {"cpu", "disk", "meta"} | {f"cuda:{i}" for i in range(gpus)}
    return devices | ({"mps"} if mps else set())


def _group(names: list[str], limit: int = 4) -> str:
    """``model.layers.3 (9 tensors), lm_head.weight`` -- tensors grouped by their module."""
    by_module: dict[str, int] = defaultdict(int)
    for name in names:
        by_module[name.rsplit(".", 1)[0] if "." in name else name] += 1
    parts = [f"{m} ({n} tensors)" if n > 1 else m for m, n in by_module.items()]
    more = f" and {len(parts) - limit} more" if len(parts) > limit else ""
    return ", ".join(parts[:limit]) + more


def validate_device_map(model: Any, device_map: dict[str, Any], *, gpus: int | None = None) -> list[str]:
    """Problems of ``device_map`` for ``model`` (empty when the map is sound).

    Finds parameters or buffers no entry covers; entries that name no module; nested entries that
    send one module to two devices; a ``_no_split_modules`` block spread over two devices; tied
    weights on different devices; devices that do not exist here (or among ``gpus`` GPUs, when
    planning for a fleet). ``model`` may be a loaded model, a meta-device model, or anything
    :func:`load_config` accepts (an id, a path, ``builtin:NAME``, a config).
    """
    from pytest_llmload.errors import LLMLoadUsageError

    if not isinstance(device_map, dict):
        raise LLMLoadUsageError(
            f"validate_device_map needs a dict of module name -> device, got {type(device_map).__name__} "
            f"{device_map!r} (strategies such as 'auto' are computed by from_pretrained, not validated)"
        )
    if gpus is not None and (isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 0):
        raise LLMLoadUsageError(f"validate_device_map: gpus={gpus!r} is not a GPU count; expected None or an int >= 0")
    for entry in device_map:
        if not isinstance(entry, str):
            raise LLMLoadUsageError(
                f"validate_device_map: map key {entry!r} ({type(entry).__name__}) is not a module name; keys are "
                f"strings such as 'model.layers.0' ('' for the whole model)")
    network = as_model(model)
    problems: list[str] = []
    modules = dict(network.named_modules())
    # remove_duplicate=False: a tied weight is one tensor under two names, and each name needs a device
    tensors = [n for n, _ in network.named_parameters(remove_duplicate=False)] + [
        n for n, _ in network.named_buffers(remove_duplicate=False)]
    tensor_set = set(tensors)

    # Entries that name nothing, and devices that are not there.
    available = _available_devices(gpus)
    devices: dict[str, str] = {}
    for entry, device in device_map.items():
        if entry and entry not in modules and entry not in tensor_set:
            known = set(modules) | tensor_set
            problems.append(f"entry {entry!r} names no module or parameter of {type(network).__name__}"
                            f"{name_hint(entry, known)}")
        try:
            devices[entry] = normalize_device(device)
        except ValueError as exc:
            problems.append(f"entry {entry!r}: {exc}")
            continue
        if available is not None and devices[entry] not in available:
            where = f"{gpus} GPU(s) planned" if gpus is not None else "here"
            problems.append(f"entry {entry!r} puts it on {devices[entry]}, which does not exist {where}")

    # Nested entries that disagree: the outer entry says one device, the inner another.
    for outer in device_map:
        clashes = [
            f"{inner!r} ({devices[inner]})" for inner in device_map
            if inner != outer and (outer == "" or inner.startswith(outer + "."))
            and outer in devices and inner in devices and devices[outer] != devices[inner]
        ]
        if clashes:
            shown = ", ".join(clashes[:4]) + (f" and {len(clashes) - 4} more" if len(clashes) > 4 else "")
            problems.append(
                f"entry {outer or '(whole model)'!r} ({devices[outer]}) overlaps entries inside it on other "
                f"devices: {shown}; which device wins is ambiguous"
            )

    # Coverage.
    placed: dict[str, str | None] = {}
    uncovered = []
    for name in tensors:
        entry, _ = resolve(device_map, name)
        if entry is None:
            uncovered.append(name)
            placed[name] = None
        else:
            placed[name] = devices.get(entry)
    if uncovered:
        problems.append(
            f"{len(uncovered)} parameter(s)/buffer(s) are on no device (no entry covers them): {_group(uncovered)}"
        )

    # Blocks that must not be split.
    no_split = set(getattr(network, "_no_split_modules", None) or [])
    if no_split:
        for name, module in modules.items():
            if type(module).__name__ not in no_split:
                continue
            inside = {placed[t] for t in tensor_set if (t.startswith(name + ".") or not name) and placed.get(t)}
            if len(inside) > 1:
                problems.append(
                    f"{name} ({type(module).__name__}) is split over {' and '.join(sorted(inside))}; "
                    f"transformers never splits a _no_split_modules block: put all of {name} on one device"
                )

    # Tied weights: one tensor under several names must live on one device.
    by_tensor: dict[int, list[str]] = defaultdict(list)
    for name, param in network.named_parameters(remove_duplicate=False):
        by_tensor[id(param)].append(name)
    for names in by_tensor.values():
        if len(names) < 2:
            continue
        where = {placed.get(n) or _placed(device_map, devices, n) for n in names}
        where.discard(None)
        if len(where) > 1:
            listed = ", ".join(f"{n} ({placed.get(n) or _placed(device_map, devices, n)})" for n in names)
            problems.append(f"tied weights are on different devices: {listed}; put them on one device")
    return problems


def _placed(device_map: dict, devices: dict, name: str) -> str | None:
    entry, _ = resolve(device_map, name)
    return devices.get(entry) if entry is not None else None
