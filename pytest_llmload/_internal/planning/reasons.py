"""Why a plan looks the way it does: what transformers' planner decided on the way, and a note for each
GPU of the fleet that the plan leaves empty (or a budget that does not match the fleet)."""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Any, Iterator

from pytest_llmload._internal.compat.transformers import PLANNING_LOGGER
from pytest_llmload._internal.planning.devices import device_label, device_order
from pytest_llmload.errors import LLMLoadUsageError
ISSUE_4297 = "huggingface/accelerate#4297"  # balanced_low_0 reads budgets by position
from pytest_llmload._internal.config.numbers import format_size

_REQUIRED_RE = re.compile(r"^\s*- (\w+): (\d+) bytes required", re.M)


class Recorder:
    """Keeps what transformers' planner decided on the way: the budgets it planned with, and the bytes a
    GPU would have needed for its first module when nothing could be placed there (logged at info level)."""

    def __init__(self) -> None:
        self.budgets: dict[int | str, int] | None = None
        self.required: dict[int | str, int] = {}

    def handle(self, record) -> None:  # a logging handler's one method that matters
        import logging

        for device, size in _REQUIRED_RE.findall(record.getMessage()):
            self.required[int(device) if device.isdigit() else device] = int(size)
        if record.levelno >= logging.WARNING:  # warnings go where they always went
            parent = logging.getLogger(PLANNING_LOGGER.rsplit(".", 1)[0])
            if parent.isEnabledFor(record.levelno):
                parent.handle(record)


@contextmanager
def recording(recorder: Recorder) -> Iterator[None]:
    import logging

    from pytest_llmload._internal.compat.transformers import accelerate_integration

    hf_accelerate = accelerate_integration()

    real_infer = hf_accelerate.infer_auto_device_map

    def infer(*args, **kwargs):
        budgets = kwargs.get("max_memory")
        recorder.budgets = dict(budgets) if budgets else None
        return real_infer(*args, **kwargs)

    handler = logging.Handler(logging.INFO)
    handler.emit = recorder.handle  # type: ignore[method-assign]
    logger = logging.getLogger(PLANNING_LOGGER)
    level, propagate = logger.level, logger.propagate
    logger.setLevel(logging.INFO)
    logger.propagate = False  # its info lines are for us, not the terminal
    logger.addHandler(handler)
    hf_accelerate.infer_auto_device_map = infer
    try:
        yield
    finally:
        hf_accelerate.infer_auto_device_map = real_infer
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def fleet_and_budget_notes(fleet: list[int], budget: dict[int | str, int]) -> list[str]:
    """``gpus`` and ``max_memory`` together: the fleet says which GPUs exist, the budget what from_pretrained uses."""
    missing = [d for d in budget if isinstance(d, int) and d >= len(fleet)]
    if missing:
        raise LLMLoadUsageError(
            f"max memory names {device_label(missing[0])}, but the fleet has {len(fleet)} GPU(s) "
            f"({_gpu_range(range(len(fleet)))}): give a budget only for GPUs of the fleet")
    notes = []
    for device, size in budget.items():
        if isinstance(device, int) and size > fleet[device]:
            notes.append(f"the budget for {device_label(device)} ({format_size(size)}) is more than the card "
                         f"({format_size(fleet[device])}): from_pretrained plans with the budget and would run "
                         "out of memory loading it")
    return notes


def _gpu_range(ids: Any) -> str:
    ids = list(ids)
    return device_label(ids[0]) if len(ids) == 1 else f"cuda:{ids[0]}-{ids[-1]}"


def unused_gpu_notes(unused, strategy, network, sizes, recorder, budgets, fleet, budget, per_device) -> list[str]:
    """Why GPUs of the fleet (or the budget) hold nothing: one line per reason, GPUs with the same reason together."""
    planned = recorder.budgets or {}
    no_split = set(getattr(network, "_no_split_modules", None) or [])
    blocks = [(sizes.get(name, 0), type(module).__name__) for name, module in network.named_modules()
              if type(module).__name__ in no_split]
    smallest = min(blocks) if blocks else None
    first_gpu = next((d for d in planned if isinstance(d, int)), None)  # accelerate's "main device"
    reasons: dict[str, list[int]] = {}
    for gpu in unused:
        reasons.setdefault(_why_empty(gpu, strategy, recorder, planned, budgets, fleet, budget, smallest,
                                      first_gpu, per_device), []).append(gpu)
    notes = []
    for reason, gpus in reasons.items():
        subject = _gpu_list(gpus) + (" (each)" if len(gpus) > 1 else "")
        notes.append(f"{subject} holds nothing: {reason}")
    return notes


def _why_empty(gpu, strategy, recorder, planned, budgets, fleet, budget, smallest, first_gpu, per_device) -> str:
    card = fleet[gpu] if gpu < len(fleet) else None
    if budget is not None and gpu not in budget:
        return "it has no max memory entry, and from_pretrained uses only the GPUs max_memory names"
    given = planned.get(gpu, budgets.get(gpu, 0))
    if given <= 0:
        if strategy == "balanced_low_0" and gpu == 0:
            return "balanced_low_0 keeps it as empty as it can (for generate's work) and the other GPUs hold the model"
        if budget is not None and budget.get(gpu) == 0:
            return "its max memory is 0" + (f" (with balanced_low_0 a zero budget also misplaces GPU 0: {ISSUE_4297})"
                                            if strategy == "balanced_low_0" else "")
        return "the planner gave it a budget of 0"
    placed_later = any(device_order(d) > device_order(gpu) for d in per_device)
    if gpu not in recorder.required and not placed_later:
        return "the GPUs before it hold the whole model"
    share = f" ({strategy} gives it {format_size(given)} of {format_size(card)})" if (
        card is not None and given < card) else f" (its budget is {format_size(given)})"
    reserve = (" (with the room transformers keeps free on the first GPU for the largest layer)"
               if gpu == first_gpu else "")
    if gpu in recorder.required:
        reason = (f"the next module to place needed {format_size(recorder.required[gpu])} there{reserve}, "
                  f"more than it had{share}")
    else:  # transformers no longer logs what it needed: say what is known
        reason = f"the next module to place did not fit{reserve}{share}"
    if smallest is not None and smallest[0] > given:
        reason += (f"; the smallest block that cannot be split ({smallest[1]}, {format_size(smallest[0])}) "
                   "is larger than that")
    return reason


def _gpu_list(gpus: list[int]) -> str:
    """``cuda:0, cuda:2-5``: runs of consecutive GPUs as ranges."""
    runs: list[list[int]] = []
    for gpu in sorted(gpus):
        if runs and runs[-1][-1] + 1 == gpu:
            runs[-1].append(gpu)
        else:
            runs.append([gpu])
    return ", ".join(_gpu_range(run) for run in runs)
