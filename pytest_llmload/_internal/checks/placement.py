"""Where a model is placed: ``assert_device_map``."""

from __future__ import annotations

from typing import Any, Iterable

from pytest_llmload._internal.planning.devices import device_hops, execution_order, name_hint, normalize_device, resolve
from pytest_llmload._internal.tables import format_table
from pytest_llmload._internal.checks.common import fail


def assert_device_map(model, expected: Any = None, *, devices: Iterable[Any] | Any = None,
                      exact: bool = False, max_hops: int | None = None) -> None:
    """Assert where ``model`` is placed.

    ``expected`` maps modules or prefixes to devices (``{"model.layers.0": 0, "lm_head": "cpu"}``), or
    is a set of devices that must be used; ``devices=`` gives that set beside a dict. A single device
    (``"cpu"``, ``0``, ``torch.device("cuda", 0)``) is the set of that one device. Devices compare by
    meaning (``0 == "cuda:0" == torch.device("cuda", 0)``). A module in ``expected`` that the model does
    not have fails the assertion. With ``exact``, every parameter must be where the expected map puts it
    and no other device may be used. ``max_hops`` bounds :func:`device_hops`.
    """
    from pytest_llmload.errors import LLMLoadUsageError

    if _is_device(expected):
        expected = {expected}
    if isinstance(expected, (set, frozenset, list, tuple)):
        if devices is not None:
            raise LLMLoadUsageError("assert_device_map: give the set of devices once, as expected= or as devices=")
        devices, expected = expected, None
    if expected is not None and not isinstance(expected, dict):
        raise LLMLoadUsageError(
            f"assert_device_map: expected={expected!r} ({type(expected).__name__}) is not accepted; expected a dict "
            "of module -> device, a set of devices, or one device")
    if devices is not None:
        devices = [devices] if _is_device(devices) else devices
        if not isinstance(devices, (set, frozenset, list, tuple)):
            raise LLMLoadUsageError(
                f"assert_device_map: devices={devices!r} ({type(devices).__name__}) is not accepted; expected a "
                "device ('cpu', 0, 'cuda:1', a torch.device) or a set of them")
        wanted = sorted({_device_name(d, "devices") for d in devices})
    expected_names = {entry: _device_name(device, f"expected[{entry!r}]") for entry, device in (expected or {}).items()}
    for entry in expected_names:
        if not isinstance(entry, str):
            raise LLMLoadUsageError(f"assert_device_map: expected key {entry!r} is not a module name (a string)")

    from pytest_llmload._internal.loading.placement import effective_device_map

    actual = effective_device_map(model)
    mismatches: list[tuple[str, str, str]] = []
    problems = []
    if expected:
        tensors = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
        known = {n for n, _ in model.named_modules()} | set(tensors) | {  # tied weights under every name
            n for n, _ in model.named_parameters(remove_duplicate=False)}
        missing_modules = [entry for entry in expected if entry not in known]
        for entry in missing_modules:
            problems.append(f"  {entry!r} names no module of {type(model).__name__}{name_hint(entry, known)}")
        present = {entry: device for entry, device in expected.items() if entry in known}
        checks = tensors if exact else list(present)
        for name in checks:
            entry, _ = resolve(present, name)
            if entry is None:
                if exact:
                    mismatches.append((name, "(not in expected)", _where(actual, name, tensors)))
                continue
            want_name = expected_names[entry]
            got = _where(actual, name, tensors)
            if got != want_name:
                mismatches.append((entry if not exact else name, want_name, got))
        if exact:
            mismatches = _collapse(mismatches)
    used = sorted({normalize_device(d) for d in actual.values()})
    if mismatches:
        problems.insert(0, format_table(("module", "expected", "actual"), mismatches, indent="  "))
    if devices is not None:
        missing = [d for d in wanted if d not in used]
        extra = [d for d in used if d not in wanted] if exact else []
        if missing or extra:
            problems.append(
                f"  devices used: {', '.join(used)}; expected {'exactly ' if exact else ''}{', '.join(wanted)}"
                + (f" (unused: {', '.join(missing)})" if missing else "")
                + (f" (unexpected: {', '.join(extra)})" if extra else "")
            )
    if max_hops is not None:
        hops = device_hops(model)
        if hops > max_hops:
            order = execution_order(model, actual)
            path = " -> ".join(f"{e or '(model)'}@{normalize_device(actual[e])}" for e in order)
            problems.append(f"  {hops} device hops in execution order, at most {max_hops} allowed: {path}")
    if problems:
        fail(f"device map of {type(model).__name__} is not as expected", *problems)


def _is_device(value: Any) -> bool:
    """One device (``"cpu"``, ``0``, a ``torch.device``) rather than a collection of them."""
    return (isinstance(value, (str, int)) and not isinstance(value, bool)) or (
        hasattr(value, "type") and hasattr(value, "index"))


def _device_name(device: Any, where: str) -> str:
    from pytest_llmload.errors import LLMLoadUsageError

    from pytest_llmload._internal.config.specs import check_device

    try:
        return check_device(normalize_device(device))
    except ValueError:
        raise LLMLoadUsageError(
            f"assert_device_map: {where}: {device!r} is not a device; expected an index, a name such as "
            "'cuda:0' or 'cpu', or a torch.device") from None


def _where(device_map: dict[str, Any], name: str, tensors: list[str]) -> str:
    entry, device = resolve(device_map, name)
    if entry is not None:
        return normalize_device(device)
    below = {normalize_device(d) for k, d in device_map.items() if k.startswith(name + ".")}
    if not below and any(t.startswith(name + ".") or t == name for t in tensors):
        return "(not in map)"
    if not below:
        return "(no such module)"
    return " + ".join(sorted(below))


def _collapse(rows: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """Group parameter rows by module so a table shows ``model.layers.3`` once, not nine times."""
    grouped: dict[tuple[str, str, str], int] = {}
    for name, want, got in rows:
        key = (name.rsplit(".", 1)[0] if "." in name else name, want, got)
        grouped[key] = grouped.get(key, 0) + 1
    return [(m + (f" ({n} tensors)" if n > 1 else ""), w, g) for (m, w, g), n in grouped.items()]
