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

from pytest_llmload._internal.distributed.world import (  # noqa: F401
    DEFAULT_TIMEOUT,
    DistInfo,
    NEEDS_LAUNCHER,
    SESSION_TIMEOUT,
    World,
    active_timeout,
    backend_for,
    init_process_group,
    launched_world,
    rank_bytes,
    rank_view,
    tp_load_kwargs,
    tp_plan_problem,
    tp_reasons,
    world_size_reasons,
)
from pytest_llmload._internal.distributed.lockstep import (  # noqa: F401
    END,
    Lockstep,
    PREFIX,
    collective_timeout_problem,
    failure_line,
    lockstep_problem,
    merge_exit_status,
    merge_rank_loads,
    missing_problem,
)
