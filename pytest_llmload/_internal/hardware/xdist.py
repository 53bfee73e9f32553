"""pytest-xdist: each worker gets its own disjoint slice of the visible GPUs (before any CUDA context)."""

from __future__ import annotations

import os

from pytest_llmload.errors import LLMLoadUsageError
from pytest_llmload._internal.config.numbers import is_whole_number
from pytest_llmload._internal.hardware.sources import _id_list, is_rocm, probe_gpus, visible_device_ids


def worker_index(worker_id: str | None) -> int | None:
    """``"gw3"`` -> 3; None outside an xdist worker."""
    if not worker_id or not worker_id.startswith("gw") or not is_whole_number(worker_id[2:]):
        return None
    return int(worker_id[2:])


def worker_gpus(index: int, per_worker: int, visible: list[str]) -> list[str]:
    """The disjoint slice of ``visible`` GPU ids that worker ``index`` gets with ``per_worker`` each."""
    if per_worker < 1:
        raise LLMLoadUsageError(f"invalid --llm-gpus-per-worker value {per_worker!r}: expected a whole number >= 1")
    return visible[index * per_worker:(index + 1) * per_worker]


def outer_visible_gpus() -> list[str]:
    """The GPU ids this process may hand out: the visibility variable if set, else every GPU's index.

    Counted without creating a CUDA context in this process (torch, if asked, runs in a child), since
    the caller is about to set the visibility variables for this process.
    """
    visible = visible_device_ids()
    if visible is not None:
        return visible
    return [str(i) for i in range(len(probe_gpus(torch="subprocess").gpus or []))]


def set_visible(mine: list[str]) -> dict[str, str]:
    """Make only ``mine`` (ids as :func:`outer_visible_gpus` gives them) visible; returns what was set.

    CUDA: ``CUDA_VISIBLE_DEVICES``. ROCm: ``ROCR_VISIBLE_DEVICES`` (applied first by the runtime) gets the
    physical cards, then ``HIP_VISIBLE_DEVICES`` and ``CUDA_VISIBLE_DEVICES`` number them from 0."""
    if not is_rocm():
        values = {"CUDA_VISIBLE_DEVICES": ",".join(mine)}
    else:
        outer_rocr = _id_list(os.environ.get("ROCR_VISIBLE_DEVICES"))
        if outer_rocr is not None and all(is_whole_number(i) and int(i) < len(outer_rocr) for i in mine):
            physical = [outer_rocr[int(i)] for i in mine]
        else:
            physical = list(mine)
        renumbered = ",".join(str(i) for i in range(len(mine)))
        values = {"ROCR_VISIBLE_DEVICES": ",".join(physical), "HIP_VISIBLE_DEVICES": renumbered,
                  "CUDA_VISIBLE_DEVICES": renumbered}
    os.environ.update(values)
    return values


# (worker index, GPUs per worker) when this worker had no GPU to be given: a virtual fleet started later in it
# by user code (a conftest that starts one at import) takes this worker's slice of its own cards.
WORKER_SLICE: list[int] = []


def assign_worker_gpus(worker_id: str | None, per_worker: int, *, virtual_cards: int | None = None) -> str | None:
    """Give this xdist worker its own slice of GPUs; return a note for skip reasons.

    ``virtual_cards``: the session runs on a virtual fleet of that many cards (they are what is sliced)."""
    index = worker_index(worker_id)
    if index is None:
        return None
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        raise LLMLoadUsageError(
            "--llm-gpus-per-worker: CUDA was initialised in this worker before the plugin could assign its GPUs "
            "(something in conftest.py touched a GPU at import time)"
        )
    if virtual_cards is not None:
        visible = visible_device_ids() or [str(i) for i in range(virtual_cards)]
        mine = worker_gpus(index, per_worker, visible)
        values = {"CUDA_VISIBLE_DEVICES": ",".join(mine)}  # the fleet reads CUDA's variable
        os.environ.update(values)
    else:
        visible = outer_visible_gpus()
        mine = worker_gpus(index, per_worker, visible)
        values = set_visible(mine)
        if not visible:  # no GPU here: a fleet that user code starts in this worker (a conftest) is sliced
            WORKER_SLICE[:] = [index, per_worker]
    note = (f"--llm-gpus-per-worker={per_worker} gives worker {worker_id} "
            f"{len(mine)} of {len(visible)} visible GPU{'s' if len(visible) != 1 else ''}")
    if "ROCR_VISIBLE_DEVICES" in values:
        note += " (" + ", ".join(f"{k}={v}" for k, v in values.items() if k != "CUDA_VISIBLE_DEVICES") + ")"
    return note
