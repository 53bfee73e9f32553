"""accelerate: the hooks it puts on dispatched modules, and the logger its planner writes to."""

from __future__ import annotations

from typing import Any

PLANNER_LOGGER = "accelerate.utils.modeling"  # "Device N is not available" and the budgets it plans with


def hook_execution_device(module: Any) -> Any:
    """The execution device of the accelerate hook on ``module`` (inside a ``SequentialHook`` too), or None."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return None
    for inner in getattr(hook, "hooks", None) or [hook]:
        device = getattr(inner, "execution_device", None)
        if device is not None:
            return device
    return None
