"""Distributed cells under ``torchrun`` / ``accelerate launch``: the ``tp`` device map, rank-aware
reporting and the lockstep guard.

Every rank runs the whole suite. :class:`DistPlugin` (registered by ``plugin.pytest_configure``, active
only when the launcher started two or more processes) does four jobs:

- start-up: joins (or reuses) the default process group, gloo on CPU and nccl on GPUs, with
  ``--llm-dist-timeout`` as the collectives' timeout, so a collective that one rank never reaches
  fails after that time instead of hanging;
- lockstep: before each test every rank posts the test id it is about to run to the process group's
  key-value store and waits (bounded) for the others. Different ids, or a rank that does not arrive,
  stop the session on every rank with one line naming the ranks and their tests. The store is a side
  channel: it never pairs with a test's own collectives, and it tells *which* rank did not arrive
  (a gloo ``all_gather_object`` can only time out);
- output: rank 0 prints the full terminal report; other ranks print one line per failure, with their rank;
- the end: every rank posts its loads, failures and exit status; rank 0 merges the loads into the one
  ``--llm-report`` and every rank exits non-zero if any rank failed.

Pure functions (:func:`launched_world`, :func:`lockstep_problem`, :func:`merge_exit_status`,
:func:`merge_rank_loads`...) hold the decisions and are unit-tested without a launcher. Nothing here
imports torch at module level.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any, Mapping

import pytest

from .errors import LLMLoadUsageError
from .specs import is_whole_number

NEEDS_LAUNCHER = "needs torchrun/accelerate launch with >= 2 processes"
END = "(end of session)"
DEFAULT_TIMEOUT = 300.0
_PREFIX = "llmload/"


# -- the launched world, from the environment (pure) ------------------------------------------------

@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def launched(self) -> bool:
        return self.world_size >= 2


def launched_world(env: Mapping[str, str] | None = None) -> World:
    """Rank, world size and local rank as torchrun / accelerate launch set them (a lone process: 0, 1, 0)."""
    env = os.environ if env is None else env

    def number(*names: str, default: int) -> int:
        for name in names:
            value = env.get(name, "").strip()
            if is_whole_number(value):
                return int(value)
        return default

    world_size = max(1, number("WORLD_SIZE", default=1))
    rank = number("RANK", default=0)
    local_rank = number("LOCAL_RANK", "ACCELERATE_LOCAL_PROCESS_INDEX", default=0)
    return World(rank=rank if rank < world_size else 0, world_size=world_size, local_rank=local_rank)


@dataclass(frozen=True)
class DistInfo:
    """What the ``llm_dist`` fixture gives: this process's place in the launched world.

    ``group`` is the default process group (``torch.distributed.group.WORLD``), or None in a lone process.
    """

    rank: int
    world_size: int
    local_rank: int
    group: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# -- the marker ------------------------------------------------------------------------------------

def requires_world_size(n: int) -> int:
    """skip unless launched (torchrun/accelerate launch) with at least n processes"""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise LLMLoadUsageError(f"n must be a whole number >= 1, got {n!r}")
    return n


def world_size_reasons(world: World, n: int) -> list[str]:
    """Why a test that needs ``n`` processes cannot run in ``world`` (empty when it can)."""
    if world.world_size >= n:
        return []
    found = (f"this run has {world.world_size} processes" if world.launched
             else "this run was not started by a launcher (WORLD_SIZE unset or 1)")
    return [f"needs a world size of >= {n} (torchrun --nproc-per-node {n} or accelerate launch "
            f"--num_processes {n}); {found}"]


def tp_reasons(world: World) -> list[str]:
    """Why a ``tp`` cell cannot run in ``world``."""
    if world.launched:
        return []
    return [f"device map tp {NEEDS_LAUNCHER} (WORLD_SIZE is {world.world_size})"]


def tp_plan_problem(model: str, config: Any, cls: Any) -> str | None:
    """Why ``model`` cannot load tensor parallel: neither its config nor its class has a TP plan."""
    if getattr(config, "base_model_tp_plan", None) or getattr(cls, "_tp_plan", None):
        return None
    return (f"device map tp needs a tensor-parallel plan: {model} ({type(config).__name__}) has none "
            "(no base_model_tp_plan in its config); use process, or a model whose config has one")


# -- loading a tp cell --------------------------------------------------------------------------------

def backend_for(cuda: bool) -> str:
    return "nccl" if cuda else "gloo"


def init_process_group(timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Join the launched world's default process group if nobody did yet (gloo on CPU, nccl on GPUs), with
    ``timeout`` for its collectives. Returns whether this call created it."""
    import datetime

    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    world = launched_world()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(world.local_rank % torch.cuda.device_count())
    dist.init_process_group(backend=backend_for(cuda), timeout=datetime.timedelta(seconds=timeout))
    return True


