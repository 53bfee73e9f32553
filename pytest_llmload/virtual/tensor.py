"""``VirtualTensor``: a real CPU tensor that says it lives on ``cuda:i``.

A plain subclass of ``torch.Tensor`` -- no wrapper: the object *is* the CPU tensor, so its ops run at the
CPU's own speed -- whose ``.device``, ``.is_cuda``, ``get_device()`` and ``repr`` say ``cuda:i``. The fleet's
``TorchFunctionMode`` (``mode.py``) sees every call at the Python API: it checks devices the way CUDA does,
runs the call on the CPU and gives the call's new tensors the card of its inputs by changing their class in
place (``adopt``: no copy, no second object). During backward a ``TorchDispatchMode`` does the same for what
autograd computes. New storages are charged to their card and released when they die.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .fleet import Fleet

# The fleet that new virtual storages are charged to (set by ``virtual_gpus`` on entry, cleared on exit).
active_fleet: Fleet | None = None
# storage data_ptr -> its charge, for storages already charged (views share their base's storage).
_charged: dict[int, _Charge] = {}

_Tensor = torch.Tensor
_Parameter = torch.nn.Parameter
_DEVICES = [torch.device("cuda", i) for i in range(64)]


class NotSimulatedError(RuntimeError):
    """A CUDA feature the virtual fleet does not simulate (streams, graphs, CUDA RNG state, ...)."""

    def __init__(self, feature: str) -> None:
        super().__init__(
            f"{feature} is not simulated on virtual GPUs (pytest-llmload runs them on the CPU); "
            "run this test on a real GPU or without virtual_gpus"
        )


def mixed_devices_error(first: str, second: str) -> RuntimeError:
    return RuntimeError(
        f"Expected all tensors to be on the same device, but found at least two devices, {first} and {second}!"
    )


class VirtualTensor(torch.Tensor):
    """A CPU tensor presented as living on virtual card ``_index``."""

    _index: int

    @staticmethod
    def __new__(cls, elem: torch.Tensor, index: int | None = None, requires_grad: bool = False):
        if index is None:
            # type(param)(data, requires_grad=...): code that rebuilds a parameter of its old class
            # (accelerate's set_module_tensor_to_device) means a Parameter, wherever ``data`` lives.
            return torch.nn.Parameter(elem, requires_grad=requires_grad)
        with torch._C.DisableTorchFunction():
            alias = _Tensor.view_as(elem, elem)
        return adopt(alias, index, requires_grad=requires_grad)

    # Calls on a virtual tensor are the fleet mode's business; outside a fleet they run as on any CPU tensor.
    __torch_function__ = torch._C._disabled_torch_function_impl

    # -- what Python code sees --
    @property
    def device(self) -> torch.device:  # type: ignore[override]
        index = self._index
        return _DEVICES[index] if index < 64 else torch.device("cuda", index)

    @property
    def is_cuda(self) -> bool:  # type: ignore[override]
        return True

    @property
    def is_cpu(self) -> bool:  # type: ignore[override]
        return False

    def get_device(self) -> int:  # type: ignore[override]
        return self._index

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]
        with torch._C.DisableTorchFunction():
            plain = _Tensor.as_subclass(self, _Tensor)
            text = repr(plain)
        suffix = f", device='cuda:{self._index}'"
        if self.grad_fn is not None or self.requires_grad:
            # the CPU repr ends with ", grad_fn=<...>)" or ", requires_grad=True)": the device goes before it
            for tail in (", grad_fn=", ", requires_grad=True"):
                at = text.rfind(tail)
                if at >= 0:
                    return text[:at] + suffix + text[at:]
        head = text[:-1] if text.endswith(")") else text
        return head + suffix + ")"


def adopt(tensor: torch.Tensor, index: int, requires_grad: bool = False, fresh: bool = False) -> torch.Tensor:
    """Put a CPU tensor on card ``index`` in place (its class becomes ``VirtualTensor``), charging its storage
    to the card once. ``fresh``: the storage was just made for this card (a charge elsewhere moves here)."""
    kind = type(tensor)
    if kind is not VirtualTensor:
        if kind is _Parameter:
            tensor._is_param = True  # isinstance(t, nn.Parameter) stays true (torch's own rule for subclasses)
        elif kind is not _Tensor:
            return tensor  # another library's subclass (bitsandbytes' parameters): left as it is
        tensor.__class__ = VirtualTensor
    tensor._index = index
    if active_fleet is not None:
        charge(tensor, index, fresh)
    if requires_grad:
        tensor.requires_grad_(True)
    return tensor


def charge(tensor: torch.Tensor, index: int, fresh: bool = False) -> None:
    """Charge ``tensor``'s storage to card ``index`` unless it is charged already."""
    fleet = active_fleet
    storage = tensor.untyped_storage()
    ptr = storage.data_ptr()
    if ptr:
        charged = _charged.get(ptr)
        if charged is None:
            _charged[ptr] = _Charge(storage, _release, fleet, ptr, index, fleet.allocate(index, storage.nbytes()))
        elif fresh and charged.index != index and charged.fleet is fleet:
            rounded = fleet.allocate(index, storage.nbytes())
            fleet.free(charged.index, charged.rounded)
            charged.index, charged.rounded = index, rounded


