"""The load report: every cell the session met (loaded or not, and why), what it cost, how many tests used
it, and every test's outcome (with its peaks when it used ``llm_memory``).

Workers of pytest-xdist attach what they loaded, and each test's cell, to their test reports
(``user_properties``); outcomes are read from the test reports themselves, so the controller sees every
test and cell; without xdist the same path runs in one process. JSON schema (version 2)::

    {"schema": "pytest-llmload/report", "version": 2,
     "cells": [{"id", "model", "device_map", "precision", "loads", "reloads", "private_loads",
                "load_seconds", "footprint_bytes", "bytes_per_device": {device: bytes}, "device_hops",
                "tests", "notes", "workers", "status", "reasons", "outcomes": {outcome: count}}],
     "tests": [{"nodeid", "cell", "outcome", "reason", "duration",
                (with llm_memory:) "cpu_peak_delta", "gpu_allocated_peak", "gpu_reserved_peak", "gpu_used",
                "seconds"}]}

A cell's ``id`` is the cell part of its tests' ids. ``loads`` counts every ``from_pretrained`` of the cell:
its first (cached) load, ``reloads`` after the cache evicted it, and ``private_loads``
(``llm_private_model`` and ``llm_load(private=True)`` copies). ``status`` is ``loaded``, else ``skipped``,
``failed`` or ``not_loaded`` (its tests ran without loading it), with the skip or failure ``reasons``.
A test's ``outcome`` is pytest's word: passed, failed, error, skipped, xfailed or xpassed.
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
CELL_PROPERTY = "llmload-cell"  # the cell a test runs in, on its setup report
SCHEMA = {"schema": "pytest-llmload/report", "version": 2}
_INTERNAL = ("key", "baseline_key", "baseline_legacy_key", "baseline_maps")  # kept out of the JSON
_RANK = {"passed": 1, "xpassed": 1, "skipped": 2, "xfailed": 2, "failed": 3, "error": 3}


def _reason_text(report) -> str | None:
    """Why a phase was skipped or failed, in one message (pytest's skip message, a failure's crash line)."""
    longrepr = report.longrepr
    if report.skipped and isinstance(longrepr, (tuple, list)) and len(longrepr) == 3:
        message = str(longrepr[2])
        return message[len("Skipped: "):] if message.startswith("Skipped: ") else message
    crash = getattr(longrepr, "reprcrash", None)
    if crash is not None and getattr(crash, "message", None):
        return str(crash.message).strip()
    text = str(longrepr).strip() if longrepr is not None else ""
    return text or None


def phase_outcome(report) -> tuple[str | None, str | None]:
    """A test report's outcome in pytest's words, and its reason (None for a phase that decides nothing)."""
    wasxfail = getattr(report, "wasxfail", None)
    if wasxfail is not None and (report.skipped or (report.passed and report.when == "call")):
        reason = str(wasxfail)
        reason = reason[len("reason: "):] if reason.startswith("reason: ") else reason
        return ("xfailed" if report.skipped else "xpassed"), (reason or None)
    if report.failed:
        return ("failed" if report.when == "call" else "error"), _reason_text(report)
    if report.skipped:
        return "skipped", _reason_text(report)
    if report.passed and report.when == "call":
        return "passed", None
    return None, None


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
    """Cells merged from every process's test reports (loaded or not), and every test's outcome and peaks."""

    def __init__(self) -> None:
        self.cells: dict[str, dict[str, Any]] = {}
        self.tests: dict[str, dict[str, Any]] = {}  # nodeid -> entry
        self.notes: list[str] = []
        self.coverage: dict[str, Any] | None = None  # --llm-coverage: the test x runner verdicts

    def cell(self, info: dict[str, Any]) -> dict[str, Any]:
        """The cell ``info`` describes (``key``, ``id``, ``model``, ``device_map``, ``precision``), made on first
        sight with nothing loaded yet."""
        return self.cells.setdefault(info["key"], {
            "key": info["key"], "id": info["id"], "model": info.get("model"), "device_map": info.get("device_map"),
            "precision": info.get("precision"), "loads": 0, "reloads": 0, "private_loads": 0, "load_seconds": 0.0,
            "footprint_bytes": None, "bytes_per_device": {}, "device_hops": None, "tests": 0, "notes": [],
            "workers": []})

    def test(self, nodeid: str) -> dict[str, Any]:
        return self.tests.setdefault(nodeid, {"nodeid": nodeid, "cell": None, "outcome": None, "reason": None,
                                              "duration": 0.0})

    def add_test_cell(self, nodeid: str, info: dict[str, Any]) -> None:
        """The test ``nodeid`` runs in the cell ``info`` describes (known before its outcome)."""
        self.cell(info)
        entry = self.test(nodeid)
        entry["cell"], entry["_cell_key"] = info["id"], info["key"]

    def add_outcome(self, report) -> None:
        """One phase's report (setup, call, teardown): the test's outcome is its worst phase's, in pytest's
        words (a teardown error after a pass is an error)."""
        entry = self.test(report.nodeid)
        entry["duration"] = round(entry["duration"] + float(getattr(report, "duration", 0) or 0), 4)
        outcome, reason = phase_outcome(report)
        if outcome is not None and _RANK[outcome] > _RANK.get(entry["outcome"], 0):
            entry["outcome"], entry["reason"] = outcome, reason

    def add(self, payload: dict[str, Any], worker: str = "main") -> None:
        for load in payload.get("loads", []):
            cell = self.cell(load)
            if cell["loads"] == 0:  # the first load says what the cell is (its footprint, its placement)
                cell.update({k: v for k, v in load.items() if k not in ("kind", "load_seconds", "bytes_per_device")})
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

    def loaded(self) -> list[dict[str, Any]]:
        """The cells that loaded at least once (what the terminal's load report lists)."""
        return [c for c in self.cells.values() if c["loads"]]

    def totals(self) -> str:
        cells = self.loaded()
        loads = sum(c["loads"] for c in cells)
        reloads = sum(c["reloads"] for c in cells)
        private = sum(c["private_loads"] for c in cells)
        tests = sum(c["tests"] for c in cells)
        return (f"llmload: {loads} load(s) of {len(cells)} cell(s): {loads - reloads - private} first load(s), "
                f"{reloads} reload(s) after eviction, {private} private cop{'y' if private == 1 else 'ies'}; "
                f"used {tests} time(s)")

    def to_json(self) -> dict[str, Any]:
        by_cell: dict[str, list[dict[str, Any]]] = {}
        for entry in self.tests.values():
            if entry.get("_cell_key") is not None:
                by_cell.setdefault(entry["_cell_key"], []).append(entry)
        cells = []
        for key in sorted(self.cells):
            cell = {k: v for k, v in self.cells[key].items() if k not in _INTERNAL}
            tests = by_cell.get(key, [])
            outcomes: dict[str, int] = {}
            for entry in tests:
                if entry["outcome"]:
                    outcomes[entry["outcome"]] = outcomes.get(entry["outcome"], 0) + 1
            if cell["loads"]:
                status = "loaded"
            elif outcomes.get("skipped"):
                status = "skipped"
            elif outcomes.get("failed") or outcomes.get("error"):
                status = "failed"
            else:
                status = "not_loaded"  # its tests ran without loading it (llm_spec alone)
            why = {"skipped": ("skipped",), "failed": ("failed", "error")}.get(status, ())
            reasons = list(dict.fromkeys(e["reason"] for e in tests if e["outcome"] in why and e["reason"]))
            cells.append({**cell, "status": status, "reasons": reasons, "outcomes": dict(sorted(outcomes.items()))})
        tests = [{k: v for k, v in self.tests[nodeid].items() if not k.startswith("_")} for nodeid in sorted(self.tests)]
        return {**SCHEMA, "cells": sorted(cells, key=lambda c: c["id"]), "tests": tests, "notes": list(self.notes),
                **({"coverage": self.coverage} if self.coverage is not None else {})}

    def write(self, path: str) -> None:
        from pytest_llmload._internal.config.options import write_atomically

        write_atomically(path, json.dumps(self.to_json(), indent=2) + "\n")

    def table(self) -> str:
        header = ("cell", "loads", "load s", "footprint", "per device", "hops", "tests")
        rows = []
        for cell in sorted(self.loaded(), key=lambda c: c["id"]):
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
        self.cell_id = lambda spec: spec.id  # the session's: matrix.CellIds, the ids its tests carry

    # -- what the running process records ---------------------------------------------------------
    def record_load(self, entry) -> None:
        load = describe_load(entry.model, entry.record)
        load["id"] = self.cell_id(entry.record.spec)
        if self.baseline is not None:
            from pytest_llmload._internal.session.baseline import cell_keys

            load.update(cell_keys(entry.record.spec, self.config.rootpath))
            message = self.baseline.regression(load["baseline_key"], load["id"], load["footprint_bytes"],
                                               load.get("baseline_legacy_key"))
            if message:
                self.regressions[load["key"]] = message
        self.pending_loads.append(load)

    def cell_info(self, spec) -> dict[str, Any]:
        """A cell as the report names it before (or without) any load."""
        return {"key": spec.key, "id": self.cell_id(spec), "model": spec.model, "device_map": spec.device_map,
                "precision": spec.precision}

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
        """Put this process's news on the test report (the test's cell, strict-mode failures, its peaks, loads)."""
        if report.when == "setup":
            from pytest_llmload._internal.session.matrix import item_spec

            spec = item_spec(item)
            if spec is not None:
                report.user_properties.append((CELL_PROPERTY, json.dumps(self.cell_info(spec))))
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
        """Every phase of every test, in the controller too (xdist replays the workers' reports there)."""
        if self.is_worker:
            return  # the controller reads the same report
        self.report.add_outcome(report)
        for name, value in report.user_properties:
            if name == PROPERTY and report.when == "teardown":
                payload = json.loads(value)
                self.report.add(payload, payload.get("worker", "main"))
            elif name == CELL_PROPERTY and report.when == "setup":
                self.report.add_test_cell(report.nodeid, json.loads(value))
            elif name == MISSING_PROPERTY:
                word = "ERROR" if report.when in ("setup", "teardown") else "FAILED"
                self.missing_hardware.setdefault(report.nodeid, (word, value))
            elif name == MEMORY_PROPERTY and report.when == "call":
                memory = json.loads(value)
                self.report.test(memory.pop("nodeid", report.nodeid)).update(memory)
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
            self.written += self.baseline.write(self.report.loaded())

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.is_worker:
            return
        if self.missing_hardware:
            terminalreporter.section("llmload: missing hardware (--llm-require-gpus)", sep="-", red=True)
            for nodeid, (word, reason) in self.missing_hardware.items():
                terminalreporter.write_line(f"{word} {nodeid}: {reason}")
        if self.report.loaded():
            terminalreporter.section("llmload: load report", sep="-")
            terminalreporter.write_line(self.report.totals())
            terminalreporter.write_line(self.report.table())
        for note in self.report.notes:
            terminalreporter.write_line(f"llmload: {note}")
        for line in self.written:
            terminalreporter.write_line(line)
