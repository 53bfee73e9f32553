"""The plugin object that runs a suite under torchrun / accelerate launch (``llm_dist`` is in fixtures.py)."""

from __future__ import annotations

import json
import os

import pytest

from pytest_llmload.errors import LLMLoadUsageError
from pytest_llmload._internal.distributed.lockstep import (
    END,
    PREFIX,
    Lockstep,
    collective_timeout_problem,
    failure_line,
    merge_exit_status,
    merge_rank_loads,
)
from pytest_llmload._internal.distributed.world import (
    SESSION_TIMEOUT,
    init_process_group,
    launched_world,
    tp_plan_problem,
    tp_reasons,
    world_size_reasons,
)

# -- the plugin object ------------------------------------------------------------------------------

class DistPlugin:
    """Registered on every run; does nothing unless a launcher started two or more processes."""

    def __init__(self, config: pytest.Config, session) -> None:
        self.config = config
        self.session = session
        self.world = launched_world()
        self.timeout = session.options.dist_timeout
        SESSION_TIMEOUT[0] = self.timeout
        self.active = self.world.launched and not hasattr(config, "workerinput")
        self.lockstep: Lockstep | None = None
        self.created_group = False
        self.payloads: list[dict] = []
        self.failures: list[str] = []
        self._out = None
        if self.active:
            self.session.reporter.worker_name = f"rank{self.world.rank}"
            if self.world.rank != 0:  # only rank 0 writes --llm-report, the baseline and the summary
                self.session.reporter.is_worker = True
        self.exitstatus = 0
        self._devnull = None

    # -- start-up --
    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionstart(self, session) -> None:
        if not self.active:
            return
        terminal = self.config.pluginmanager.get_plugin("terminalreporter")
        if terminal is not None and self.world.rank != 0:
            # ranks other than 0 print one line per failure, not the whole report
            from _pytest.config import create_terminal_writer

            self._out = terminal._tw
            self._devnull = open(os.devnull, "w")
            terminal._tw = create_terminal_writer(self.config, self._devnull)
        import torch.distributed as dist

        try:
            self.created_group = init_process_group(self.timeout)
        except Exception as exc:  # noqa: BLE001 - a broken rendezvous: one line, not a traceback
            raise pytest.UsageError(f"llmload: cannot join the launched world (rank {self.world.rank} of "
                                    f"{self.world.world_size}): {type(exc).__name__}: {exc}") from None
        from pytest_llmload._internal.compat.torch import default_store

        self.lockstep = Lockstep(dist.PrefixStore(PREFIX, default_store()), self.world, self.timeout)

    # -- each test --
    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem):
        if self.lockstep is None:
            return None
        line = self.lockstep.checkin(item.nodeid)
        if line is None:
            return None
        item.session.shouldstop = line
        self._print(line, everywhere=False)  # rank 0's terminal says it as "Interrupted: ..."
        return True  # the test does not run: the session stops after it

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        """``requires_world_size`` and ``tp`` cells: skip (or fail in strict mode) with the reason."""
        from pytest_llmload._internal.config.marks import parsed_marks

        reasons: list[str] = []
        try:
            for n in parsed_marks(item, "requires_world_size"):
                reasons += world_size_reasons(self.world, n)
        except LLMLoadUsageError as exc:
            raise pytest.fail.Exception(str(exc), pytrace=False) from None
        callspec = getattr(item, "callspec", None)
        spec = callspec.params.get("llm_spec") if callspec is not None else None
        if spec is not None and getattr(spec.device_map_spec, "kind", None) == "tp":
            reasons += tp_reasons(self.world)
            if not reasons:
                problem = self._plan_problem(spec)
                if problem:
                    reasons.append(problem)
        self.session.gate.missing_hardware(item.nodeid, reasons)

    def _plan_problem(self, spec) -> str | None:
        from pytest_llmload.errors import LLMLoadError
        from pytest_llmload._internal.loading.files import load_config, model_class_for

        try:
            config = load_config(spec.model_spec, trust_remote_code=self.session.options.trust_remote_code)
            return tp_plan_problem(spec.model, config, model_class_for(config))
        except LLMLoadError:
            return None  # the load reports a broken config, naming the file

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item, call):
        report = yield
        if self.lockstep is not None and report.failed:
            first = failure_line(self.world.rank, report).split(" - ", 1)
            self.lockstep.note_failure(f"{item.nodeid} ({report.when})" + (f": {first[1]}" if len(first) > 1 else ""))
            others = self.lockstep.other_failures(item.nodeid)
            if others:
                report.sections.append(("llmload: other ranks", "\n".join(
                    f"rank {r} failed {text}" for r, text in sorted(others.items()))))
            line = collective_timeout_problem(item.nodeid, str(report.longrepr), self.world.rank, others)
            if line is not None:
                item.session.shouldstop = self.lockstep.stop(line)
                self._print(item.session.shouldstop, everywhere=False)
        return report

    def pytest_runtest_logreport(self, report) -> None:
        if not self.active:
            return
        from pytest_llmload._internal.session.report import PROPERTY

        if report.when == "teardown":
            self.payloads += [json.loads(v) for k, v in report.user_properties if k == PROPERTY]
        if report.failed:
            line = failure_line(self.world.rank, report)
            self.failures.append(line)
            if self.world.rank != 0:
                self._print(line)

    # -- the end --
    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session, exitstatus) -> None:
        if self.lockstep is None:
            return
        self.exitstatus = int(session.exitstatus)
        why = session.shouldfail or session.shouldstop
        line = self.lockstep.checkin(f"{END[:-1]}: {why})" if why else END)
        if line is not None:
            if not session.shouldstop:
                self._print(line)
            session.exitstatus = max(int(session.exitstatus), 1) if int(session.exitstatus) in (0, 5) \
                else session.exitstatus
            self.exitstatus = int(session.exitstatus)
            return
        mine = {"status": int(session.exitstatus), "loads": self.payloads if self.world.rank else [],
                "failures": self.failures}
        everyone = self.lockstep.exchange(mine)
        if everyone is None:
            self._print(f"llmload: not every rank reached the end of the session within {self.timeout:g} s")
            session.exitstatus = max(int(session.exitstatus), 1)
            self.exitstatus = int(session.exitstatus)
            return
        session.exitstatus = merge_exit_status({r: p["status"] for r, p in everyone.items()})
        self.exitstatus = int(session.exitstatus)
        if self.world.rank == 0:
            reporter = self.session.reporter
            merge_rank_loads(reporter.report, {r: p["loads"] for r, p in everyone.items() if r != 0})
            for cell in reporter.report.cells.values():
                cell["world_size"] = self.world.world_size
            reporter.report.notes.append(
                f"distributed: world size {self.world.world_size}; report merged from every rank")
            self.other_failures = [f for r, p in sorted(everyone.items()) if r != 0 for f in p["failures"]]

    other_failures: list[str] = []

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.active and self.world.rank == 0 and self.other_failures:
            terminalreporter.section("llmload: failures on other ranks", sep="-", red=True)
            for line in self.other_failures:
                terminalreporter.write_line(line)

    def close(self) -> None:
        if self.lockstep is not None:
            self.lockstep.finish(failed=self.exitstatus != 0)
            self.lockstep = None
        if getattr(self, "_devnull", None) is not None:
            self._devnull.close()
            self._devnull = None
        if self.created_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        self.created_group = False

    def _print(self, line: str, everywhere: bool = True) -> None:
        if not everywhere and self.world.rank == 0:
            return
        if self._out is not None:
            self._out.line(line)
            self._out.flush()
        else:
            terminal = self.config.pluginmanager.get_plugin("terminalreporter")
            if terminal is not None:
                terminal.write_line(line)
