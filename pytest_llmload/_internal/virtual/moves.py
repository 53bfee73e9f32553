"""Moves between devices on the fleet: ``Tensor.to/.cuda/.cpu/.type_as/.type``, ``torch.device(int)``,
``_parse_to`` (what ``Module.to`` uses); a move is an autograd Function, so gradients flow back across cards.
"""

from __future__ import annotations

from typing import Any

import torch

from pytest_llmload._internal.virtual.fleet import Fleet
from pytest_llmload._internal.virtual.tensor import (
    _CARD_OF,
    adopt,
)

_Tensor = torch.Tensor
_CPU = torch.device("cpu")


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


class _no_dispatch_modes:
    """Run a move without ``AutogradOnCards`` watching (the move decides where its result lives)."""

    def __enter__(self):
        from torch.utils._python_dispatch import _disable_current_modes

        self.guard = _disable_current_modes() if torch._C._len_torch_dispatch_stack() else None
        if self.guard is not None:
            self.guard.__enter__()

    def __exit__(self, *exc):
        if self.guard is not None:
            self.guard.__exit__(*exc)
        return False


class _Move(torch.autograd.Function):
    """A copy to another device (virtual card, cpu, meta); its backward copies the gradient back."""

    @staticmethod
    def forward(ctx, x, target, dtype, memory_format):  # type: ignore[override]
        ctx.source_index = x._index if type(x) in _CARD_OF else None
        ctx.source_device = _CPU if ctx.source_index is not None else x.device
        ctx.source_dtype = x.dtype
        real = _CPU if target.type == "cuda" else target
        with _no_dispatch_modes():
            out = _Tensor.to(x, device=real, dtype=dtype, memory_format=memory_format, copy=True)
        return adopt(out, target.index, fresh=True) if target.type == "cuda" else out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        with _no_dispatch_modes():
            back = _Tensor.to(grad, device=ctx.source_device, dtype=ctx.source_dtype, copy=True)
        if ctx.source_index is not None:
            return adopt(back, ctx.source_index, fresh=True), None, None, None
        return back, None, None, None


def _same_card(tensor: torch.Tensor, out: Any) -> Any:
    """The result of a call that keeps ``tensor``'s card (a dtype change, a copy on the card)."""
    if isinstance(out, _Tensor) and out is not tensor and type(tensor) in _CARD_OF:
        adopt(out, tensor._index)
    return out


def move(fleet, tensor: torch.Tensor, device: Any, dtype=None, copy=False, memory_format=torch.preserve_format):
    """``tensor.to(device, dtype)`` with virtual cards understood."""
    target = resolve_device(fleet, device)
    virtual = type(tensor) in _CARD_OF
    if target is None or (not virtual and target.type != "cuda"):
        kwargs = {"dtype": dtype, "copy": copy, "memory_format": memory_format}
        if target is not None:
            kwargs["device"] = target
        return _same_card(tensor, _Tensor.to(tensor, **{k: v for k, v in kwargs.items() if v is not None}))
    if virtual and target.type == "cuda" and target.index == tensor._index:
        if (dtype is None or dtype == tensor.dtype) and not copy:
            return tensor
        return _same_card(tensor, _Tensor.to(tensor, dtype=dtype or tensor.dtype, copy=copy, memory_format=memory_format))
    return _Move.apply(tensor, target, dtype, memory_format)


def _to(fleet, func, args, kwargs):
    tensor = args[0]  # (VirtualTensor.to answers a same-card .to(device) itself; .to('cuda:0'), .to(device=...)
    # and .to(other) come here, and move() returns the tensor itself for them)
    if type(tensor) in _CARD_OF and len(args) == 2 and not kwargs and type(args[1]) is torch.dtype:
        return _same_card(tensor, func(tensor, args[1]))  # a dtype change stays on the card
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
    if type(args[0]) in _CARD_OF:
        return _Move.apply(args[0], _CPU, None, kwargs.get("memory_format", torch.preserve_format))
    return func(*args, **kwargs)


def _type_as(fleet, func, args, kwargs):
    tensor, other = args[0], args[1]
    if type(tensor) in _CARD_OF or type(other) in _CARD_OF:
        return move(fleet, tensor, other.device, other.dtype)
    return func(*args, **kwargs)


def _numpy(fleet, func, args, kwargs):
    if type(args[0]) in _CARD_OF:
        raise TypeError(
            f"can't convert cuda:{args[0]._index} device type tensor to numpy. "
            "Use Tensor.cpu() to copy the tensor to host memory first."
        )
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


def _type(fleet, func, args, kwargs):
    """``t.type()`` says ``torch.cuda.FloatTensor`` on a card; ``t.type("torch.cuda.HalfTensor")`` moves there."""
    tensor = args[0]
    target = args[1] if len(args) > 1 else kwargs.get("dtype")
    if isinstance(target, type) and not issubclass(target, _Tensor):  # torch.cuda.FloatTensor, a legacy type
        target = f"{target.__module__}.{target.__name__}"
    virtual = type(tensor) in _CARD_OF
    if target is None:
        name = func(tensor)
        return name.replace("torch.", "torch.cuda.", 1) if virtual else name
    if isinstance(target, str) and target.startswith("torch.cuda."):
        dtype = torch.empty(0).type("torch." + target[len("torch.cuda."):]).dtype
        return move(fleet, tensor, "cuda", dtype)
    if virtual and isinstance(target, str):
        return move(fleet, tensor, "cpu", torch.empty(0).type(target).dtype)
    return func(*args, **kwargs)