def tp_load_kwargs(model: str, config: Any, cls: Any) -> dict[str, Any]:
    """``from_pretrained`` arguments for a tensor-parallel load over the launched world.

    transformers 5.24 deprecates ``tp_plan=`` on ``from_pretrained`` (a FutureWarning) in favour of
    ``distributed_config=DistributedConfig(tp_plan=...)``, which is what this returns.
    """
    world = launched_world()
    reasons = tp_reasons(world)
    if reasons:
        raise LLMLoadUsageError(reasons[0])
    problem = tp_plan_problem(model, config, cls)
    if problem:
        raise LLMLoadUsageError(problem)
    init_process_group(_active_timeout())
    from transformers.distributed import DistributedConfig

    return {"distributed_config": DistributedConfig(tp_plan="auto")}


_TIMEOUT = [DEFAULT_TIMEOUT]  # the session's --llm-dist-timeout, for loads outside a configured session


def _active_timeout() -> float:
    return _TIMEOUT[0]


def rank_bytes(model) -> tuple[int, int]:
    """(bytes of this rank's shards, bytes of the whole model): DTensors count their local part."""
    local = total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        size = tensor.element_size()
        total += tensor.nelement() * size
        local_tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        local += local_tensor.nelement() * size
    return local, total


def rank_view(model, per_device: dict[str, int], footprint: int) -> tuple[dict[str, int], dict[str, Any]]:
    """Under a launcher: per-device bytes keyed ``rankR:device`` (a tp rank counts only its shards) and the
    world size, for the load report. A lone process: unchanged."""
    world = launched_world()
    if not world.launched:
        return per_device, {}
    extra: dict[str, Any] = {"world_size": world.world_size}
    if any(hasattr(p, "to_local") for p in model.parameters()):
        local, _ = rank_bytes(model)
        device = next(iter(per_device), "cpu")
        per_device = {device: local}
        extra["tensor_parallel"] = True
    return {f"rank{world.rank}:{d}": b for d, b in per_device.items()}, extra


# -- lockstep and the end of the session (pure decisions) ----------------------------------------------

def lockstep_problem(ids: Mapping[int, str], seq: int) -> str | None:
    """One line when the ranks are not about to run the same test (``ids``: rank -> test id), else None."""
    if len({END if test.startswith(END[:-1]) else test for test in ids.values()}) <= 1:
        return None  # every rank at the end, whatever stopped it
    groups: dict[str, list[int]] = {}
    for rank in sorted(ids):
        groups.setdefault(ids[rank], []).append(rank)
    where = "; ".join(f"{_ranks(ranks)} at {test}" for test, ranks in groups.items())
    return f"llmload: ranks out of lockstep at step {seq + 1}: {where}; stopping the session on every rank"


def missing_problem(missing: list[int], test: str, timeout: float, last_failures: Mapping[int, str]) -> str:
    """One line naming the ranks that did not reach ``test`` within ``timeout`` seconds."""
    line = (f"llmload: {_ranks(missing)} did not reach {test} within {timeout:g} s "
            "(--llm-dist-timeout); stopping the session on every rank")
    known = [f"rank {r} last failed {last_failures[r]}" for r in missing if r in last_failures]
    return line + (f" ({'; '.join(known)})" if known else "")


# What a collective that timed out raises: gloo closes its pairs (the group is unusable afterwards),
# nccl's watchdog aborts the communicator.
_COLLECTIVE_TIMEOUTS = ("Timed out waiting", "Application timeout caused pair closure",
                        "Watchdog caught collective operation timeout", "DistBackendError")


