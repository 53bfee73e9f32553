"""The load report: every cell the session loaded, what it cost, how many tests used it, and each test's peaks.

Workers of pytest-xdist attach what they loaded to their test reports (``user_properties``), so the
controller sees every cell; without xdist the same path runs in one process. JSON schema (version 1)::

    {"schema": "pytest-llmload/report", "version": 1,
     "cells": [{"id", "model", "device_map", "precision", "loads", "reloads", "private_loads",
                "load_seconds", "footprint_bytes", "bytes_per_device": {device: bytes}, "device_hops",
                "tests", "notes", "workers"}],
     "tests": [{"nodeid", "cpu_peak_delta", "gpu_allocated_peak", "gpu_reserved_peak", "gpu_used", "seconds"}]}

``loads`` counts every ``from_pretrained`` of the cell: its first (cached) load, ``reloads`` after the
cache evicted it, and ``private_loads`` (``llm_private_model`` and ``llm_load(private=True)`` copies).
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from pytest_llmload._internal.config.numbers import format_size

PROPERTY = "llmload"
MISSING_PROPERTY = "llmload-missing-hardware"
MEMORY_PROPERTY = "llmload-memory"
NOTE_PROPERTY = "llmload-note"
SCHEMA = {"schema": "pytest-llmload/report", "version": 1}


def describe_load(model, record) -> dict[str, Any]:
    """One load, as it travels on a test report: plain JSON values only."""
    from pytest_llmload._internal.planning.devices import normalize_device, resolve
    from pytest_llmload._internal.loading.placement import effective_device_map

    placed = effective_device_map(model)
    footprint = int(model.get_memory_footprint())
    if list(placed) == [""]:  # one device: no need to walk the tensors
        per_device = {normalize_device(placed[""]): footprint}
        hops = 0
    else:
        from pytest_llmload._internal.planning.devices import device_hops

        per_device = {}
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            _, device = resolve(placed, name)
            key = normalize_device(device) if device is not None else "unplaced"
            per_device[key] = per_device.get(key, 0) + tensor.nelement() * tensor.element_size()
        hops = device_hops(model)
    from pytest_llmload._internal.distributed import rank_view

    per_device, world = rank_view(model, per_device, footprint)  # under a launcher: rankR:device, world size
    spec = record.spec
    return {
        **world, "key": spec.key, "kind": record.kind,
        "id": spec.id, "model": spec.model, "device_map": spec.device_map, "precision": spec.precision,
        "load_seconds": round(record.load_seconds, 4), "footprint_bytes": footprint,
        "bytes_per_device": per_device, "device_hops": hops, "notes": list(record.info.notes),
    }


class LoadReport:
    """Cells merged from every process's test reports, and the peaks of tests that used ``llm_memory``."""

    def __init__(self) -> None:
        self.cells: dict[str, dict[str, Any]] = {}
        self.tests: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.coverage: dict[str, Any] | None = None  # --llm-coverage: the test x runner verdicts

    def add(self, payload: dict[str, Any], worker: str = "main") -> None:
        for load in payload.get("loads", []):
            cell = self.cells.setdefault(load["key"], {
                **{k: v for k, v in load.items() if k != "kind"},
                "loads": 0, "reloads": 0, "private_loads": 0, "load_seconds": 0.0, "tests": 0, "workers": []})
            cell["loads"] += 1
            kind = load.get("kind", "load")
            if kind == "reload":
                cell["reloads"] += 1
            elif kind == "private":
                cell["private_loads"] += 1
            cell["load_seconds"] = round(cell["load_seconds"] + load["load_seconds"], 4)
            cell.setdefault("bytes_per_device", {}).update(load.get("bytes_per_device", {}))  # ranks: rankR:dev
            if worker not in cell["workers"]:
                cell["workers"].append(worker)
        for key in payload.get("used", []):
            if key in self.cells:
                self.cells[key]["tests"] += 1

    def totals(self) -> str:
        cells = list(self.cells.values())
        loads = sum(c["loads"] for c in cells)
        reloads = sum(c["reloads"] for c in cells)
        private = sum(c["private_loads"] for c in cells)
        tests = sum(c["tests"] for c in cells)
        return (f"llmload: {loads} load(s) of {len(cells)} cell(s): {loads - reloads - private} first load(s), "
                f"{reloads} reload(s) after eviction, {private} private cop{'y' if private == 1 else 'ies'}; "
                f"used {tests} time(s)")

    def to_json(self) -> dict[str, Any]:
        cells = [{k: v for k, v in self.cells[key].items() if k not in ("key", "baseline_key")}
                 for key in sorted(self.cells)]
        return {**SCHEMA, "cells": sorted(cells, key=lambda c: c["id"]),
                "tests": sorted(self.tests, key=lambda t: t["nodeid"]), "notes": list(self.notes),
                **({"coverage": self.coverage} if self.coverage is not None else {})}

    def write(self, path: str) -> None:
        from pytest_llmload._internal.config.options import write_atomically

        write_atomically(path, json.dumps(self.to_json(), indent=2) + "\n")

    def table(self) -> str:
        header = ("cell", "loads", "load s", "footprint", "per device", "hops", "tests")
        rows = []
        for cell in sorted(self.cells.values(), key=lambda c: c["id"]):
            devices = ", ".join(f"{d} {format_size(b)}" for d, b in cell.get("bytes_per_device", {}).items())
            extra = [f"{cell['reloads']} reload" if cell["reloads"] else "",
                     f"{cell['private_loads']} private" if cell["private_loads"] else ""]
            loads = str(cell["loads"]) + (f" ({', '.join(e for e in extra if e)})" if any(extra) else "")
            rows.append((cell["id"], loads, f"{cell['load_seconds']:.2f}",
                         format_size(cell.get("footprint_bytes", 0)), devices, str(cell.get("device_hops", "-")),
                         str(cell["tests"])))
        from pytest_llmload._internal.tables import format_table

        return format_table(header, rows)


