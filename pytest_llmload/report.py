"""The load report: every cell the session loaded, what it cost, and how many tests used it.

Workers of pytest-xdist attach what they loaded to their test reports (``user_properties``), so the
controller sees every cell; without xdist the same path runs in one process. JSON schema (version 1)::

    {"schema": "pytest-llmload/report", "version": 1,
     "cells": [{"id", "model", "device_map", "precision", "loads", "load_seconds", "footprint_bytes",
                "bytes_per_device": {device: bytes}, "device_hops", "tests", "notes", "workers"}]}

``load_seconds`` is the total over the cell's loads (more than one when it was evicted and reloaded).
"""

from __future__ import annotations

import json
from typing import Any

from .sizes import format_size

PROPERTY = "llmload"
SCHEMA = {"schema": "pytest-llmload/report", "version": 1}


def describe_load(model, record) -> dict[str, Any]:
    """One load, as it travels on a test report: plain JSON values only."""
    from .assertions import device_hops
    from .devices import normalize_device
    from .loading import effective_device_map

    from .devices import resolve

    placed = effective_device_map(model)
    footprint = int(model.get_memory_footprint())
    if list(placed) == [""]:  # one device: no need to walk the tensors
        per_device = {normalize_device(placed[""]): footprint}
        hops = 0
    else:
        per_device = {}
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            _, device = resolve(placed, name)
            key = normalize_device(device) if device is not None else "unplaced"
            per_device[key] = per_device.get(key, 0) + tensor.nelement() * tensor.element_size()
        hops = device_hops(model)
    spec = record.spec
    return {
        "key": cell_key(spec),
        "id": spec.id, "model": spec.model, "device_map": spec.device_map, "precision": spec.precision,
        "load_seconds": round(record.load_seconds, 4), "footprint_bytes": footprint,
        "bytes_per_device": per_device, "device_hops": hops, "notes": list(record.info.notes),
    }


def cell_key(spec) -> str:
    """Unique per cell (two checkpoints may share a label, and so an id)."""
    return f"{spec.model} {spec.device_map_spec.key} {spec.precision}"


class LoadReport:
    """Cells merged from every process's test reports."""

    def __init__(self) -> None:
        self.cells: dict[str, dict[str, Any]] = {}

    def add(self, payload: dict[str, Any], worker: str = "main") -> None:
        for load in payload.get("loads", []):
            cell = self.cells.setdefault(load["key"], {**load, "loads": 0, "load_seconds": 0.0, "tests": 0,
                                                      "workers": []})
            cell["loads"] += 1
            cell["load_seconds"] = round(cell["load_seconds"] + load["load_seconds"], 4)
            if worker not in cell["workers"]:
                cell["workers"].append(worker)
        for cell_id in payload.get("used", []):
            if cell_id in self.cells:
                self.cells[cell_id]["tests"] += 1
            else:  # a use reported before its load (cannot happen in one process; keep it safe)
                self.cells.setdefault(cell_id, {"key": cell_id, "id": cell_id, "loads": 0, "load_seconds": 0.0,
                                                "tests": 0, "workers": []})["tests"] += 1

    def to_json(self) -> dict[str, Any]:
        cells = [{k: v for k, v in self.cells[key].items() if k != "key"} for key in sorted(self.cells)]
        return {**SCHEMA, "cells": sorted(cells, key=lambda c: c["id"])}

    def write(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=2, sort_keys=False)
            f.write("\n")

    def table(self) -> str:
        header = ("cell", "loads", "load s", "footprint", "per device", "hops", "tests")
        rows = []
        for cell in sorted(self.cells.values(), key=lambda c: c["id"]):
            devices = ", ".join(f"{d} {format_size(b)}" for d, b in cell.get("bytes_per_device", {}).items())
            rows.append((cell["id"], str(cell["loads"]), f"{cell['load_seconds']:.2f}",
                         format_size(cell.get("footprint_bytes", 0)), devices, str(cell.get("device_hops", "-")),
                         str(cell["tests"])))
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows])
