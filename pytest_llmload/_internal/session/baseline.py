"""Footprint baselines: each cell's ``get_memory_footprint()`` recorded once, later runs checked against it.

Cells are keyed by :meth:`LLMSpec.portable_key` (``builtin:tiny-llama auto fp16``,
``models/ckpt cuda0 int8``): unique per cell and the same on every machine (a local checkpoint by its
path relative to the project's root folder), so two checkpoints whose folders share a name never share
an entry.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from pytest_llmload.errors import LLMLoadUsageError
from pytest_llmload._internal.config.numbers import format_size

SCHEMA = {"schema": "pytest-llmload/footprints", "version": 1}
_MAX_BYTES = 2**63 - 1


class Baseline:
    """The footprints of a baseline file, checked when read: a damaged file is one clear error."""

    def __init__(self, path: str, tolerance: float, footprints: dict[str, int] | None = None):
        self.path = path
        self.tolerance = tolerance
        self.footprints: dict[str, int] = dict(footprints or {})
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
        return cls(path, tolerance, footprints)

    def regression(self, key: str, cell_id: str, footprint: int) -> str | None:
        """The failure message when ``footprint`` grew beyond the tolerance over the one recorded for ``key``
        (the cell's portable key); ``cell_id`` is its label, for the message."""
        old = self.footprints.get(key)
        if old is None or footprint <= old * (1 + self.tolerance):
            return None
        return (
            f"footprint of {cell_id} grew by {footprint / old - 1:.1%}: {format_size(old)} ({old} bytes) in the "
            f"baseline {self.path}, {format_size(footprint)} ({footprint} bytes) now; the tolerance is "
            f"{self.tolerance:.0%}"
        )

    def write(self, cells: list[dict[str, Any]]) -> None:
        """Record footprints of cells the baseline does not have yet (existing entries are kept)."""
        from pytest_llmload._internal.config.options import write_atomically

        new = {c["baseline_key"]: c["footprint_bytes"] for c in cells
               if c.get("footprint_bytes") and c.get("baseline_key") and c["baseline_key"] not in self.footprints}
        if not new and self.existed:
            return
        known = {**self.footprints, **new}
        write_atomically(self.path, json.dumps({**SCHEMA, "footprints": dict(sorted(known.items()))}, indent=2) + "\n")
