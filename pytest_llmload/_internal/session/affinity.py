"""Cell affinity under pytest-xdist: each matrix cell's tests go to one worker, so each cell loads once.

It plugs into xdist's own scheduling (``pytest_xdist_make_scheduler``): when the user did not choose
a ``--dist`` mode, the controller schedules with :class:`CellScheduling`, xdist's ``LoadScopeScheduling``
whose scope of a test is its cell. The workers, which collect, tell the controller each test's cell
through a file in a folder the controller hands them (xdist's own ``--dist loadgroup`` side channel,
rewriting node ids, does not work with pytest 9.2: pytest-dev/pytest-xdist#1386). With fewer cells
than workers, a cell's tests are cut into as few groups as keep every worker busy.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import tempfile
from typing import Any

import pytest

WORKER_KEY = "llmload_cell_groups"


def user_chose_dist(config: pytest.Config) -> bool:
    """Whether ``--dist``/``-d`` was given on the command line, in PYTEST_ADDOPTS or the ini's addopts."""
    args = list(config.invocation_params.args)
    args += shlex.split(os.environ.get("PYTEST_ADDOPTS", ""))
    try:
        args += list(config.getini("addopts"))
    except (ValueError, KeyError):
        pass
    return any(a == "--dist" or a.startswith("--dist=") or a == "-d" or a.startswith("--distload")
               for a in args)


def cell_groups(items: list[pytest.Item], spec_of, workers: int) -> tuple[dict[str, str], dict[Any, int]]:
    """``{nodeid: group}`` for the llm tests, and how many groups each cell was cut into.

    With fewer cells than workers, each cell's tests are cut into ``ceil(workers / cells)`` contiguous
    groups (at most one per test), so that every worker has work and a cell loads on as few as possible.
    """
    by_cell: dict[Any, list[pytest.Item]] = {}
    for item in items:
        spec = spec_of(item)
        if spec is not None:
            by_cell.setdefault(spec, []).append(item)
    groups: dict[str, str] = {}
    counts: dict[Any, int] = {}
    parts = max(1, math.ceil(workers / len(by_cell))) if by_cell else 1
    for number, (spec, cell_items) in enumerate(by_cell.items()):
        n = min(parts, len(cell_items))
        size = math.ceil(len(cell_items) / n)
        for index, item in enumerate(cell_items):
            groups[item.nodeid] = f"llmload-cell-{number}-{spec.id}" + (f"-part{index // size}" if n > 1 else "")
        counts[spec] = n
    return groups, counts


class Affinity:
    """The plugin object: on the controller chooses the scheduler, on the workers tells it the cells."""

    def __init__(self, config: pytest.Config, spec_of, add_note) -> None:
        self.config = config
        self.spec_of = spec_of
        self.add_note = add_note  # the reporter's: the note reaches the controller's report
        self.folder: str | None = None
        self.note = self._choose()

    def _choose(self) -> str | None:
        config = self.config
        if hasattr(config, "workerinput") or not config.pluginmanager.hasplugin("xdist"):
            return None
        if not getattr(config.option, "numprocesses", None) or getattr(config.option, "dist", "no") == "no":
            return None
        if user_chose_dist(config):
            return (f"llmload: --dist {config.option.dist} (your choice) is kept: any worker may load any cell; "
                    "leave --dist out for one load per cell")
        self.folder = tempfile.mkdtemp(prefix="llmload-cells-")
        config.pluginmanager.register(_Controller(self.folder), "llmload-affinity-controller")
        return "llmload: tests scheduled by cell (pytest-llmload): each cell's tests go to one worker"

    def close(self) -> None:
        if self.folder:
            import shutil

            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    def pytest_report_header(self, config: pytest.Config) -> str | None:
        return self.note

    @pytest.hookimpl(trylast=True)  # after the session has regrouped the items
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        workerinput = getattr(config, "workerinput", None)
        folder = (workerinput or {}).get(WORKER_KEY)
        if not folder:
            return
        workers = int(workerinput.get("workercount", 1))
        groups, counts = cell_groups(items, self.spec_of, workers)
        path = os.path.join(folder, f"{workerinput.get('workerid', 'gw')}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(groups, f)
        os.replace(path + ".tmp", path)
        split = [n for n in counts.values() if n > 1]
        if split:
            self.add_note(f"{len(counts)} cell(s) for {workers} workers: each cell's tests were split over "
                          f"{max(split)} workers, so those cells load once per worker that runs them")


class _Controller:
    """Registered on the xdist controller only (so xdist's hooks are known where it is)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def pytest_configure_node(self, node) -> None:
        node.workerinput[WORKER_KEY] = self.folder

    @pytest.hookimpl(tryfirst=True)
    def pytest_xdist_make_scheduler(self, config, log):
        from xdist.scheduler import LoadScopeScheduling

        folder = self.folder

        class CellScheduling(LoadScopeScheduling):
            """xdist's scope scheduling, where the scope of an llm test is its cell (others: the test)."""

            _groups: dict[str, str] | None = None

            def _split_scope(self, nodeid: str) -> str:
                if self._groups is None:
                    self._groups = {}
                    for name in sorted(os.listdir(folder)):
                        if name.endswith(".json"):
                            with open(os.path.join(folder, name)) as f:
                                self._groups.update(json.load(f))
                return self._groups.get(nodeid, nodeid)

        return CellScheduling(config, log)
