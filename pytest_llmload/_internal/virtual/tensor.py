"""``VirtualTensor``: a real CPU tensor that says it lives on ``cuda:i``.

A plain subclass of ``torch.Tensor`` -- no wrapper: the object *is* the CPU tensor, so its ops run at the
CPU's own speed -- whose ``.device``, ``.is_cuda``, ``get_device()`` and ``repr`` say ``cuda:i``. The fleet's
``TorchFunctionMode`` (``mode.py``) sees every call at the Python API: it checks devices the way CUDA does,
runs the call on the CPU and gives the call's new tensors the card of its inputs by changing their class in
place (``adopt``: no copy, no second object). During backward a ``TorchDispatchMode`` does the same for what
autograd computes. New storages are charged to their card and released when they die.
"""

from __future__ import annotations

import os
import sys
import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pytest_llmload._internal.virtual.fleet import Fleet

# The fleet that new virtual storages are charged to (set by ``virtual_gpus`` on entry, cleared on exit).
active_fleet: Fleet | None = None
# storage data_ptr -> its charge, for storages already charged (views share their base's storage).
_charged: dict[int, _Charge] = {}

_Tensor = torch.Tensor
_Parameter = torch.nn.Parameter
_NoTorchFunction = torch._C.DisableTorchFunction
_shape = torch._C.TensorBase.shape.__get__
_dtype = torch._C.TensorBase.dtype.__get__
_ndim = torch._C.TensorBase.ndim.__get__
_size = torch._C.TensorBase.size
_dim = torch._C.TensorBase.dim


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
    """A CPU tensor presented as living on a virtual card. Each card has its own subclass (``card_class(i)``,
    named ``VirtualTensor0``, ``VirtualTensor1``, ...) holding the card's index and device as class attributes,
    so putting a tensor on a card is one class assignment: no per-tensor state, nothing copied."""

    _index: int
    device: torch.device  # type: ignore[assignment]
    is_cuda = True
    is_cpu = False

    @staticmethod
    def __new__(cls, elem: torch.Tensor, index: int | None = None, requires_grad: bool = False):
        if index is None:
            # type(param)(data, requires_grad=...): code that rebuilds a parameter of its old class
            # (accelerate's set_module_tensor_to_device) means a Parameter, wherever ``data`` lives.
            return torch.nn.Parameter(elem, requires_grad=requires_grad)
        with _NoTorchFunction():
            alias = _Tensor.view_as(elem, elem)
            return adopt(alias, index, requires_grad=requires_grad)

    def __init__(self, *args, **kwargs) -> None:
        pass  # everything happened in __new__ (torch.Tensor's own __init__ would parse the args again)

    # Calls on a virtual tensor are the fleet mode's business; outside a fleet they run as on any CPU tensor.
    __torch_function__ = torch._C._disabled_torch_function_impl

    def get_device(self) -> int:  # type: ignore[override]
        return self._index

    # Metadata reads are the most frequent calls of a forward pass (shape checks, dtype casts); answered here
    # without a trip through the fleet mode (they compute nothing, so there is nothing for it to check).
    @property
    def shape(self) -> torch.Size:  # type: ignore[override]
        with _NoTorchFunction():
            return _shape(self)

    @property
    def dtype(self) -> torch.dtype:  # type: ignore[override]
        with _NoTorchFunction():
            return _dtype(self)

    @property
    def ndim(self) -> int:  # type: ignore[override]
        with _NoTorchFunction():
            return _ndim(self)

    def size(self, dim=None):  # type: ignore[override]
        with _NoTorchFunction():
            return _size(self) if dim is None else _size(self, dim)

    def cpu(self, *args, **kwargs):  # type: ignore[override]
        if active_fleet is None:
            return _left_over_to_cpu(self)
        return _Tensor.cpu(self, *args, **kwargs)

    def to(self, *args, **kwargs):  # type: ignore[override]
        # accelerate's hooks send every module input to its device, mostly where it already is: answered
        # here; every other form goes through the fleet mode (mode.py, ``_to``)
        if active_fleet is None:  # a card tensor that outlived its fleet: it can still be brought home
            return _Tensor.to(_left_over_to_cpu(self), *args, **kwargs)
        if len(args) == 1 and (not kwargs or (len(kwargs) == 1 and "non_blocking" in kwargs)):
            device = args[0]
            if (type(device) is torch.device and device.index == self._index and device.type == "cuda") or (
                type(device) is int and device == self._index
            ):
                return self
            if type(device) is torch.dtype and not kwargs:
                with _NoTorchFunction():
                    if _dtype(self) == device:
                        return self  # what .to(dtype) returns for its own dtype
        return _Tensor.to(self, *args, **kwargs)

    def dim(self) -> int:  # type: ignore[override]
        with _NoTorchFunction():
            return _dim(self)

    def __reduce_ex__(self, protocol):
        with _NoTorchFunction():
            plain = _Tensor.as_subclass(self, _Tensor)
            if _in_torch_save():
                # torch.save: saved as the CPU tensor it is (a card has no device memory to name), so
                # torch.load(weights_only=True) reads it anywhere; the fleet's torch.load(map_location=...)
                # puts it back on a card
                return plain.__reduce_ex__(protocol)
            # pickle / multiprocessing: as on CUDA, it comes back on its card (where no fleet has that card,
            # CUDA's error for a CUDA tensor unpickled without CUDA)
            return _card_tensor_from_pickle, (plain, _CARD_OF[type(self)])

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


