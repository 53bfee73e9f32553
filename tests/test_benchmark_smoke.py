"""The benchmark script runs end to end on tiny sizes (its timed figures are not asserted here)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"
GPU_CHECK = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.sh"


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
        # the fit need never under what a load allocates, plans equal the loads, the training estimate (each
        # term, the activations and the peak) within 15% of two AdamW steps on a virtual card
        assert all(row["met"] for row in rows), [row for row in rows if not row["met"]]
    assert sum(name.endswith(": activations") for name in calibration) >= 16, list(calibration)
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


def test_gpu_check_plans_every_step_within_6_minutes_and_skips_them_without_a_gpu(tmp_path):
    """scripts/gpu_check.sh (issue 26): its plan has every step, the limits add up to at most 360 s, and on a
    machine without a GPU it says each step is skipped and exits 0."""
    assert subprocess.run(["bash", "-n", str(GPU_CHECK)]).returncode == 0
    plan = subprocess.run(["bash", str(GPU_CHECK), "--plan"], capture_output=True, text=True, timeout=60)
    assert plan.returncode == 0, plan.stderr
    steps = dict(re.findall(r"^  ([a-z-]+) (\d+)$", plan.stdout, re.M))
    assert list(steps) == ["gpu-tests", "calibration", "examples", "hermetic", "maps-emulation", "fleet-beside-cuda",
                           "real-vs-virtual"], plan.stdout
    setup = int(re.search(r"setup (\d+)", plan.stdout).group(1))
    assert setup + sum(map(int, steps.values())) <= 360
    text = GPU_CHECK.read_text()
    for needed in ("calibration.py --device cuda", "--llm-device-map=auto", "--llm-device-map=cuda:0",
                   "--llm-device-map=sequential", "--llm-precision=nf4", "--llm-require-gpus", '"disk"',
                   "--llm-emulate-gpu=", "limit_gpu_memory", "tests/test_virtual_gpus.py", "real_vs_virtual.py"):
        assert needed in text, needed
    import torch

    if torch.cuda.is_available() or shutil.which("nvidia-smi"):
        return  # a GPU machine would run it for real (6 minutes): the plan is what is checked here
    run = subprocess.run(["bash", str(GPU_CHECK)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable})
    assert run.returncode == 0, run.stdout + run.stderr
    assert "every step skipped" in run.stdout
    assert re.findall(r"skipped: ([a-z-]+) \(needs a CUDA GPU\)", run.stdout) == list(steps)
    assert 1 <= len(list(tmp_path.iterdir())) <= 8
