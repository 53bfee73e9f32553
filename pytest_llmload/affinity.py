"""Cell affinity under pytest-xdist: each matrix cell's tests go to one worker, so each cell loads once.

It uses xdist's own scheduling: the plugin marks llm tests with ``xdist_group`` (one group per cell)
and, when the user did not choose a ``--dist`` mode, asks for ``--dist loadgroup``. With fewer cells
than workers, a cell's tests are split into as few groups as keep every worker busy.
"""

from __future__ import annotations

import hashlib
import math
import os
import shlex
from typing import Any

import pytest

GROUP_PREFIX = "llmload-"


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


def choose_distribution(config: pytest.Config) -> str | None:
    """On the xdist controller: ``--dist loadgroup`` unless the user chose a mode. Returns the header note."""
    if hasattr(config, "workerinput") or not config.pluginmanager.hasplugin("xdist"):
        return None
    if not getattr(config.option, "numprocesses", None) or getattr(config.option, "dist", "no") == "no":
        return None
    if user_chose_dist(config):
        if config.option.dist == "loadgroup":
            return "llmload: --dist loadgroup: each cell's tests go to one worker"
        return (f"llmload: --dist {config.option.dist} (your choice) is kept: any worker may load any cell; "
                "leave --dist out for one load per cell")
    config.option.dist = "loadgroup"
    config.option.loadgroup = True
    return "llmload: --dist loadgroup (chosen by pytest-llmload): each cell's tests go to one worker"


def group_items(items: list[pytest.Item], spec_of, workers: int) -> dict[Any, int]:
    """Mark each llm test with the ``xdist_group`` of its cell; returns the number of groups per cell.

    With fewer cells than workers, each cell's tests are cut into ``ceil(workers / cells)`` contiguous
    groups (at most one per test), so that every worker has work and a cell loads on as few as possible.
    """
    by_cell: dict[Any, list[pytest.Item]] = {}
    for item in items:
        spec = spec_of(item)
        if spec is not None:
            by_cell.setdefault(spec, []).append(item)
    if not by_cell:
        return {}
    parts = max(1, math.ceil(workers / len(by_cell)))
    counts = {}
    for spec, cell_items in by_cell.items():
        digest = hashlib.sha1(repr((spec.model, spec.device_map_spec.key, spec.precision, spec.max_memory))
                              .encode()).hexdigest()[:10]
        n = min(parts, len(cell_items))
        size = math.ceil(len(cell_items) / n)
        for index, item in enumerate(cell_items):
            name = f"{GROUP_PREFIX}{spec.id}-{digest}" + (f"-part{index // size}" if n > 1 else "")
            item.add_marker(pytest.mark.xdist_group(name=name))
        counts[spec] = n
    return counts


class Affinity:
    """The plugin object: chooses the distribution on the controller, groups llm tests on the workers."""

    def __init__(self, config: pytest.Config, spec_of) -> None:
        self.config = config
        self.spec_of = spec_of
        self.note = choose_distribution(config)
        self.split_note: str | None = None

    def pytest_report_header(self, config: pytest.Config) -> str | None:
        return self.note

    @pytest.hookimpl(tryfirst=True)  # before xdist's worker adds the group to each node id
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        workerinput = getattr(config, "workerinput", None)
        if workerinput is None or not config.getvalue("loadgroup"):
            return
        workers = int(workerinput.get("workercount", 1))
        counts = group_items(items, self.spec_of, workers)
        split = {spec: n for spec, n in counts.items() if n > 1}
        if split:
            self.split_note = (f"{len(counts)} cell(s) for {workers} workers: each cell's tests were split over "
                               f"{max(split.values())} workers, so those cells load once per worker that runs them")
