"""``--llm-coverage``: which tests run on which GPU CI runner, decided without loading or running anything.

Each runner profile (``cpu`` or ``NxSIZE[@CAPABILITY]``) becomes an :class:`~pytest_llmload._internal.hardware.Inventory`
of empty cards, and every collected test (each matrix cell) goes through the checks a real run makes:
the plugin's markers, the cell's hardware reasons, its custom map, and the fit check planned from the
config on the meta device. A GPU runner has bitsandbytes' cuda backend, the cpu runner its cpu backend.
Nothing loads: the checks read configs (once per cell and runner shape) and safetensors headers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from pytest_llmload.errors import LLMLoadError, LLMLoadUsageError
from pytest_llmload._internal.hardware import GPU, Inventory

ACCEPTED = "cpu or NxSIZE[@MAJOR.MINOR] such as 1x24GiB or 2x80GiB@9.0, comma-separated (ASCII digits)"
RUN, SKIP, FAIL = "run", "skip", "fail"
_HOST_RAM = 2**50  # a runner's RAM is not part of its profile: cpu placements are not fit-checked


@dataclass(frozen=True)
class Runner:
    label: str
    gpus: tuple[GPU, ...] = ()

    def inventory(self) -> Inventory:
        from pytest_llmload._internal.hardware.bnb import installed_version

        version = installed_version()
        return Inventory(self.gpus, version, ("cuda" if self.gpus else "cpu") if version else None,
                         None if version else "not installed", source="runner")


def parse_runners(text: str) -> list[Runner]:
    """``"cpu,1x24GiB,2x80GiB@9.0"`` -> runner profiles (a bad one is one usage-error line). Each GPU runner is
    an item of the one card-spec grammar; two runners that parse to the same cards are one runner named twice."""
    from pytest_llmload._internal.config.numbers import parse_cards

    runners: list[Runner] = []
    seen: dict[object, str] = {}
    for raw in text.split(","):
        item = raw.strip()
        if item.lower() == "cpu":
            key: object = "cpu"
            runner = Runner("cpu")
        else:
            (group,) = parse_cards(item, "--llm-coverage runner", accepted=ACCEPTED)
            key = group  # two spellings of the same cards are one runner
            runner = Runner(item, tuple(GPU(i, f"{item} runner", group.size, group.size, group.capability)
                                        for i in range(group.count)))
        if key in seen:
            again = f"{item!r} is {seen[key]!r}" if item != seen[key] else repr(item)
            raise LLMLoadUsageError(f"invalid --llm-coverage value {text!r}: runner {again} named twice")
        seen[key] = item
        runners.append(runner)
    return runners


class CoverageEvaluator:
    """The verdict of one test on one runner; plans are cached per cell and runner shape."""

    def __init__(self, options) -> None:
        self.options = options
        self._needs: dict[Any, Any] = {}
        self._bounds: dict[Any, Any] = {}
        self._maps: dict[Any, list[str]] = {}
        self._inventories: dict[Runner, Inventory] = {}

    def evaluate(self, item: pytest.Item, runner: Runner) -> tuple[str, str]:
        """``(run|skip|fail, reason)``; ``fail`` is what fails on every runner (bad markers, broken maps)."""
        from pytest_llmload._internal.distributed import launched_world, tp_reasons, world_size_reasons
        from pytest_llmload._internal.hardware import bitsandbytes_reasons, cell_reasons, gpu_reasons
        from pytest_llmload._internal.config.marks import MARKERS, parsed_marks
        from pytest_llmload._internal.session.matrix import item_spec
        from pytest_llmload._internal.config.specs import unique

        if runner not in self._inventories:
            self._inventories[runner] = runner.inventory()
        inventory = self._inventories[runner]
        reasons: list[str] = []
        try:
            parsed = [(name, value) for name in MARKERS for value in parsed_marks(item, name)]
        except LLMLoadUsageError as exc:
            return FAIL, str(exc)
        for name, value in parsed:
            if name == "virtual_gpus":  # the test brings its own (CPU-backed) cards: they are what it sees
                gpus = tuple(GPU(i, c.name, c.total_memory, c.total_memory, c.capability) for i, c in enumerate(value))
                inventory = Inventory(gpus, inventory.bitsandbytes_version, "cpu" if inventory.bitsandbytes_version
                                      else None, inventory.bitsandbytes_error, "virtual")
                break
        world = launched_world({})
        for name, value in parsed:
            if name == "requires_gpus":
                reasons += gpu_reasons(inventory, *value)
            elif name == "requires_bitsandbytes":
                reasons += bitsandbytes_reasons(inventory)
            elif name == "requires_world_size":
                reasons += world_size_reasons(world, value)
        spec = item_spec(item)
        if spec is not None:
            from pytest_llmload._internal.loading.placement import cell_placement

            problem = cell_placement(spec).quantized_problem(spec.precision)
            if problem:
                reasons.append(problem)
            reasons += cell_reasons(spec, inventory)
            if spec.device_map_spec.kind == "tp":
                reasons += tp_reasons(world)
            if not reasons:
                problems = self._map_problems(spec, inventory.count)
                if problems:
                    return FAIL, f"device map {spec.device_map_spec.label} does not fit {spec.model}: " + \
                        "; ".join(problems)
                reasons += self._fit_reasons(spec, inventory)
        if reasons:
            return SKIP, "; ".join(unique(reasons))
        return RUN, ""

    def _map_problems(self, spec, gpus: int) -> list[str]:
        if spec.device_map_spec.kind != "custom":
            return []
        key = (spec, gpus)
        if key not in self._maps:
            from pytest_llmload._internal.planning.validation import validate_device_map

            try:
                self._maps[key] = validate_device_map(spec.model_spec, spec.device_map, gpus=gpus)
            except LLMLoadError:
                self._maps[key] = []
        return self._maps[key]

    def _fit_reasons(self, spec, inventory: Inventory) -> list[str]:
        """The fit check on the runner's empty cards (GPU runners; a runner's RAM is not in its profile)."""
        from pytest_llmload._internal.planning.fit_check import (
            DEFAULT_CUDA_CONTEXT,
            cell_need,
            fit_problems,
            weights_upper_bound,
        )

        margin = self.options.fit_margin
        if margin is None or not inventory.gpus or inventory.source == "virtual":
            return []
        free: dict[int | str, int] = {g.index: g.free_memory for g in inventory.gpus}
        context = {g.index: self.options.cuda_context or DEFAULT_CUDA_CONTEXT for g in inventory.gpus}
        try:
            if spec not in self._bounds:
                self._bounds[spec] = weights_upper_bound(spec)
            bound = self._bounds[spec]
            if bound is not None and not fit_problems({d: bound for d in free}, free, margin=margin,
                                                      context_bytes=context):
                return []  # the whole model fits on any one card: no plan needed
            shape = (spec, tuple(sorted(free.items(), key=str)))
            if shape not in self._needs:
                self._needs[shape] = cell_need(spec, {**free, "cpu": _HOST_RAM})
            need = {d: b for d, b in self._needs[shape].items() if d != "cpu"}
        except LLMLoadError:
            return []  # a broken config: the load reports it
        return fit_problems(need, free, margin=margin, context_bytes=context)


class Coverage:
    """The plugin object of ``--llm-coverage``: evaluates after collection, runs nothing, prints the table."""

    def __init__(self, config: pytest.Config, options, reporter) -> None:
        self.config = config
        self.options = options
        self.runners: list[Runner] = options.coverage
        self.reporter = reporter
        self.rows: list[tuple[str, list[tuple[str, str]]]] = []
        if getattr(config.option, "dist", "no") != "no":  # evaluated here: no xdist workers to start
            config.option.dist = "no"
            config.option.tx = []
            config.option.numprocesses = 0

    @pytest.hookimpl(trylast=True)
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        evaluator = CoverageEvaluator(self.options)
        self.rows = [(item.nodeid, [evaluator.evaluate(item, r) for r in self.runners]) for item in session.items]
        self.reporter.report.coverage = self.to_json()

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session: pytest.Session) -> bool:
        return True  # run nothing

    def unrun(self) -> list[tuple[str, list[tuple[str, str]]]]:
        return [(nodeid, verdicts) for nodeid, verdicts in self.rows if all(v != RUN for v, _ in verdicts)]

    def word(self, verdict: str) -> str:
        if verdict == SKIP and self.options.require_gpus:
            return "FAIL (strict)"
        return {RUN: "run", SKIP: "skip", FAIL: "FAIL"}[verdict]

    def to_json(self) -> dict[str, Any]:
        return {
            "runners": [r.label for r in self.runners],
            "strict": bool(self.options.require_gpus),
            "unrun": [nodeid for nodeid, _ in self.unrun()],
            "tests": [{"nodeid": nodeid, "runners": {r.label: {"verdict": v, "reason": why}
                                                     for r, (v, why) in zip(self.runners, verdicts)}}
                      for nodeid, verdicts in self.rows],
        }

    def lines(self) -> list[str]:
        from pytest_llmload._internal.tables import format_table

        lines: list[str] = []
        unrun = self.unrun()
        lines.append(f"tests no runner runs: {len(unrun)} of {len(self.rows)}")
        for nodeid, verdicts in unrun:
            reasons = "; ".join(f"{r.label}: {why}" for r, (v, why) in zip(self.runners, verdicts))
            lines.append(f"  {nodeid} ({reasons})")
        notes: dict[str, int] = {}
        table = []
        for nodeid, verdicts in self.rows:
            cells = []
            for verdict, why in verdicts:
                text = self.word(verdict)
                if why:
                    number = notes.setdefault(why, len(notes) + 1)
                    text += f" [{number}]"
                cells.append(text)
            table.append((nodeid, *cells))
        lines.append("")
        lines.extend(format_table(("test", *[r.label for r in self.runners]), table).splitlines())
        for why, number in notes.items():
            lines.append(f"[{number}] {why}")
        runs = [sum(verdicts[i][0] == RUN for _, verdicts in self.rows) for i in range(len(self.runners))]
        lines.append("runs per runner: " + ", ".join(f"{r.label} {n}" for r, n in zip(self.runners, runs)))
        return lines

    def pytest_terminal_summary(self, terminalreporter) -> None:
        terminalreporter.section("llmload: coverage (nothing was run)", sep="-")
        for line in self.lines():
            terminalreporter.write_line(line)
        if self.unrun() and not self.options.coverage_allow_unrun:
            terminalreporter.write_line(
                f"llmload: {len(self.unrun())} test(s) run on no runner: exit code 1 "
                "(--llm-coverage-allow-unrun to only report)", red=True)

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus) -> None:
        if self.unrun() and not self.options.coverage_allow_unrun and session.exitstatus in (0, 5):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