# card index -> its class, and back
_CARD_CLASSES: list[type] = []
_CARD_OF: dict[type, int] = {}


def _in_torch_save() -> bool:
    """Whether the pickling under way is ``torch.save``'s (its pickler runs in ``torch/serialization.py``)."""
    frame = sys._getframe(2)
    for _ in range(12):
        if frame is None:
            return False
        if frame.f_code.co_filename.endswith(_SERIALIZATION):
            return True
        frame = frame.f_back
    return False


_SERIALIZATION = os.path.join("torch", "serialization.py")


def _card_tensor_from_pickle(plain: torch.Tensor, index: int) -> torch.Tensor:
    fleet = active_fleet
    if fleet is None or index >= len(fleet.cards):
        raise RuntimeError(
            "Attempting to deserialize object on a CUDA device but torch.cuda.is_available() is False. If you "
            "are running on a CPU-only machine, please use torch.load with map_location=torch.device('cpu') "
            f"to map your storages to the CPU. (pytest-llmload: this tensor was on virtual GPU {index}, and "
            + ("no virtual fleet is running)" if fleet is None else f"the running fleet has {len(fleet.cards)} card(s))")
        )
    return put_on_card(plain, index)


def card_class(index: int) -> type:
    """The ``VirtualTensor`` subclass of card ``index`` (made once, kept: tensors may outlive a fleet)."""
    while len(_CARD_CLASSES) <= index:
        i = len(_CARD_CLASSES)
        cls = type(f"VirtualTensor{i}", (VirtualTensor,), {"_index": i, "device": torch.device("cuda", i),
                                                             "__module__": __name__})
        globals()[cls.__name__] = cls  # importable by name (pickle, repr of the type)
        _CARD_CLASSES.append(cls)
        _CARD_OF[cls] = i
    return _CARD_CLASSES[index]



def adopt(tensor: torch.Tensor, index: int, requires_grad: bool = False, fresh: bool = False) -> torch.Tensor:
    """Put a CPU tensor on card ``index`` in place (its class becomes the card's), charging its storage to
    the card once. ``fresh``: the storage was just made for this card (a charge elsewhere moves here)."""
    kind = type(tensor)
    if _CARD_OF.get(kind) != index:
        if kind is _Parameter:
            tensor._is_param = True  # isinstance(t, nn.Parameter) stays true (torch's own rule for subclasses)
        elif kind is not _Tensor and kind not in _CARD_OF:
            return tensor  # another library's subclass (bitsandbytes' parameters): left as it is
        # (the card's class is made the first time a tensor goes onto that card)
        tensor.__class__ = _CARD_CLASSES[index] if index < len(_CARD_CLASSES) else card_class(index)
    if active_fleet is not None:
        charge(tensor, index, fresh)
    if requires_grad:
        tensor.requires_grad_(True)
    return tensor


def put_on_card(tensor: torch.Tensor, index: int) -> torch.Tensor:
    """``adopt`` of a fresh tensor, for callers outside the fleet mode's handlers (where torch calls would
    reach the mode)."""
    with _NoTorchFunction():
        return adopt(tensor, index, fresh=True)


def to_plain(tensor: torch.Tensor) -> torch.Tensor:
    """Make a card tensor a CPU tensor (or a CPU parameter) again, in place."""
    if type(tensor) in _CARD_OF:
        tensor.__class__ = _Parameter if getattr(tensor, "_is_param", False) else _Tensor
    return tensor


