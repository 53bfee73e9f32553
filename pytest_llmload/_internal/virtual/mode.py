"""The TorchFunctionMode that runs the fleet: every torch call made while a fleet is active comes here.

It turns ``cuda`` device requests into virtual tensors (``Tensor.to/.cuda/.cpu/.type_as``, any call with
``device=``: factories, ``*_like``, ``new_*``; ``torch.device(int)``; ``_parse_to``, what ``Module.to``
uses), checks CUDA's same-device rule at the call, and puts each call's new tensors on the card of its
inputs. Moves between devices are an autograd Function, so gradients flow back; a backward started here
runs with the mode (and ``AutogradOnCards``) active, so what autograd computes stays on the cards too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from pytest_llmload._internal.virtual import tensor as _tensor_module
from pytest_llmload._internal.virtual.fleet import Fleet
from pytest_llmload._internal.virtual.ops import (
    _HANDLERS,
    _check_devices,
    _factory,
    _foreach,
    _host_out_of_memory,
    _in_vmap,
)
from pytest_llmload._internal.virtual.tensor import _CARD_CLASSES, _CARD_OF, adopt_outputs, charge, mixed_devices_error

_Tensor = torch.Tensor

_card_get = _CARD_OF.get
_UNSEEN = object()
# func -> its handler, or None for the common case (checked and adopted inline); filled as calls come.
_SPECIAL: dict[Any, Any] = {}


def _classify(func) -> Any:
    handler = _HANDLERS.get(func)
    if handler is not None:
        return handler
    name = getattr(func, "__name__", "")
    if name.startswith("_foreach_") or name.startswith("_fused_"):
        return _foreach  # fused optimizers take the same per-position lists (grouped by real device: the CPU)
    return None


class VirtualDeviceMode(TorchFunctionMode):
    """Active in every thread that works with the fleet (the main one, and loading pool threads)."""

    def __init__(self, fleet: Fleet, strict: bool = True) -> None:
        super().__init__()
        self.fleet = fleet
        # False while autograd runs a backward: its gradients are plain objects (charged to their card) until
        # Python code reads them, so plain next to virtual is no device mix there.
        self.strict = strict

    def __enter__(self):
        state = self.fleet.thread_state
        state.mode_depth = getattr(state, "mode_depth", 0) + 1
        self._outer_strict = getattr(state, "strict", True)
        state.strict = self.strict  # handlers (mode popped while they run) read it here
        return super().__enter__()

    def __exit__(self, *exc):
        state = self.fleet.thread_state
        state.mode_depth = getattr(state, "mode_depth", 1) - 1
        state.strict = self._outer_strict
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        try:  # zero-cost until an exception: the host's allocator failing is CUDA's OOM on a card
            special = _SPECIAL.get(func, _UNSEEN)
            if special is _UNSEEN:
                special = _SPECIAL[func] = _classify(func)
            if special is not None:
                return special(self.fleet, func, args, kwargs or {})
            if kwargs:
                if "device" in kwargs or kwargs.get("pin_memory"):
                    return _factory(self.fleet, func, args, kwargs)
                index = _check_devices(args, kwargs, self.strict)
                out = func(*args, **kwargs)
            else:
                # the common case: _check_devices' rule for positional args written out here (no Python call per
                # torch call), since every call of a forward pass comes through here
                index, plain = -1, None
                for value in args:
                    card = _card_get(type(value))
                    if card is not None:
                        if card != index:
                            if index >= 0:
                                raise mixed_devices_error(f"cuda:{index}", f"cuda:{card}")
                            index = card
                    elif type(value) is list or type(value) is tuple:
                        index = _check_devices(args, None, self.strict)
                        break
                    elif plain is None and isinstance(value, _Tensor) and value.dim() != 0:
                        plain = value
                if index >= 0 and plain is not None and self.strict and not _in_vmap():
                    raise mixed_devices_error(f"cuda:{index}", str(plain.device))
                out = func(*args)
            if index >= 0:
                if type(out) is _Tensor:
                    for value in args:
                        if value is out:
                            return out
                    # adopt(out, index), inline: a new tensor of a call on card tensors
                    out.__class__ = _CARD_CLASSES[index]
                    # (a view of a plain base: a storage made inside a composite op, charged unless it is)
                    if _tensor_module.active_fleet is not None and (out._base is None or type(out._base) is _Tensor):
                        charge(out, index)
                elif out is not None and type(out) not in _CARD_OF:
                    adopt_outputs(out, index, args)
            return out
        except torch.OutOfMemoryError as exc:
            __tracebackhide__ = True  # the user's frame and CUDA's message, not the fleet's internals
            raise exc.with_traceback(None) from None
        except RuntimeError as exc:
            if "DefaultCPUAllocator" not in str(exc):
                raise
            __tracebackhide__ = True
            raise _host_out_of_memory(self.fleet, exc, args, kwargs) from None
