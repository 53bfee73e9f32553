"""Parsing what users write (model ids, device maps, precisions, budgets) into checked values.

Nothing here imports torch: these run at pytest start-up, before any test asks for a model.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from pytest_llmload.errors import LLMLoadUsageError
from pytest_llmload._internal.config.numbers import is_whole_number, parse_size

PRECISIONS = ("auto", "fp32", "fp16", "bf16", "int8", "nf4", "fp4")
QUANTIZED_PRECISIONS = ("int8", "nf4", "fp4")
_PRECISION_ALIASES = {"float32": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16", "4bit": "nf4", "8bit": "int8"}
MAP_FILE_MAX_BYTES = 4 * 2**20  # a map of 100k modules is a few MB
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
STRATEGIES = DEVICE_MAP_STRATEGIES  # public older name (pytest_llmload.STRATEGIES); not the hypothesis strategies
DEVICE_MAP_ACCEPTED = (
    "auto, balanced, balanced_low_0, sequential, cpu, cuda, cuda:N, N, disk, process, tp, "
    "a JSON object such as '{\"\": 0}' or @file.json"
)
# Devices a custom map may name: cpu, disk, meta, an accelerator index or "<type>[:N]".
_DEVICE_RE = re.compile(r"^(cpu|disk|meta|(cuda|xpu|npu|mps|hpu|mlu)(:[0-9]+)?)$")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$", re.ASCII)
BUILTIN_PREFIX = "builtin:"
# The built-in checkpoints' names (builtin.BUILTIN_MODELS has them, with their configs; a test keeps the
# two in step): parsing --llm-model at start-up does not import what builds them.
BUILTIN_NAMES = ("tiny-llama", "tiny-gpt2", "tiny-t5", "tiny-bert", "tiny-mixtral")
# Devices a map that pytest-llmload loads may name (mps, xpu, npu... are refused at start-up).
LOADABLE_DEVICES = "cpu, disk, cuda, cuda:N or a GPU index N"
_LOADABLE_RE = re.compile(r"^(cpu|disk|cuda(:[0-9]+)?)$")


def unique(values: Iterable) -> list:
    """``values`` without repeats, first occurrence kept (values compare by meaning once parsed)."""
    out: list = []
    for value in values:
        if value not in out:
            out.append(value)
    return out


def parse_precision(value: str) -> str:
    """Canonical precision name for ``value`` (``"float16"`` -> ``"fp16"``)."""
    if not isinstance(value, str):
        raise LLMLoadUsageError(f"invalid precision {value!r}: expected one of {', '.join(PRECISIONS)}")
    text = value.strip().lower()
    text = _PRECISION_ALIASES.get(text, text)
    if text not in PRECISIONS:
        raise LLMLoadUsageError(f"invalid precision {value!r}: expected one of {', '.join(PRECISIONS)}")
    return text


def check_device(device: Any, *, where: str = "") -> int | str:
    """Return ``device`` if a device map may name it: an index >= 0, cpu, disk, meta, cuda[:N]..."""
    if isinstance(device, bool) or not isinstance(device, (int, str)):
        raise LLMLoadUsageError(
            f"invalid device {device!r}{where}: expected a GPU index, 'cpu', 'disk', 'meta' or 'cuda:N'"
        )
    if isinstance(device, int):
        if device < 0:
            raise LLMLoadUsageError(f"invalid device {device!r}{where}: a GPU index cannot be negative")
        return device
    if not _DEVICE_RE.match(device):
        raise LLMLoadUsageError(
            f"invalid device {device!r}{where}: expected a GPU index, 'cpu', 'disk', 'meta' or 'cuda:N'"
        )
    return device


def _loadable_device(device: Any, where: str) -> int | str:
    """A device a loaded map may use, canonical: GPU index as int (``"cuda:1"``, ``"1"`` -> 1), cpu, disk."""
    if isinstance(device, str) and is_whole_number(device.strip()):
        device = int(device.strip())
    device = check_device(device, where=where)
    if isinstance(device, int):
        return device
    if not _LOADABLE_RE.match(device):
        raise LLMLoadUsageError(
            f"unsupported device {device!r}{where}: pytest-llmload loads on {LOADABLE_DEVICES}"
            + (" ('meta' would load a model without weights)" if device == "meta" else "")
        )
    if device.startswith("cuda"):
        return int(device.split(":")[1]) if ":" in device else 0
    return device


def check_device_map_dict(mapping: Any, *, source: str = "device map") -> dict[str, int | str]:
    """Check a custom device map: module names (str) to loadable devices, canonical (GPUs as indices)."""
    if not isinstance(mapping, dict) or not mapping:
        raise LLMLoadUsageError(
            f"invalid {source} {mapping!r}: expected a non-empty JSON object of module name -> device"
        )
    checked: dict[str, int | str] = {}
    for name, device in mapping.items():
        if not isinstance(name, str):
            raise LLMLoadUsageError(f"invalid {source}: module name {name!r} is not a string")
        checked[name] = _loadable_device(device, f" for module {name!r} in {source}")
    return checked


@dataclass(frozen=True)
class DeviceMapSpec:
    """A parsed ``--llm-device-map`` value.

    ``kind`` is ``strategy`` (auto, balanced, ...), ``device`` (the whole model on one device),
    ``process`` (one copy per process, resolved at load time), ``tp`` (tensor parallel over the
    launched world, see :mod:`pytest_llmload._internal.distributed`) or ``custom`` (a dict). Values are
    canonical, so ``0``, ``cuda``, ``cuda:0`` and ``{"": 0}`` are one and the same spec.
    """

    kind: str
    value: Any
    label: str = field(compare=False)
    source: str = field(default="", compare=False)

    def as_user_value(self) -> Any:
        """The map as a user would pass it to ``from_pretrained`` (``process`` and ``tp`` stay symbolic)."""
        if self.kind == "custom":
            return dict(self.value)
        if self.kind == "device":
            return {"": self.value}
        return self.value

    @property
    def key(self) -> str:
        return json.dumps(self.as_user_value(), sort_keys=True)


def _map_label(mapping: dict) -> str:
    devices = []
    for device in mapping.values():
        if device not in devices:
            devices.append(device)
    import hashlib

    digest = hashlib.sha1(json.dumps(mapping, sort_keys=True).encode()).hexdigest()[:6]
    return "map-" + "+".join(str(d) for d in devices) + "-" + digest


def _device_label(device: int | str) -> str:
    return f"cuda{device}" if isinstance(device, int) else device


def _custom(mapping: dict, label: str, source: str = "") -> DeviceMapSpec:
    if list(mapping) == [""]:
        return _single_device(mapping[""])
    return DeviceMapSpec("custom", tuple(mapping.items()), label, source=source)


def _resolve_path(text: str, base: str | os.PathLike | None) -> Path:
    path = Path(text).expanduser()
    if base is not None and not path.is_absolute():
        path = Path(base) / path
    return path


def parse_device_map(value: Any, *, base: str | os.PathLike | None = None) -> DeviceMapSpec:
    """Parse a device map as given on the command line, in ini, a marker or ``llm_load``.

    ``base`` is the folder a relative ``@file.json`` is read from (default: the current directory).
    """
    if isinstance(value, DeviceMapSpec):
        return value
    if isinstance(value, dict):
        mapping = check_device_map_dict(value)
        return _custom(mapping, _map_label(mapping))
    if isinstance(value, int) and not isinstance(value, bool):
        return _single_device(_loadable_device(value, ""))
    if not isinstance(value, str) or not value.strip():
        raise LLMLoadUsageError(f"invalid device map {value!r}: expected {DEVICE_MAP_ACCEPTED}")
    text = value.strip()
    if text in DEVICE_MAP_STRATEGIES:
        return DeviceMapSpec("strategy", text, text)
    if text == "process":
        return DeviceMapSpec("process", "process", "process")
    if text == "tp":
        return DeviceMapSpec("tp", "tp", "tp")
    if text.startswith("@"):
        # what checkpoint files get: a regular file only (a FIFO or /dev/stdin would block, /dev/zero never
        # ends), at most MAP_FILE_MAX_BYTES, nesting bounded before parsing
        from pytest_llmload._internal.loading.safety import DamagedFile, open_regular, parse_json

        path = _resolve_path(text[1:], base)
        try:
            with open_regular(path) as handle:
                raw = handle.read(MAP_FILE_MAX_BYTES + 1)
        except DamagedFile as exc:
            raise LLMLoadUsageError(f"invalid device map {text!r}: {path} is {exc}".replace(" is missing",
                                    " does not exist")) from None
        except OSError as exc:
            raise LLMLoadUsageError(f"invalid device map {text!r}: cannot read {path} "
                                    f"({exc.strerror or exc})") from None
        if len(raw) > MAP_FILE_MAX_BYTES:
            raise LLMLoadUsageError(f"invalid device map file {path}: more than {MAP_FILE_MAX_BYTES} bytes (a "
                                    "device map is a JSON object of module names and devices)")
        try:
            mapping = json.loads(raw.decode("utf-8")) if parse_json(raw, parse=False) is None else None
        except DamagedFile as exc:
            raise LLMLoadUsageError(f"invalid device map file {path}: {exc}") from None
        except (json.JSONDecodeError, RecursionError, UnicodeDecodeError) as exc:
            where = f" ({exc.msg} at line {exc.lineno} column {exc.colno})" if isinstance(
                exc, json.JSONDecodeError) else " (nested too deeply)" if isinstance(exc, RecursionError) else \
                " (not UTF-8 text)"
            raise LLMLoadUsageError(f"invalid device map file {path}: not valid JSON{where}") from None
        mapping = check_device_map_dict(mapping, source=f"device map file {path}")
        return _custom(mapping, path.stem, source=str(path))
    if text.startswith("{"):
        try:
            mapping = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            where = f" ({exc.msg} at column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else ""
            raise LLMLoadUsageError(f"invalid device map {text!r}: not valid JSON{where}") from None
        return parse_device_map(mapping)
    if is_whole_number(text) or _DEVICE_RE.match(text):
        return _single_device(_loadable_device(text, ""))
    raise LLMLoadUsageError(f"invalid device map {text!r}: expected {DEVICE_MAP_ACCEPTED}")


def _single_device(device: int | str) -> DeviceMapSpec:
    return DeviceMapSpec("device", device, _device_label(device))


@dataclass(frozen=True)
class ModelSpec:
    """A parsed ``--llm-model`` value: ``builtin:NAME``, a local directory or a hub id."""

    kind: str  # builtin | path | hub
    source: str  # builtin name, absolute path or hub id
    label: str = field(compare=False)

    @property
    def text(self) -> str:
        return BUILTIN_PREFIX + self.source if self.kind == "builtin" else self.source


def _looks_like_path(text: str, base: str | os.PathLike | None = None) -> bool:
    # A hub id is "name" or "org/name"; anything else with separators is meant as a local path.
    # lexists: a symlink that does not resolve (a loop, a dangling one) is a local path too, not a hub id.
    return (text.startswith((".", "/", "~", "\\")) or text.count("/") > 1 or "\\" in text
            or os.path.lexists(_resolve_path(text, base)))


def parse_model(value: Any, *, base: str | os.PathLike | None = None) -> ModelSpec:
    """Parse a model reference: ``builtin:NAME``, an existing directory, or a hub id ``org/name``.

    ``base`` is the folder a relative path is resolved against (default: the current directory).
    """
    if isinstance(value, ModelSpec):
        return value
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        raise LLMLoadUsageError(
            f"invalid model {value!r}: expected builtin:NAME, a local checkpoint directory or a hub id"
        )
    text = value.strip()
    if text.startswith(BUILTIN_PREFIX):
        name = text[len(BUILTIN_PREFIX):]
        if name not in BUILTIN_NAMES:
            raise LLMLoadUsageError(
                f"unknown built-in model {text!r}: expected one of "
                + ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_NAMES)
            )
        return ModelSpec("builtin", name, name)
    if _looks_like_path(text, base):
        from pytest_llmload._internal.loading.safety import not_regular  # stat only: a FIFO is never opened

        path = _resolve_path(text, base)
        if not path.exists():
            kind = not_regular(path)  # a symlink loop, a dangling symlink
            raise LLMLoadUsageError(f"model path {text!r} {'is ' + kind if kind else 'does not exist'}: "
                                    "expected a checkpoint directory")
        if not path.is_dir():
            kind = not_regular(path)
            raise LLMLoadUsageError(f"model path {text!r} is {kind + ', ' if kind else ''}not a directory: "
                                    "expected a checkpoint directory with config.json")
        if not (path / "config.json").is_file():
            kind = not_regular(path / "config.json")  # a FIFO, a symlink loop, a device, a directory
            if kind:
                raise LLMLoadUsageError(f"checkpoint file {path / 'config.json'} is {kind}, not a regular file")
            raise LLMLoadUsageError(f"model path {text!r} has no config.json: expected a checkpoint directory")
        path = path.resolve()
        return ModelSpec("path", str(path), path.name)
    if not _HUB_ID_RE.match(text):
        raise LLMLoadUsageError(
            f"invalid model {text!r}: expected builtin:NAME, a local checkpoint directory or a hub id such as 'org/name'"
        )
    return ModelSpec("hub", text, text.rsplit("/", 1)[-1])


class Budgets(dict):
    """Per-device budgets already parsed (``{0: bytes, "cpu": bytes}``): :func:`parse_max_memory` gives them
    back as they are, so a value read once from the options or a cell is not parsed again downstream."""


def parse_max_memory(value: Any) -> dict[int | str, int] | None:
    """Parse per-device budgets: ``"0=20GiB,1=20GiB,cpu=64GiB"`` or a dict -> ``{0: bytes, 1: ..., "cpu": ...}``."""
    if isinstance(value, Budgets):
        return value or None
    if value is None or value == "" or value == {}:
        return None
    items: Iterable[tuple[Any, Any]]
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, str):
        pairs = []
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue
            if "=" not in part:
                raise LLMLoadUsageError(
                    f"invalid max memory {value!r}: {part!r} is not DEVICE=SIZE; expected e.g. '0=20GiB,1=20GiB,cpu=64GiB'"
                )
            device, size = part.split("=", 1)
            pairs.append((device.strip(), size.strip()))
        items = pairs
    else:
        raise LLMLoadUsageError(
            f"invalid max memory {value!r}: expected a dict or a string such as '0=20GiB,cpu=64GiB'"
        )
    budget: dict[int | str, int] = {}
    for device, size in items:
        try:
            device = _loadable_device(device, " in max memory")
        except LLMLoadUsageError:
            raise LLMLoadUsageError(
                f"invalid max memory {value!r}: device {device!r} is not a GPU index, 'cpu', 'disk' or 'cuda:N'"
            ) from None
        try:
            budget[device] = parse_size(size)
        except LLMLoadUsageError as exc:
            raise LLMLoadUsageError(f"invalid max memory {value!r}: {exc}") from None
    return Budgets(budget) if budget else None


def split_values(values: Iterable[str]) -> list[str]:
    """Split ini lines (and repeated options) on top-level commas; JSON objects keep their commas."""
    out: list[str] = []
    for raw in values:
        depth, quote, start = 0, False, 0
        for i, ch in enumerate(raw):
            if ch == '"' and (i == 0 or raw[i - 1] != "\\"):
                quote = not quote
            elif not quote and ch in "{[":
                depth += 1
            elif not quote and ch in "}]":
                depth -= 1
            elif not quote and depth == 0 and ch == ",":
                out.append(raw[start:i])
                start = i + 1
        out.append(raw[start:])
    return [v.strip() for v in out if v.strip()]


@dataclass(frozen=True)
class LLMSpec:
    """One cell of the matrix: which model, under which device map, in which precision."""

    model_spec: ModelSpec
    device_map_spec: DeviceMapSpec
    precision: str
    max_memory: tuple[tuple[int | str, int], ...] | None = field(default=None)

    @property
    def model(self) -> str:
        return self.model_spec.text

    @property
    def device_map(self) -> Any:
        return self.device_map_spec.as_user_value()

    @property
    def id(self) -> str:
        return f"{self.model_spec.label}-{self.device_map_spec.label}-{self.precision}"

    @property
    def max_memory_dict(self) -> dict | None:
        return Budgets(self.max_memory) if self.max_memory else None

    @property
    def key(self) -> str:
        """The cell's identity as one string (unique per cell, also where two labels collide): what the
        report merges on across processes. In one process the frozen spec itself is the key."""
        return f"{self.model} {self.device_map_spec.key} {self.precision}{self.budget_text}"

    @property
    def budget_text(self) -> str:
        # Budgets mix GPU indices and "cpu": as JSON keys (strings), so that sorting them cannot fail.
        if not self.max_memory:
            return ""
        return f" max_memory={json.dumps({str(k): v for k, v in self.max_memory}, sort_keys=True)}"

    def __repr__(self) -> str:
        return f"LLMSpec(model={self.model!r}, device_map={self.device_map!r}, precision={self.precision!r})"


def make_spec(model: Any, device_map: Any = "auto", precision: Any = "auto", max_memory: Any = None) -> LLMSpec:
    budget = parse_max_memory(max_memory)
    return LLMSpec(
        parse_model(model),
        parse_device_map(device_map if device_map is not None else "auto"),
        parse_precision(precision if precision is not None else "auto"),
        tuple(sorted(budget.items(), key=lambda kv: str(kv[0]))) if budget else None,
    )
