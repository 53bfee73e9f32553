"""Ranks kept in lockstep: the store protocol before each test, and the pure decisions at the end."""

from __future__ import annotations

import json
import time
from typing import Any, Mapping

from pytest_llmload._internal.distributed.world import World

END = "(end of session)"
PREFIX = "llmload/"

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

REPORT_GRACE = 10.0  # seconds a rank may take, after a collective timed out, to report and arrive


class Lockstep:
    """Check-ins through the process group's key-value store (a ``torch.distributed.Store``)."""

    def __init__(self, store, world: World, timeout: float, grace: float | None = None):
        self.store = store
        self.world = world
        self.timeout = timeout
        # A rank stuck in a test's collective fails it after ``timeout`` and then needs time to report that
        # (pytest formats the traceback) before it arrives: the others wait ``timeout + grace``. The grace
        # covers the reporting, so it does not shrink with a short timeout (it once was min(timeout, 10):
        # with a 3 s timeout, a loaded machine took longer than 3 s to report and the wrong rank was blamed).
        self.grace = REPORT_GRACE if grace is None else grace
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


