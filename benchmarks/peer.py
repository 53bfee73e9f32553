"""A peer's own multi-GPU tests as the yardstick of the virtual fleet (issue 22).

Takes accelerate's GPU-gated test files from a mirror of its repository (a git directory; the tag of the
installed accelerate where the mirror has it), into a temporary folder that is removed afterwards (none of
its code is kept), and runs each file plainly and on virtual fleets. Prints per file: passed / failed /
skipped in each run, and the tests a fleet newly ran (skipped plainly) with how they ended.

    python benchmarks/peer.py --repo /path/to/accelerate.git [--fleets 2x24GiB,2x1GiB] [--files ...]

It runs outside CI (minutes, and a fetched mirror). accelerate's tests need ``parameterized``
(``pip install parameterized``); a file that cannot be collected shows as one error in every run.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

FILES = ["test_big_modeling.py", "test_modeling_utils.py", "test_hooks.py", "test_utils.py",
         "test_memory_utils.py", "test_offload.py"]


def extract_tests(repo: str, into: Path) -> str:
    """``tests/`` of the mirror at the installed accelerate's tag (else HEAD) into ``into``; returns the ref."""
    version = importlib.metadata.version("accelerate")
    tags = subprocess.run(["git", "--git-dir", repo, "tag"], capture_output=True, text=True, check=True).stdout.split()
    ref = f"v{version}" if f"v{version}" in tags else "HEAD"
    archive = subprocess.run(["git", "--git-dir", repo, "archive", "--format=tar", ref, "tests"],
                             capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return ref


def outcomes(junit: Path) -> dict[str, tuple[str, str]]:
    """test id -> (outcome, first line of the message) from a junit XML report."""
    result: dict[str, tuple[str, str]] = {}
    if not junit.exists():
        return result
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                message = (child.get("message") or "").strip().splitlines()[0][:140] if child.get("message") else ""
                break
        result[name] = (outcome, message)
    return result


def run(folder: Path, test_file: str, extra: list[str], junit: Path, timeout: int) -> dict[str, tuple[str, str]]:
    cmd = [sys.executable, "-m", "pytest", f"tests/{test_file}", "-q", "-p", "no:cacheprovider",
           f"--junitxml={junit}", *extra]
    try:
        subprocess.run(cmd, cwd=folder, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    return outcomes(junit)


def count(results: dict[str, tuple[str, str]]) -> str:
    tally = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    for outcome, _ in results.values():
        tally[outcome] += 1
    return f"{tally['passed']}/{tally['failed'] + tally['error']}/{tally['skipped']}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", required=True, help="a git directory of accelerate's repository (a mirror)")
    parser.add_argument("--fleets", default="2x24GiB,2x1GiB", help="comma-separated fleet specs")
    parser.add_argument("--files", nargs="*", default=FILES)
    parser.add_argument("--timeout", type=int, default=600, help="seconds per file and run")
    args = parser.parse_args(argv)
    fleets = [f for f in args.fleets.split(",") if f]
    with tempfile.TemporaryDirectory(prefix="llmload-peer-") as tmp:
        folder = Path(tmp)
        ref = extract_tests(args.repo, folder)
        print(f"accelerate {importlib.metadata.version('accelerate')} tests at {ref}; "
              f"columns: passed/failed/skipped")
        header = f"{'file':28} {'plain':>10} " + " ".join(f"{f:>12}" for f in fleets) + "  newly run (fleet 1): passed of"
        print(header)
        newly_failed: list[str] = []
        totals = [0, 0]
        for test_file in args.files:
            plain = run(folder, test_file, [], folder / "plain.xml", args.timeout)
            on_fleets = [run(folder, test_file, [f"--llm-virtual-gpus={spec}"], folder / f"fleet{i}.xml", args.timeout)
                         for i, spec in enumerate(fleets)]
            first = on_fleets[0] if on_fleets else {}
            newly = [t for t, (o, _) in first.items() if plain.get(t, ("", ""))[0] == "skipped" and o != "skipped"]
            passed = [t for t in newly if first[t][0] == "passed"]
            totals[0] += len(passed)
            totals[1] += len(newly)
            newly_failed += [f"{t}: {first[t][1]}" for t in newly if first[t][0] != "passed"]
            print(f"{test_file:28} {count(plain):>10} " + " ".join(f"{count(r):>12}" for r in on_fleets)
                  + f"  {len(passed)} of {len(newly)}")
        print(f"newly run on {fleets[0] if fleets else '-'}: {totals[0]} of {totals[1]} passed")
        for line in newly_failed:
            print(f"  not passed: {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