class Reporter:
    """The plugin object that carries loads, strict-mode failures and test peaks from every process to
    the controller, writes ``--llm-report`` and the baseline at the end, and prints the summary."""

    def __init__(self, config, options, baseline) -> None:
        self.config = config
        self.options = options
        self.baseline = baseline
        self.report = LoadReport()
        self.is_worker = hasattr(config, "workerinput")
        self.pending_loads: list[dict[str, Any]] = []
        self.used: set[str] = set()
        self.missing: dict[str, str] = {}  # nodeid -> reason, in the process that ran the test
        self.missing_hardware: dict[str, tuple[str, str]] = {}  # nodeid -> (word, reason), merged
        self.regressions: dict[str, str] = {}
        self.written: list[str] = []
        self.pending_notes: list[str] = []  # notes for the report (how xdist split cells), sent with the next report
        self.worker_name = os.environ.get("PYTEST_XDIST_WORKER", "main")  # "rankR" under a launcher

    # -- what the running process records ---------------------------------------------------------
    def record_load(self, entry) -> None:
        load = describe_load(entry.model, entry.record)
        load["baseline_key"] = entry.record.spec.portable_key(self.config.rootpath)
        self.pending_loads.append(load)
        if self.baseline is not None:
            message = self.baseline.regression(load["baseline_key"], load["id"], load["footprint_bytes"])
            if message:
                self.regressions[load["key"]] = message

    def add_note(self, note: str) -> None:
        """A line for the load report's summary and JSON ``notes``, from this process."""
        self.pending_notes.append(note)

    def note_use(self, spec) -> str | None:
        """The running test used ``spec``'s model; returns its footprint regression message, if any."""
        key = spec.key
        self.used.add(key)
        return self.regressions.get(key)

    # -- transport to the controller ----------------------------------------------------------------
    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item, call):
        report = yield
        self.attach(item, report)
        return report

    def attach(self, item, report) -> None:
        """Put this process's news on the test report (strict-mode failures, the test's peaks, loads)."""
        if report.failed and item.nodeid in self.missing:
            report.user_properties.append((MISSING_PROPERTY, self.missing.pop(item.nodeid)))
        if report.when == "call":
            recorder = getattr(item, "funcargs", {}).get("llm_memory")
            if recorder is not None and hasattr(recorder, "usage"):
                usage = recorder.usage
                report.user_properties.append((MEMORY_PROPERTY, json.dumps({
                    "nodeid": item.nodeid, "cpu_peak_delta": usage.cpu_peak_delta,
                    "gpu_allocated_peak": usage.gpu_allocated_peak, "gpu_reserved_peak": usage.gpu_reserved_peak,
                    "gpu_used": usage.gpu_used, "seconds": round(usage.seconds, 4)})))
        while self.pending_notes:
            report.user_properties.append((NOTE_PROPERTY, self.pending_notes.pop(0)))
        if report.when == "teardown" and (self.pending_loads or self.used):
            payload = {"loads": self.pending_loads, "used": sorted(self.used),
                       "worker": self.worker_name}
            report.user_properties.append((PROPERTY, json.dumps(payload)))
            self.pending_loads, self.used = [], set()

    def pytest_runtest_logreport(self, report) -> None:
        for name, value in report.user_properties:
            if name == PROPERTY and report.when == "teardown":
                payload = json.loads(value)
                self.report.add(payload, payload.get("worker", "main"))
            elif name == MISSING_PROPERTY:
                word = "ERROR" if report.when in ("setup", "teardown") else "FAILED"
                self.missing_hardware.setdefault(report.nodeid, (word, value))
            elif name == MEMORY_PROPERTY and report.when == "call":
                self.report.tests.append(json.loads(value))
            elif name == NOTE_PROPERTY and value not in self.report.notes:
                self.report.notes.append(value)

    # -- the end of the session ---------------------------------------------------------------------
    def pytest_sessionfinish(self, session) -> None:
        """Write the report (always, also when nothing loaded or the terminal is off) and the baseline."""
        if self.is_worker:
            return
        if self.options.report:
            self.report.write(self.options.report)
            self.written.append(f"llmload: report written to {self.options.report}")
        if self.baseline is not None:
            self.baseline.write(list(self.report.cells.values()))

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.is_worker:
            return
        if self.missing_hardware:
            terminalreporter.section("llmload: missing hardware (--llm-require-gpus)", sep="-", red=True)
            for nodeid, (word, reason) in self.missing_hardware.items():
                terminalreporter.write_line(f"{word} {nodeid}: {reason}")
        if self.report.cells:
            terminalreporter.section("llmload: load report", sep="-")
            terminalreporter.write_line(self.report.totals())
            terminalreporter.write_line(self.report.table())
        for note in self.report.notes:
            terminalreporter.write_line(f"llmload: {note}")
        for line in self.written:
            terminalreporter.write_line(line)
