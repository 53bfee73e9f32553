"""Footprint baselines: each cell's ``get_memory_footprint()`` recorded once, later runs checked against it.

Cells are keyed by :func:`baseline_key` (``builtin:tiny-llama auto fp16``,
``models/ckpt cuda0 int8``, ``GPT2LMHeadModel@3f9a0c1b2d4e map-1a2b3c4d fp32``): unique per cell and the
same on every machine and install (a local checkpoint by its path relative to the project's root folder,
one outside it by its name and a hash of its weights' headers; a custom map by a short hash, the map
itself kept under ``device_maps``), so two checkpoints whose folders share a name never share an entry,
and a moved venv or an upgraded Python does not turn a check into a new recording. Entries under the
keys of 0.1.0 (:func:`legacy_baseline_key`) are still read, and copied to the new key.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from pytest_llmload.errors import LLMLoadUsageError
from pytest_llmload._internal.config.numbers import format_size

SCHEMA = {"schema": "pytest-llmload/footprints", "version": 1}
_MAX_BYTES = 2**63 - 1


class Baseline:
    """The footprints of a baseline file, checked when read: a damaged file is one clear error."""

    def __init__(self, path: str, tolerance: float, footprints: dict[str, int] | None = None,
                 device_maps: dict[str, Any] | None = None):
        self.path = path
        self.tolerance = tolerance
        self.footprints: dict[str, int] = dict(footprints or {})
        self.device_maps: dict[str, Any] = dict(device_maps or {})  # map-HASH -> the map, for reading
        self.existed = footprints is not None

    @classmethod
    def load(cls, path: str, tolerance: float) -> "Baseline":
        if not os.path.exists(path):
            return cls(path, tolerance, None)
        expected = 'expected JSON {"footprints": {cell: bytes > 0}}'
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError, RecursionError) as exc:
            raise LLMLoadUsageError(f"invalid footprint baseline {path}: {expected} ({exc})") from None
        entries = data.get("footprints") if isinstance(data, dict) else None
        if not isinstance(entries, dict):
            raise LLMLoadUsageError(f"invalid footprint baseline {path}: {expected}")
        footprints = {}
        for key, value in entries.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value != int(value) or not 0 < value <= _MAX_BYTES:
                raise LLMLoadUsageError(
                    f"invalid footprint baseline {path}: entry {key!r} is {value!r}; expected a whole number of "
                    "bytes > 0 (delete the entry to record it anew)"
                )
            footprints[str(key)] = int(value)
        maps = data.get("device_maps")
        return cls(path, tolerance, footprints, maps if isinstance(maps, dict) else None)

    def recorded(self, key: str, legacy_key: str | None = None) -> int | None:
        """The footprint recorded for ``key``, else for the cell's old key ``legacy_key``."""
        old = self.footprints.get(key)
        return self.footprints.get(legacy_key) if old is None and legacy_key else old

    def regression(self, key: str, cell_id: str, footprint: int, legacy_key: str | None = None) -> str | None:
        """The failure message when ``footprint`` grew beyond the tolerance over the one recorded for ``key``
        (the cell's portable key; else its key of 0.1.0, ``legacy_key``); ``cell_id`` labels it in the message."""
        old = self.recorded(key, legacy_key)
        if old is None or footprint <= old * (1 + self.tolerance):
            return None
        return (
            f"footprint of {cell_id} grew by {footprint / old - 1:.1%}: {format_size(old)} ({old} bytes) in the "
            f"baseline {self.path}, {format_size(footprint)} ({footprint} bytes) now; the tolerance is "
            f"{self.tolerance:.0%}"
        )

    def write(self, cells: list[dict[str, Any]]) -> list[str]:
        """Record footprints of cells the baseline does not have yet (existing entries are kept; one found
        under its old key is copied to the new key, not measured anew). Returns the lines to print: what was
        copied, and what was recorded while entries of the file matched no cell (a key that changed?)."""
        from pytest_llmload._internal.config.options import write_atomically

        new: dict[str, int] = {}
        moved: dict[str, str] = {}  # new key -> old key
        matched: set[str] = set()
        maps: dict[str, Any] = {}
        for cell in cells:
            key, legacy = cell.get("baseline_key"), cell.get("baseline_legacy_key")
            if not key or not cell.get("footprint_bytes"):
                continue
            matched.update(k for k in (key, legacy) if k)
            maps.update(cell.get("baseline_maps") or {})
            if key in self.footprints or key in new:
                continue
            if legacy and legacy in self.footprints:
                moved[key] = legacy
            else:
                new[key] = cell["footprint_bytes"]
        maps = {name: m for name, m in maps.items() if self.device_maps.get(name) != m}
        if not new and not moved and not maps and self.existed:
            return []
        known = {**self.footprints, **new, **{key: self.footprints[old] for key, old in moved.items()}}
        device_maps = {**self.device_maps, **maps}
        write_atomically(self.path, json.dumps({**SCHEMA, "footprints": dict(sorted(known.items())),
                                                **({"device_maps": dict(sorted(device_maps.items()))}
                                                   if device_maps else {})}, indent=2) + "\n")
        lines = []
        if moved:
            lines.append(f"llmload: footprint baseline {self.path}: {_entries(len(moved))} read under the key of "
                         f"pytest-llmload 0.1.0, now also under the new one: "
                         + _listed(f"{old!r} -> {key!r}" for key, old in moved.items()))
        stale = [key for key in self.footprints if key not in matched]
        if new and stale:
            lines.append(f"llmload: footprint baseline {self.path}: recorded {_entries(len(new), 'new ')} "
                         f"({_listed(new)}); {_entries(len(stale))} matched no cell of this run ({_listed(stale)}): "
                         "if it is the same cell under an old key, its check was lost: move its value to the new key")
        return lines