def release_to_cpu(tensor: torch.Tensor) -> torch.Tensor:
    """Make a fresh tensor that was put on a card a plain CPU tensor again (its charge goes back)."""
    if type(tensor) is VirtualTensor:
        charge = _charged.pop(tensor.untyped_storage().data_ptr(), None)
        if charge is not None:
            charge.fleet.free(charge.index, charge.rounded)
            charge.detach()
        tensor.__class__ = _Parameter if getattr(tensor, "_is_param", False) else _Tensor
        del tensor._index
    return tensor


def adopt_outputs(out: Any, index: int, args: tuple) -> None:
    """Give the new tensors of a call (not the ones it was given: in-place and ``out=`` calls) card ``index``."""
    kind = type(out)
    if kind is _Tensor:
        for arg in args:
            if arg is out:
                return
        adopt(out, index)
    elif kind is tuple or kind is list or isinstance(out, tuple):
        for item in out:
            if type(item) is _Tensor and not any(arg is item for arg in args):
                adopt(item, index)


class _Charge(weakref.ref):
    """A charged storage: when it dies, its bytes go back to its card."""

    __slots__ = ("fleet", "ptr", "index", "rounded", "live")

    def __new__(cls, storage, callback, fleet, ptr, index, rounded):
        self = super().__new__(cls, storage, callback)
        self.fleet, self.ptr, self.index, self.rounded, self.live = fleet, ptr, index, rounded, True
        return self

    def __init__(self, storage, callback, *args) -> None:
        super().__init__(storage, callback)

    def detach(self) -> None:
        self.live = False


def _release(charge: _Charge) -> None:
    if _charged.get(charge.ptr) is charge:
        del _charged[charge.ptr]
    if charge.live:
        charge.fleet.free(charge.index, charge.rounded)


def _card_of(values: Any) -> int:
    """The card of the first tensor among ``values`` (lists one level deep) that is virtual or whose storage
    is charged to a card (autograd's own tensors: plain objects whose memory lives on a card), or -1."""
    for value in values:
        kind = type(value)
        if kind is VirtualTensor:
            return value._index
        if kind is list or kind is tuple:
            found = _card_of(value)
            if found >= 0:
                return found
        elif isinstance(value, _Tensor):
            charged = _charged.get(value.untyped_storage().data_ptr())
            if charged is not None:
                return charged.index
    return -1


class AutogradOnCards(TorchDispatchMode):
    """Active while autograd runs a backward started in the fleet: the memory of what it computes from
    tensors on a card (gradients, recomputed activations) is charged to that card, as on CUDA. Classes are
    left as they are -- checkpointing compares recomputed tensors with the ones saved in the forward -- and a
    gradient becomes a virtual tensor when Python code reads it (``param.grad``)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunction():  # an aten call from here is not a user's call: no device check
            out = func(*args, **kwargs) if kwargs else func(*args)
        if active_fleet is None:
            return out
        kind = type(out)
        if kind is _Tensor or kind is VirtualTensor or isinstance(out, (list, tuple)):
            index = _card_of(args)
            if index < 0 and kwargs:
                index = _card_of(kwargs.values())
            if index >= 0:
                for item in (out,) if isinstance(out, _Tensor) else out:
                    if isinstance(item, _Tensor):
                        charge(item, index)
        return out