def collective_timeout_problem(test: str, message: str, rank: int, others: Mapping[int, str]) -> str | None:
    """One line when ``message`` (a test's failure) is a collective that timed out, else None."""
    if not any(marker in message for marker in _COLLECTIVE_TIMEOUTS):
        return None
    why = "; ".join(f"rank {r} failed {text}" for r, text in sorted(others.items()))
    return (f"llmload: a collective timed out on rank {rank} in {test}"
            + (f" ({why})" if why else " (the other ranks did not arrive)")
            + "; the process group cannot be used after a timeout, stopping the session on every rank")


def _timedelta(seconds: float):
    import datetime

    return datetime.timedelta(seconds=seconds)


def _ranks(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def merge_exit_status(statuses: Mapping[int, int]) -> int:
    """The exit status every rank returns: its own if it failed, else 1 (tests failed) if any rank failed."""
    values = [int(s) for s in statuses.values()]
    if not values or all(v == 0 for v in values):
        return 0
    failing = [v for v in values if v not in (0, 5)]  # 5: no tests collected is not a failure of another rank
    return max(failing) if failing else 5


def merge_rank_loads(report, payloads: Mapping[int, list[dict]]) -> None:
    """Add other ranks' load payloads to rank 0's ``LoadReport``; a cell's ``bytes_per_device`` becomes the
    union of every rank's (``rank0:cpu``, ``rank1:cpu``...)."""
    for rank in sorted(payloads):
        for payload in payloads[rank]:
            report.add(payload, f"rank{rank}")
            for load in payload.get("loads", []):
                cell = report.cells.get(load["key"])
                if cell is not None:
                    cell.setdefault("bytes_per_device", {}).update(load.get("bytes_per_device", {}))


def failure_line(rank: int, report) -> str:
    """``[rank 1] FAILED path::test - AssertionError: ...``: what a rank other than 0 prints per failure."""
    word = "FAILED" if report.when == "call" else "ERROR"
    message = ""
    crash = getattr(getattr(report, "longrepr", None), "reprcrash", None)
    if crash is not None:
        message = crash.message.splitlines()[0] if crash.message else ""
    elif report.longrepr is not None:
        message = str(report.longrepr).strip().splitlines()[-1] if str(report.longrepr).strip() else ""
    return f"[rank {rank}] {word} {report.nodeid}" + (f" - {message}" if message else "")


# -- the store protocol ------------------------------------------------------------------------------

class Lockstep:
    """Check-ins through the process group's key-value store (a ``torch.distributed.Store``)."""

    def __init__(self, store, world: World, timeout: float, grace: float | None = None):
        self.store = store
        self.world = world
        self.timeout = timeout
        # A rank stuck in a test's collective fails it after ``timeout`` and then arrives: wait that long too.
        self.grace = min(timeout, 10.0) if grace is None else grace
        self.seq = 0
        self.stopped: str | None = None

    def _key(self, *parts: Any) -> str:
        return "/".join(map(str, parts))

    def _wait(self, keys: list[str], deadline: float) -> list[str]:
        """Keys still missing at the deadline (none when all arrived), or stop early on a stop key."""
        pause = 0.0005
        stop_key = self._key("stop")
        while True:
            if self.store.check([stop_key]):  # first: a late rank finds every key set and a stop
                self.stopped = self.store.get(stop_key).decode()
                return keys
            if self.store.check(keys):
                return []
            if time.monotonic() >= deadline:
                return [k for k in keys if not self.store.check([k])]
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def checkin(self, test: str) -> str | None:
        """Post ``test`` as this rank's next step and wait for the others: None when all agree, else the
        one-line reason to stop (the same line on every rank)."""
        if self.stopped:
            return self.stopped
        seq, self.seq = self.seq, self.seq + 1
        ranks = range(self.world.world_size)
        self.store.set(self._key("at", seq, self.world.rank), test)
        keys = [self._key("at", seq, r) for r in ranks]
        missing = self._wait(keys, time.monotonic() + self.timeout + self.grace)
        if seq >= 2:
            self.store.delete_key(self._key("at", seq - 2, self.world.rank))
        if self.stopped:
            return self.stopped
        if missing:
            missing_ranks = [r for r in ranks if self._key("at", seq, r) in missing]
            failures = {r: self.store.get(self._key("failed", r)).decode() for r in missing_ranks
                        if self.store.check([self._key("failed", r)])}
            return self.stop(missing_problem(missing_ranks, test, self.timeout, failures))
        ids = dict(zip(ranks, (v.decode() for v in self.store.multi_get(keys))))
        problem = lockstep_problem(ids, seq)
        return self.stop(problem) if problem else None

    def stop(self, line: str) -> str:
        """Tell every rank to stop (the first line posted wins, so every rank prints the same one)."""
        self.store.compare_set(self._key("stop"), "", line)
        self.stopped = self.store.get(self._key("stop")).decode()
        return self.stopped

    def note_failure(self, text: str) -> None:
        self.store.set(self._key("failed", self.world.rank), text)

    def other_failures(self, test: str) -> dict[int, str]:
        """Other ranks whose last failure was ``test`` (as far as the store knows now, without waiting)."""
        found = {}
        for r in range(self.world.world_size):
            key = self._key("failed", r)
            if r != self.world.rank and self.store.check([key]):
                text = self.store.get(key).decode()
                if text.startswith(test + " "):
                    found[r] = text
        return found

    def exchange(self, mine: dict) -> dict[int, dict] | None:
        """Every rank's end-of-session payload (bounded by the timeout), or None if a rank never posted."""
        self.store.set(self._key("end", self.world.rank), json.dumps(mine))
        keys = [self._key("end", r) for r in range(self.world.world_size)]
        if self._wait(keys, time.monotonic() + self.timeout + self.grace):
            return None
        return {r: json.loads(v) for r, v in enumerate(self.store.multi_get(keys))}

    def finish(self, failed: bool = False) -> None:
        """Rank 0 says it is done; the others wait for that (bounded) before they exit, since torchrun
        stops every worker as soon as one exits non-zero, and rank 0 still has the report to write."""
        try:
            if self.world.rank == 0:
                self.store.set(self._key("done"), "1")
            else:
                self.store.wait([self._key("done")], _timedelta(self.timeout + self.grace))
                if failed:
                    time.sleep(1.0)  # let rank 0 exit first: a non-zero exit here makes torchrun stop it
        except Exception:  # noqa: BLE001 - rank 0 gone (its store with it) or timed out: nothing to wait for
            pass


# -- the plugin object ------------------------------------------------------------------------------

class DistPlugin:
    """Registered on every run; does nothing unless a launcher started two or more processes."""

    def __init__(self, config: pytest.Config, session) -> None:
        self.config = config
        self.session = session
        self.world = launched_world()
        self.timeout = session.options.dist_timeout
        _TIMEOUT[0] = self.timeout
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
        from torch.distributed.distributed_c10d import _get_default_store

        self.lockstep = Lockstep(dist.PrefixStore(_PREFIX, _get_default_store()), self.world, self.timeout)

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
        from .marks import parse_mark

        reasons: list[str] = []
        try:
            for mark in item.iter_markers("requires_world_size"):
                reasons += world_size_reasons(self.world, parse_mark(mark, item.nodeid))
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
        from .errors import LLMLoadError
        from .loading import load_config, model_class_for

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
        from .report import PROPERTY

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


# -- the fixture --------------------------------------------------------------------------------------

@pytest.fixture
def llm_dist(request: pytest.FixtureRequest) -> DistInfo:
    """This process's rank, world size, local rank and process group (rank 0 of 1 and no group when the
    run was not launched by torchrun/accelerate launch)."""
    world = launched_world()
    group = None
    if world.launched:
        import torch.distributed as dist

        if dist.is_initialized():
            group = dist.group.WORLD
    return DistInfo(world.rank, world.world_size, world.local_rank, group)


def _register_marker() -> None:
    from .marks import register

    register("requires_world_size", requires_world_size)


_register_marker()
