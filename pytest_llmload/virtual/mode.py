"""The TorchFunctionMode that turns ``cuda`` device requests into virtual tensors.

It catches what creates or moves a tensor on a device: ``Tensor.to/.cuda/.cpu/.type_as``, any call
with ``device=`` (factories, ``*_like``, ``new_*``), ``torch.device(int)`` and ``_parse_to`` (what
``Module.to`` uses). Moves between devices are an autograd Function, so gradients flow back.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from .fleet import Fleet
from .tensor import NotSimulatedError, VirtualTensor, adopt, mixed_devices_error

_Tensor = torch.Tensor


def resolve_device(fleet: Fleet, device: Any) -> torch.device | None:
    """A ``torch.device`` with the card index filled in for ``cuda`` (``None`` stays ``None``)."""
    if device is None:
        return None
    if isinstance(device, int) and not isinstance(device, bool):
        return torch.device("cuda", fleet.check_index(device))
    if not isinstance(device, torch.device):
        device = torch.device(device)
    if device.type == "cuda":
        index = fleet.current_device() if device.index is None else device.index
        return torch.device("cuda", fleet.check_index(index))
    return device


class _Move(torch.autograd.Function):
    """A copy to another device (virtual card, cpu, meta); its backward copies the gradient back."""

    @staticmethod
    def forward(ctx, x, target, dtype, memory_format):  # type: ignore[override]
        ctx.source_index = x._index if type(x) is VirtualTensor else None
        ctx.source_device = x.device
        ctx.source_dtype = x.dtype
        elem = x._elem if type(x) is VirtualTensor else x
        real = torch.device("cpu") if target.type == "cuda" else target
        out = elem.to(device=real, dtype=dtype, memory_format=memory_format, copy=True)
        return adopt(out, target.index) if target.type == "cuda" else out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        elem = grad._elem if type(grad) is VirtualTensor else grad
        if ctx.source_index is not None:
            grad_back = adopt(elem.to(dtype=ctx.source_dtype, copy=True), ctx.source_index)
        else:
            grad_back = elem.to(device=ctx.source_device, dtype=ctx.source_dtype)
        return grad_back, None, None, None


def move(fleet: Fleet, tensor: torch.Tensor, device: Any, dtype=None, copy=False, memory_format=torch.preserve_format):
    """``tensor.to(device, dtype)`` with virtual cards understood."""
    target = resolve_device(fleet, device)
    virtual = type(tensor) is VirtualTensor
    if target is None or (not virtual and target.type != "cuda"):
        kwargs = {"dtype": dtype, "copy": copy, "memory_format": memory_format}
        if target is not None:
            kwargs["device"] = target
        return _Tensor.to(tensor, **{k: v for k, v in kwargs.items() if v is not None})
    if virtual and target.type == "cuda" and target.index == tensor._index:
        if (dtype is None or dtype == tensor.dtype) and not copy:
            return tensor
        return _Tensor.to(tensor, dtype=dtype or tensor.dtype, copy=copy, memory_format=memory_format)
    return _Move.apply(tensor, target, dtype, memory_format)


def _to(fleet, func, args, kwargs):
    tensor = args[0]
    if type(tensor) is VirtualTensor and len(args) == 2 and (not kwargs or kwargs.keys() == {"non_blocking"}):
        # accelerate's hooks send every module input to its device: mostly where it already is
        device = args[1]
        if type(device) is torch.device and device.type == "cuda" and device.index == tensor._index:
            return tensor
        if type(device) is int and device == tensor._index:
            return tensor
        if type(device) is torch.dtype and not kwargs:  # a dtype change stays on the card
            return func(tensor, device)
    rest = list(args[1:])
    kwargs = dict(kwargs)
    copy = kwargs.pop("copy", False)
    if rest and isinstance(rest[0], torch.Tensor):
        other = rest[0]
        return move(fleet, tensor, other.device, other.dtype, copy=copy)
    if len(rest) >= 4 and isinstance(rest[3], bool):  # to(device, dtype, non_blocking, copy)
        copy = rest.pop(3)
    rest = [_int_device(a) for a in rest]
    if "device" in kwargs:
        kwargs["device"] = _int_device(kwargs["device"])
    device, dtype, _non_blocking, memory_format = torch._C._nn._parse_to(*rest, **kwargs)
    return move(fleet, tensor, device, dtype, copy=copy, memory_format=memory_format or torch.preserve_format)


def _cuda(fleet, func, args, kwargs):
    device = args[1] if len(args) > 1 else kwargs.get("device")
    memory_format = kwargs.get("memory_format", torch.preserve_format)
    return move(fleet, args[0], "cuda" if device is None else device, memory_format=memory_format)


def _cpu(fleet, func, args, kwargs):
    if type(args[0]) is VirtualTensor:
        return _Move.apply(args[0], torch.device("cpu"), None, kwargs.get("memory_format", torch.preserve_format))
    return func(*args, **kwargs)


def _type_as(fleet, func, args, kwargs):
    tensor, other = args[0], args[1]
    if type(tensor) is VirtualTensor or type(other) is VirtualTensor:
        return move(fleet, tensor, other.device, other.dtype)
    return func(*args, **kwargs)


def _numpy(fleet, func, args, kwargs):
    if type(args[0]) is VirtualTensor:
        raise TypeError(
            f"can't convert cuda:{args[0]._index} device type tensor to numpy. "
            "Use Tensor.cpu() to copy the tensor to host memory first."
        )
    return func(*args, **kwargs)


def _tolist(fleet, func, args, kwargs):
    if type(args[0]) is VirtualTensor:
        return args[0]._elem.tolist()
    return func(*args, **kwargs)


def _int_device(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return torch.device("cuda", value)
    return value


def _device(fleet, func, args, kwargs):
    if len(args) == 1 and not kwargs and isinstance(args[0], int) and not isinstance(args[0], bool):
        return torch.device("cuda", args[0])
    return func(*args, **kwargs)


def _parse_to(fleet, func, args, kwargs):
    args = [_int_device(a) for a in args]
    if "device" in kwargs:
        kwargs = {**kwargs, "device": _int_device(kwargs["device"])}
    return func(*args, **kwargs)


def _not_simulated(feature):
    def handler(fleet, func, args, kwargs):
        raise NotSimulatedError(feature)

    return handler


def _unwrap(value: Any) -> Any:
    if type(value) is VirtualTensor:
        return value._elem
    if isinstance(value, (list, tuple)) and any(type(v) is VirtualTensor for v in value):
        return type(value)(_unwrap(v) for v in value)
    return value


def _factory(fleet, func, args, kwargs):
    """A call with ``device=``: run it on the real device (cpu for a virtual card) and wrap the result."""
    target = resolve_device(fleet, kwargs["device"])
    if kwargs.get("pin_memory"):
        # Libraries ask for pinned host buffers once torch.cuda.is_available() (safetensors reading offloaded
        # weights does): host memory on a CPU-only machine, same values. Tensor.pin_memory() itself raises.
        kwargs = {**kwargs, "pin_memory": False}
    has_virtual = any(type(a) is VirtualTensor for a in args)
    if target is None or (target.type != "cuda" and not has_virtual):
        return func(*args, **{**kwargs, "device": target})
    uargs = [_unwrap(a) for a in args]
    if target.type != "cuda":
        return func(*uargs, **kwargs)
    kwargs = dict(kwargs, device="cpu")
    requires_grad = kwargs.pop("requires_grad", False)
    out = func(*uargs, **kwargs)
    if not isinstance(out, torch.Tensor):
        return out
    sources = {a.untyped_storage().data_ptr() for a in uargs if isinstance(a, torch.Tensor)}
    if out.untyped_storage().data_ptr() in sources:  # as_tensor/asarray may hand back the CPU input itself
        out = out.clone()
    return adopt(out, target.index, requires_grad=requires_grad)


def _new_on_card(fleet, func, args, kwargs):
    """``t.new_tensor(data)`` / ``t.new(...)``: C++ builds these from the internal (cpu) options, so put the
    result on ``t``'s card here. The data may come from any device, as on CUDA."""
    if "device" in kwargs:
        return _factory(fleet, func, args, kwargs)
    tensor = args[0]
    if type(tensor) is not VirtualTensor:
        return func(*args, **kwargs)
    kwargs = dict(kwargs)
    requires_grad = kwargs.pop("requires_grad", False)
    data = [_unwrap(a) for a in args[1:]]
    out = func(tensor._elem, *data, **kwargs)
    sources = {a.untyped_storage().data_ptr() for a in data if isinstance(a, torch.Tensor)}
    if out.untyped_storage().data_ptr() in sources:
        out = out.clone()
    return adopt(out, tensor._index, requires_grad=requires_grad)