def cell_keys(spec, root) -> dict[str, Any]:
    """What a load carries for the baseline: its key, its key of 0.1.0 where that differs, its custom map."""
    keys: dict[str, Any] = {"baseline_key": baseline_key(spec, root)}
    legacy = legacy_baseline_key(spec, root)
    if legacy != keys["baseline_key"]:
        keys["baseline_legacy_key"] = legacy
    if spec.device_map_spec.kind == "custom":
        keys["baseline_maps"] = {map_key(spec.device_map): spec.device_map}
    return keys


def _entries(count: int, adjective: str = "") -> str:
    return f"{count} {adjective}{'entry' if count == 1 else 'entries'}"


def _listed(items, most: int = 3) -> str:
    items = list(items)
    return ", ".join(items[:most]) + (f" and {len(items) - most} more" if len(items) > most else "")


# -- the keys ------------------------------------------------------------------------------------------


def baseline_key(spec: Any, root: str | os.PathLike | None = None) -> str:
    """The cell's identity as it reads on any machine and any install (the footprint baseline's key): a
    local checkpoint by its path relative to ``root`` (the project's root folder) when inside it, else by
    ``loading/identity.checkpoint_identity`` (its name and a hash of its weights' headers: a venv moved or a
    Python upgraded keeps the key); a custom map by :func:`map_key` (a short hash, not the whole JSON)."""
    model = spec.model
    if spec.model_spec.kind == "path":
        model = _relative_to(spec.model_spec.source, root) or _checkpoint_identity(spec.model_spec.source)
    kind = spec.device_map_spec.kind
    device_map = (spec.device_map_spec.label if kind in ("strategy", "process", "device")
                  else map_key(spec.device_map) if kind == "custom"
                  else json.dumps(spec.device_map, sort_keys=True, separators=(",", ":")))
    return f"{model} {device_map} {spec.precision}{spec.budget_text}"

def legacy_baseline_key(spec: Any, root: str | os.PathLike | None = None) -> str:
    """The baseline key as 0.1.0 wrote it (a checkpoint outside ``root`` by its absolute path, a custom map
    as its whole JSON): baseline files written then are still read under it."""
    model = spec.model
    if spec.model_spec.kind == "path":
        model = _relative_to(spec.model_spec.source, root) or model
    kind = spec.device_map_spec.kind
    device_map = (spec.device_map_spec.label if kind in ("strategy", "process", "device")
                  else json.dumps(spec.device_map, sort_keys=True, separators=(",", ":")))
    return f"{model} {device_map} {spec.precision}{spec.budget_text}"


def _relative_to(path: str, root: str | os.PathLike | None) -> str | None:
    if root is None:
        return None
    try:
        return Path(path).relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return None


def map_key(mapping: dict) -> str:
    """A custom device map in a footprint baseline's key: ``map-`` and a short hash of its canonical JSON, the
    hash of its cell label (``map-cpu-3285ef`` -> ``map-3285ef4a``); the baseline file keeps the map itself
    under ``device_maps``, for reading."""
    import hashlib

    return "map-" + hashlib.sha1(json.dumps(mapping, sort_keys=True).encode()).hexdigest()[:8]


def _checkpoint_identity(folder: str) -> str:
    from pytest_llmload._internal.loading.identity import checkpoint_identity

    return checkpoint_identity(folder)
