"""A virtual GPU fleet: a CPU-only process acting as N CUDA cards, with real values.

``with virtual_gpus("2x24GiB"):`` (or ``@virtual_gpus(...)``) makes ``torch.cuda`` report the fleet,
puts tensors asked for on ``cuda:i`` on virtual card ``i`` (computed on the CPU, same values), keeps
per-card allocation counts with peaks and raises CUDA's OOM past a card's capacity. Everything is
restored on exit. torch is imported when a fleet starts, not when this package is imported.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import threading
from typing import TYPE_CHECKING, Any

from pytest_llmload.errors import LLMLoadUsageError

if TYPE_CHECKING:
    from pytest_llmload._internal.virtual.fleet import CardSpec, Fleet

# fleet.py (and the hardware probes it reads) loads on first use: every pytest run imports this package for
# the marker's hooks (virtual/marker.py), and most never start a fleet.
_FROM_FLEET = ("CardSpec", "Fleet", "describe_fleet", "parse_virtual_spec")


def __getattr__(name: str) -> Any:
    if name in _FROM_FLEET:
        return getattr(_fleet(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["virtual_gpus", "active_fleet", "parse_virtual_spec", "describe_fleet", "CardSpec", "Fleet"]

_lock = threading.Lock()
_TENSOR = f"{__name__}.tensor"


def _fleet():
    return importlib.import_module(f"{__name__}.fleet")  # sys.modules' copy, also after a pytester restore


def active_fleet() -> Fleet | None:
    """The fleet running now, or None: ``tensor.active_fleet``, its one owner (set while a fleet runs; the
    tensor module is imported when the first fleet starts, so none has run before)."""
    tensor = sys.modules.get(_TENSOR)
    return tensor.active_fleet if tensor is not None else None


class _Runtime:
    """One running fleet: its patches, its mode on the starting thread."""

    def __init__(self, cards: list[CardSpec]) -> None:
        import torch

        from pytest_llmload._internal.compat.torch import check_fleet_internals

        check_fleet_internals()  # one line naming the first internal this torch lacks
        import torch._dynamo  # noqa: F401 - dynamo reads torch.cuda at import; it must see the real one

        if importlib.util.find_spec("bitsandbytes") is not None:
            from pytest_llmload._internal.compat.bitsandbytes import import_bitsandbytes

            import_bitsandbytes()  # (quietly) it picks its backend at import: the machine's, not the fleet's
        if importlib.util.find_spec("transformers") is not None:
            import transformers  # noqa: F401 - its modules the fleet patches are checked in patch_targets
        # import_module, not "from . import": after a sys.modules restore (pytester) the package may still
        # hold an older submodule as an attribute, while the submodules import each other afresh.
        patches = importlib.import_module(f"{__name__}.patches")
        tensor = importlib.import_module(f"{__name__}.tensor")
        VirtualDeviceMode = importlib.import_module(f"{__name__}.mode").VirtualDeviceMode

        from pytest_llmload._internal.virtual.fleet import Fleet

        self.fleet = Fleet(cards)
        self.fleet.mode_class = VirtualDeviceMode  # what a backward pushes again (virtual/ops.py)
        self.tensor_module = tensor
        self.mode = VirtualDeviceMode(self.fleet)
        self.saved: list[tuple[Any, str, Any, bool]] = []
        self.prior_default = torch.device("cpu")
        try:
            for obj, name, value in patches.patch_targets(self.fleet, lambda: VirtualDeviceMode(self.fleet)):
                had = name in vars(obj) if isinstance(obj, type) else hasattr(obj, name)
                self.saved.append((obj, name, getattr(obj, name, None), had))
                setattr(obj, name, value)
            _clear_availability_caches()
            tensor.active_fleet = self.fleet
            self.mode.__enter__()
            # a cuda default device set before the fleet started now means the fleet's card
            self.prior_default = torch.get_default_device()
            if self.prior_default.type == "cuda":
                torch.set_default_device(self.prior_default)
        except BaseException:
            self.restore()
            raise

    def restore(self) -> None:
        self.tensor_module.active_fleet = None
        for obj, name, value, had in reversed(self.saved):
            if had:
                setattr(obj, name, value)
            else:
                delattr(obj, name)
        self.saved.clear()
        _clear_availability_caches()

    def stop(self) -> None:
        import torch

        try:
            card_default, self.fleet.default_device_mode = self.fleet.default_device_mode, None
            if card_default is not None:
                card_default.__exit__(None, None, None)
            self.mode.__exit__(None, None, None)
        finally:
            self.restore()
            if self.prior_default.type == "cuda":
                torch.set_default_device(self.prior_default)  # the user's setting, as before the fleet


def _clear_availability_caches() -> None:
    from pytest_llmload._internal.compat.transformers import clear_availability_caches

    clear_availability_caches()


class virtual_gpus(contextlib.ContextDecorator):
    """Run the block (or the decorated function) on a virtual GPU fleet.

    ``spec``: ``"2x24GiB"``, ``"24GiB,16GiB"``, ``"2x80GiB@9.0"`` (compute capability, default 8.0);
    ``name``: what ``get_device_name`` says. The context value is the ``Fleet`` (cards and counters).
    """

    def __init__(self, spec: str, *, name: str | None = None) -> None:
        from pytest_llmload._internal.virtual.fleet import parse_virtual_spec

        self.cards = parse_virtual_spec(spec, name)
        self.spec = spec
        self._runtime: _Runtime | None = None

    @classmethod
    def of_cards(cls, spec: str, cards: list) -> "virtual_gpus":
        """A fleet of cards already parsed (the session's, read once from the options)."""
        fleet = cls.__new__(cls)
        fleet.cards, fleet.spec, fleet._runtime = list(cards), spec, None
        return fleet

    def __enter__(self) -> Fleet:
        with _lock:
            running = active_fleet()
            if running is not None:
                raise LLMLoadUsageError(
                    f"virtual GPU fleet {self.spec!r} cannot start: a fleet "
                    f"({_fleet().describe_fleet(running.specs)}) is already active; fleets do not nest"
                )
            self._runtime = _Runtime(self.cards)
        return self._runtime.fleet

    def __exit__(self, *exc: object) -> bool:
        runtime, self._runtime = self._runtime, None
        if runtime is not None:
            with _lock:
                runtime.stop()  # the tensor module's active_fleet goes back to None
        return False