def _type(fleet, func, args, kwargs):
    """``t.type()`` says ``torch.cuda.FloatTensor`` on a card; ``t.type("torch.cuda.HalfTensor")`` moves there."""
    tensor = args[0]
    target = args[1] if len(args) > 1 else kwargs.get("dtype")
    virtual = type(tensor) is VirtualTensor
    if target is None:
        name = func(tensor._elem if virtual else tensor)
        return name.replace("torch.", "torch.cuda.", 1) if virtual else name
    if isinstance(target, str) and target.startswith("torch.cuda."):
        dtype = torch.empty(0).type("torch." + target[len("torch.cuda."):]).dtype
        return move(fleet, tensor, "cuda", dtype)
    if virtual and isinstance(target, str):
        return move(fleet, tensor, "cpu", torch.empty(0).type(target).dtype)
    return func(*args, **kwargs)


_HANDLERS = {
    _Tensor.type: _type,
    _Tensor.new_tensor: _new_on_card,
    _Tensor.new: _new_on_card,
    _Tensor.to: _to,
    _Tensor.cuda: _cuda,
    _Tensor.cpu: _cpu,
    _Tensor.type_as: _type_as,
    _Tensor.numpy: _numpy,
    _Tensor.tolist: _tolist,
    _Tensor.pin_memory: _not_simulated("pin_memory"),
    _Tensor.record_stream: _not_simulated("Tensor.record_stream (CUDA streams)"),
    torch.device: _device,
    torch._C._nn._parse_to: _parse_to,
}


