"""Hypothesis strategies for device maps and memory budgets.

``device_maps(model, devices=...)`` generates valid custom maps at every granularity (whole model,
top-level modules, single layers, inside a layer where ``_no_split_modules`` allows), keeping tied
weights together and covering every parameter and buffer exactly once; examples shrink towards
``{"": devices[0]}``. ``invalid_device_maps`` breaks one in one named way. ``max_memory_budgets``
draws the budgets users pass to ``from_pretrained``. The model's module tree is built once per model
on the meta device (no weights), so drawing is cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence

from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from pytest_llmload._internal.planning.devices import normalize_device
from pytest_llmload._internal.config.numbers import parse_size

BREAKAGES = ("gap", "unknown_module", "split_block", "tied_apart", "unknown_device")
_DEVICE_TEXT = ("cpu", "disk", "meta")


@dataclass
class _Node:
    name: str
    atomic: bool  # may not be split into its children (a _no_split_modules block, or owns tensors itself)
    children: list["_Node"] = field(default_factory=list)
    tensors: frozenset = frozenset()
    no_split: bool = False


@dataclass
class _Tree:
    root: _Node
    tied: list[frozenset]  # groups of tensor names that are one tensor
    no_split: list[_Node]
    nodes: dict[str, _Node]


def _model_key(model: Any) -> Any:
    if hasattr(model, "named_parameters"):
        return ("object", id(model))
    if hasattr(model, "to_json_string"):
        return ("config", model.to_json_string())
    return ("ref", str(model))


_TREES: dict[Any, _Tree] = {}


def module_tree(model: Any) -> _Tree:
    """The module tree of ``model`` (built once per model, on the meta device for ids and configs).

    A model that cannot be read (an unknown built-in, a missing path) is hypothesis' ``InvalidArgument``.
    """
    from pytest_llmload.errors import LLMLoadError

    key = _model_key(model)
    if key not in _TREES:
        try:
            _TREES[key] = _build_tree(model)
        except LLMLoadError as exc:
            raise InvalidArgument(f"model={_short(model)}: {exc}") from None
    return _TREES[key]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _build_tree(model: Any) -> _Tree:
    from pytest_llmload._internal.planning.validation import as_model

    network = as_model(model)
    no_split_classes = set(getattr(network, "_no_split_modules", None) or [])
    modules = dict(network.named_modules())
    tensors_under: dict[str, set] = {name: set() for name in modules}
    named = list(network.named_parameters(remove_duplicate=False)) + list(network.named_buffers(remove_duplicate=False))
    for name, _ in named:
        parts = name.split(".")
        for cut in range(len(parts)):
            prefix = ".".join(parts[:cut])
            if prefix in tensors_under:
                tensors_under[prefix].add(name)
    nodes: dict[str, _Node] = {}
    for name, module in modules.items():
        own = any(True for _ in module.named_parameters(recurse=False, remove_duplicate=False)) or any(
            True for _ in module.named_buffers(recurse=False, remove_duplicate=False))
        is_block = type(module).__name__ in no_split_classes
        nodes[name] = _Node(name, atomic=own or is_block, tensors=frozenset(tensors_under[name]), no_split=is_block)
    for name, node in nodes.items():
        if name:
            parent = name.rsplit(".", 1)[0] if "." in name else ""
            if nodes[name].tensors:
                nodes[parent].children.append(node)
    groups: dict[int, set] = {}
    for name, param in network.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), set()).add(name)
    tied = [frozenset(g) for g in groups.values() if len(g) > 1]
    blocks = [n for n in nodes.values() if n.no_split and len(n.children) > 1]
    return _Tree(nodes[""], tied, blocks, nodes)


def _check_devices(devices: Any, *, name: str = "devices") -> list:
    """``devices`` as a list without repeats (by meaning), or ``InvalidArgument`` naming what is wrong."""
    if not isinstance(devices, (list, tuple)) or not devices:
        why = ("a single value, not a sequence of devices" if isinstance(devices, (str, bytes, bytearray, int))
               else "unordered: examples shrink towards the first device, so the order matters"
               if isinstance(devices, (set, frozenset)) else "empty" if isinstance(devices, (list, tuple))
               else f"a {type(devices).__name__}, not a sequence of devices")
        raise InvalidArgument(f"{name}={_short(devices)} is {why}; expected a non-empty list or tuple such as "
                              "(0, 1, 'cpu')")
    checked, seen = [], set()
    from pytest_llmload.errors import LLMLoadUsageError
    from pytest_llmload._internal.config.specs import check_device

    for device in devices:
        try:
            check_device(device)
        except LLMLoadUsageError:
            raise InvalidArgument(
                f"{name}: {_short(device)} is not a device (an index, 'cpu', 'disk', 'meta', 'cuda:N')") from None
        if normalize_device(device) not in seen:
            seen.add(normalize_device(device))
            checked.append(device)
    return checked


def _check_flag(value: Any, name: str) -> None:
    if not isinstance(value, bool):
        raise InvalidArgument(f"{name}={_short(value)}: expected True or False")


def _draw_entries(draw, node: _Node, devices: list, depth: int, max_depth: int | None) -> list[tuple[str, Any]]:
    splittable = node.children and not node.atomic and (max_depth is None or depth < max_depth)
    if splittable and draw(st.booleans()):
        entries = []
        for child in node.children:
            entries += _draw_entries(draw, child, devices, depth + 1, max_depth)
        return entries
    return [(node.name, draw(st.sampled_from(devices)))]


def _tie(entries: list[tuple[str, Any]], tree: _Tree) -> dict[str, Any]:
    """Move every entry holding a tied tensor to the device of the first such entry."""
    mapping = dict(entries)
    for group in tree.tied:
        holders = [e for e in mapping if any(t == e or t.startswith(e + ".") or e == "" for t in group)]
        for entry in holders[1:]:
            mapping[entry] = mapping[holders[0]]
    return mapping


def device_maps(model: Any, *, devices: Sequence[Any] = ("cpu",), max_depth: int | None = None):
    """Valid custom device maps for ``model`` over ``devices`` (ints, "cpu", "disk", "meta", "cuda:N").

    ``max_depth`` limits how deep maps may split (0: only ``{"": device}``).
    """
    devices = _check_devices(devices)
    if max_depth is not None and (isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < 0):
        raise InvalidArgument(f"max_depth={max_depth!r}: expected None or an int >= 0")
    tree = module_tree(model)

    @st.composite
    def _maps(draw):
        return _tie(_draw_entries(draw, tree.root, devices, 0, max_depth), tree)

    return _maps()


class BrokenMap(NamedTuple):
    """A device map broken in one named way (``kind`` is one of :data:`BREAKAGES`)."""

    kind: str
    device_map: dict[str, Any]


def _finest(tree: _Tree) -> list[_Node]:
    """The leaves of the deepest valid split: atomic nodes."""
    out, stack = [], [tree.root]
    while stack:
        node = stack.pop()
        if node.children and not node.atomic:
            stack.extend(reversed(node.children))
        else:
            out.append(node)
    return out


def invalid_device_maps(model: Any, *, devices: Sequence[Any] = ("cpu", "disk"), kinds: Sequence[str] = BREAKAGES):
    """Device maps for ``model`` each broken in one named way: a gap, an unknown module, a split
    ``_no_split_modules`` block, tied weights apart, or a device outside ``devices``.

    Kinds the model cannot show (no tied weights, no block with children, a single device) are left out.
    """
    devices = _check_devices(devices)
    if not isinstance(kinds, (list, tuple, set, frozenset)) or not kinds or any(k not in BREAKAGES for k in kinds):
        raise InvalidArgument(f"kinds={_short(kinds)}: expected a non-empty list or tuple of kinds from {BREAKAGES}"
                              + (f", e.g. kinds=({kinds!r},)" if kinds in BREAKAGES else ""))
    kinds = [k for k in BREAKAGES if k in kinds]  # a fixed order, whatever collection was given
    tree = module_tree(model)
    leaves = _finest(tree)
    containers = sorted(n.name for n in tree.nodes.values() if n.children and not n.atomic)
    possible = [k for k in kinds if _possible(k, tree, leaves, devices)]
    if not possible:
        raise InvalidArgument(f"none of kinds={kinds!r} can be shown on this model with devices={devices!r}")

    @st.composite
    def _broken(draw):
        kind = draw(st.sampled_from(possible))
        base = _tie([(leaf.name, draw(st.sampled_from(devices))) for leaf in leaves], tree)
        if kind == "gap":
            victim = draw(st.sampled_from(sorted(base)))
            del base[victim]
        elif kind == "unknown_module":
            parent = draw(st.sampled_from(containers))
            base[(parent + "." if parent else "") + draw(st.sampled_from(["does_not_exist", "999"]))] = devices[0]
        elif kind == "split_block":
            block = draw(st.sampled_from(tree.no_split))
            for name in [e for e in base if e == block.name or e.startswith(block.name + ".")]:
                del base[name]
            first = draw(st.sampled_from(devices))
            second = draw(st.sampled_from([d for d in devices if normalize_device(d) != normalize_device(first)]))
            for i, child in enumerate(block.children):
                base[child.name] = first if i == 0 else second
        elif kind == "tied_apart":
            group = draw(st.sampled_from([g for g in tree.tied if _tied_separable(g, leaves)]))
            holders = [leaf.name for leaf in leaves if any(t.startswith(leaf.name + ".") for t in group)]
            device = base[holders[0]]
            other = draw(st.sampled_from([d for d in devices if normalize_device(d) != normalize_device(device)]))
            base[holders[-1]] = other
        else:  # unknown_device
            victim = draw(st.sampled_from(sorted(base)))
            base[victim] = stray
        return BrokenMap(kind, base)

    stray = _unknown_device(devices)
    return _broken()


def _unknown_device(devices: list) -> Any:
    """A well-formed device outside ``devices``: the GPU after the highest one they name, or, when they
    name none, ``cuda:64`` (more GPUs than one machine has, so it is unknown on any machine too)."""
    gpus = [int(n.split(":")[1]) for n in map(normalize_device, devices) if n.startswith("cuda:")]
    index = max(gpus) + 1 if gpus else 64
    return index if any(isinstance(d, int) for d in devices) else f"cuda:{index}"


def _tied_separable(group: frozenset, leaves: list[_Node]) -> bool:
    holders = {leaf.name for leaf in leaves for t in group if t.startswith(leaf.name + ".")}
    return len(holders) > 1


def _possible(kind: str, tree: _Tree, leaves: list[_Node], devices: list) -> bool:
    distinct = len({normalize_device(d) for d in devices}) > 1
    if kind == "gap":
        return len(leaves) > 1
    if kind == "split_block":
        return bool(tree.no_split) and distinct
    if kind == "tied_apart":
        return distinct and any(_tied_separable(g, leaves) for g in tree.tied)
    if kind == "unknown_module":
        return any(n.children and not n.atomic for n in tree.nodes.values())
    return True


def _size(value: Any, name: str) -> int:
    from pytest_llmload.errors import LLMLoadUsageError

    try:
        return parse_size(value)
    except LLMLoadUsageError as exc:
        raise InvalidArgument(f"{name}: {exc}") from None


_UNITS = ("GiB", "GB", "MiB", "MB", "KiB")


def max_memory_budgets(*, gpus: int = 4, min_size: Any = "1MiB", max_size: Any = "80GiB",
                       cpu: bool = True, disk: bool = False, zero: bool = True):
    """``max_memory`` dicts as users write them: sparse GPU ids, ints and strings in several units,
    zero budgets (the other way to exclude a GPU), and cpu/disk entries."""
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 0:
        raise InvalidArgument(f"gpus={_short(gpus)}: expected an int >= 0")
    for flag, value in (("cpu", cpu), ("disk", disk), ("zero", zero)):
        _check_flag(value, flag)
    low, high = _size(min_size, "min_size"), _size(max_size, "max_size")
    if low > high:
        raise InvalidArgument(f"min_size={min_size!r} is larger than max_size={max_size!r}")

    def as_written(draw, size: int):
        form = draw(st.sampled_from(["int", "unit"]))
        if form == "int":
            return size
        unit = draw(st.sampled_from(_UNITS))
        scale = parse_size("1" + unit)
        value = max(size // scale, 1)
        return f"{value}{unit}" if draw(st.booleans()) else f"{value} {unit}"

    size = st.integers(low, high)

    @st.composite
    def _budgets(draw):
        budget: dict[Any, Any] = {}
        ids = draw(st.lists(st.integers(0, max(gpus - 1, 0)), unique=True, max_size=gpus)) if gpus else []
        for index in sorted(ids):
            budget[index] = 0 if zero and draw(st.integers(0, 4)) == 0 else as_written(draw, draw(size))
        if cpu and (not budget or draw(st.booleans())):
            budget["cpu"] = as_written(draw, draw(size))
        if disk and draw(st.booleans()):
            budget["disk"] = as_written(draw, draw(size))
        if not budget:
            budget["cpu"] = as_written(draw, high)
        return budget

    return _budgets()


__all__ = ["BREAKAGES", "BrokenMap", "device_maps", "invalid_device_maps", "max_memory_budgets", "module_tree"]
