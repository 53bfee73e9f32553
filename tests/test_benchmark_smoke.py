"""The benchmark script runs end to end on tiny sizes (its timed figures are not asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"


def test_benchmark_runs_on_tiny_sizes():
    out = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--repeat", "1", "--json"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads(out.stdout)
    names = [row["name"] for row in data["rows"]]
    for prefix in ("start-up", "load 0M fp32", "load 0M int8", "reuse", "release", "planner: 70B", "strategies",
                   "xdist -n 2", "load process", "llmload --help", "leak check per test"):
        assert any(n.startswith(prefix) for n in names), (prefix, names)
    for row in data["rows"]:
        if "min" in row:  # timed figures; calibration rows are a prediction and a measurement
            assert row["min"] <= row["median"] <= row["max"]
        if "target" in row:
            assert isinstance(row["met"], bool)
    calibration = {row["name"]: row for row in data["rows"] if row["name"].startswith("calibration: ")}
    for kind in ("fit", "footprint", "plan", "train"):
        rows = [row for name, row in calibration.items() if name.startswith(f"calibration: {kind} ")]
        assert len(rows) >= 5, (kind, list(calibration))
        if kind != "train":  # the fit need never under what a load allocates, plans equal the loads
            assert all(row["met"] for row in rows), [row for row in rows if not row["met"]]
    reuse = next(r for r in data["rows"] if r["name"].startswith("reuse: 60 tests/3 cells vs hand"))
    assert "loads per run: [3]" in reuse["note"]  # the non-timed claims: 60 tests, 3 loads;
    for workers in ("2", "4"):  # and 4 cells under xdist, each loaded by one worker
        row = next(r for r in data["rows"] if r["name"] == f"xdist -n {workers}: loads of 4 cells x 10 tests")
        assert row["median"] == 4 and row["met"], row


def test_an_unknown_step_in_only_is_named_before_anything_runs():
    out = subprocess.run([sys.executable, str(SCRIPT), "--only", "virtual,virtaul"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert "unknown --only step(s) 'virtaul'; expected some of startup,load," in out.stderr