# Calls where CUDA accepts CPU tensors next to cuda ones: indexing with CPU indices, assigning CPU values.
_MIXED_OK = {
    _Tensor.__getitem__, _Tensor.__setitem__, _Tensor.index_put_, _Tensor.index_put, torch.index_put,
    _Tensor.copy_,
}


def check_same_device(args, kwargs) -> None:
    """CUDA's rule for a user's call: tensors on one card, except 0-dim CPU tensors. (Checked here, at the
    Python call, because below it C++ composites make CPU temporaries from a virtual tensor's options.)"""
    index, plain = -1, None
    for value in (*args, *kwargs.values()) if kwargs else args:
        kind = type(value)
        if kind is list or kind is tuple:
            for item in value:
                if type(item) is VirtualTensor:
                    index = item._index if index < 0 else index
                elif plain is None and isinstance(item, torch.Tensor) and item.dim() != 0:
                    plain = item
        elif kind is VirtualTensor:
            index = value._index if index < 0 else index
        elif plain is None and isinstance(value, torch.Tensor) and value.dim() != 0:
            plain = value
    if index >= 0 and plain is not None:
        raise mixed_devices_error(f"cuda:{index}", str(plain.device))


class VirtualDeviceMode(TorchFunctionMode):
    """Active in every thread that works with the fleet (the main one, and loading pool threads)."""

    def __init__(self, fleet: Fleet) -> None:
        super().__init__()
        self.fleet = fleet

    def __enter__(self):
        state = self.fleet.thread_state
        state.mode_depth = getattr(state, "mode_depth", 0) + 1
        return super().__enter__()

    def __exit__(self, *exc):
        state = self.fleet.thread_state
        state.mode_depth = getattr(state, "mode_depth", 1) - 1
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        handler = _HANDLERS.get(func)
        if handler is not None:
            return handler(self.fleet, func, args, kwargs or {})
        if kwargs:
            if "device" in kwargs:
                return _factory(self.fleet, func, args, kwargs)
            if func not in _MIXED_OK:
                check_same_device(args, kwargs)
            return func(*args, **kwargs)
        if func not in _MIXED_OK:
            check_same_device(args, None)
        return func(*args)