def charge(tensor: torch.Tensor, index: int, fresh: bool = False) -> None:
    """Charge ``tensor``'s storage to card ``index`` unless it is charged already; its death gives the bytes
    back (a weak reference with a callback: the storage's Python object lives as long as the storage)."""
    if not fresh:
        base = tensor._base
        if base is not None and type(base) is not _Tensor:
            return  # a view of a card tensor: its storage is its base's, charged when the base was put on a card
        # (a view of a plain base: a storage a composite op made and returned only as a view, F.linear's
        # addmm under a reshape; charged below unless it is charged already)
    fleet = active_fleet
    try:
        storage = tensor.untyped_storage()
    except NotImplementedError:  # a vmap's batched tensor: its storage is the wrapped tensor's, charged already
        return
    ptr = storage.data_ptr()
    if not ptr:
        return
    entry = _charged.get(ptr)
    if entry is None:
        _new_charge(storage, fleet, ptr, index, fleet.allocate(index, storage.nbytes()))
    elif fresh and entry.index != index and entry.fleet is fleet:
        rounded = fleet.allocate(index, storage.nbytes())
        fleet.free(entry.index, entry.rounded)
        entry.index, entry.rounded = index, rounded


def recharge(tensor: torch.Tensor, index: int, old_ptr: int) -> None:
    """After ``resize_`` moved or resized a card tensor's storage: charge its new size (past the card's
    capacity: CUDA's OOM, the old charge kept), then give the old bytes back."""
    storage = tensor.untyped_storage()
    ptr = storage.data_ptr()
    fleet = active_fleet
    rounded = fleet.allocate(index, storage.nbytes()) if ptr else 0
    old = _charged.get(old_ptr)
    if old is not None:
        _settle(old)
    if ptr:
        _new_charge(storage, fleet, ptr, index, rounded)


def _new_charge(storage, fleet: Fleet, ptr: int, index: int, rounded: int) -> None:
    entry = _charged[ptr] = _Charge(storage, _settle)
    entry.fleet, entry.ptr, entry.index, entry.rounded, entry.live = fleet, ptr, index, rounded, True


class _Charge(weakref.ref):
    """A charged storage: when it dies, its bytes go back to its card. (Made with the plain ``weakref.ref``
    constructor and given its fields after: no Python ``__init__`` on this path, it runs for every new tensor.)"""

    __slots__ = ("fleet", "ptr", "index", "rounded", "live")


def _settle(entry: _Charge) -> None:
    """Give a dead (the weakref's callback) or handed back storage's bytes back to its card, once."""
    if entry.live:
        entry.live = False
        entry.fleet.free(entry.index, entry.rounded)
    if _charged.get(entry.ptr) is entry:
        del _charged[entry.ptr]



def _left_over_to_cpu(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of a card tensor whose fleet has ended, as a plain CPU tensor (what ``.cpu()`` gives)."""
    with _NoTorchFunction(), torch.no_grad():
        copy = _Tensor.clone(tensor)
    to_plain(copy)
    return copy


def release_to_cpu(tensor: torch.Tensor) -> torch.Tensor:
    """Make a fresh tensor that was put on a card a plain CPU tensor again (its charge goes back)."""
    if type(tensor) in _CARD_OF:
        entry = _charged.get(tensor.untyped_storage().data_ptr())
        if entry is not None:
            _settle(entry)
        to_plain(tensor)
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


def _card_of(values: Any) -> int:
    """The card of the first tensor among ``values`` (lists one level deep) that is virtual or whose storage
    is charged to a card (autograd's own tensors: plain objects whose memory lives on a card), or -1."""
    for value in values:
        kind = type(value)
        index = _CARD_OF.get(kind)
        if index is not None:
            return index
        if kind is list or kind is tuple:
            found = _card_of(value)
            if found >= 0:
                return found
        elif isinstance(value, _Tensor):
            entry = _charged.get(value.untyped_storage().data_ptr())
            if entry is not None and entry.live:
                return entry.index
    return -1


class AutogradOnCards(TorchDispatchMode):
    """Active while autograd runs a backward started in the fleet: the memory of what it computes from
    tensors on a card (gradients, recomputed activations) is charged to that card, as on CUDA. Classes are
    left as they are -- checkpointing compares recomputed tensors with the ones saved in the forward -- and a
    gradient becomes a virtual tensor when Python code reads it (``param.grad``)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # (no torch function here: an aten call from here is not a user's call, and the reads below are ours)
        with _NoTorchFunction():
            out = func(*args, **kwargs) if kwargs else func(*args)
            if active_fleet is not None and isinstance(out, (_Tensor, list, tuple)):
                index = _card_of(args)
                if index < 0 and kwargs:
                    index = _card_of(kwargs.values())
                if index >= 0:
                    for item in (out,) if isinstance(out, _Tensor) else out:
                        if isinstance(item, _Tensor):
                            charge(item, index)
        return out
