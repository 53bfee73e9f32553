"""``VirtualTensor``: a real CPU tensor that says it lives on ``cuda:i``.

A wrapper subclass (``_make_wrapper_subclass``, as torch's TwoTensor and FakeTensor are) whose internal
device is ``cpu`` -- a wrapper with an internal ``cuda`` device aborts the process inside autograd on a
CPU build -- while ``.device``, ``.is_cuda``, ``get_device()`` and ``repr`` say ``cuda:i``. Every op
unwraps, checks devices the way CUDA does, runs on the CPU and rewraps; in-place and ``out=`` ops hand
back the original wrapper. New storages are charged to the card and released when they die.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._mode_utils import no_dispatch

from .fleet import Fleet

aten = torch.ops.aten

# The fleet that new virtual storages are charged to (set by ``virtual_gpus`` on entry, cleared on exit).
active_fleet: Fleet | None = None
# storage data_ptr -> its charge, for storages already charged (views share their base's storage).
_charged: dict[int, _Charge] = {}

# CUDA accepts index tensors from another device in indexing ops and any source device in copy_.
_CPU_OK_POSITIONS = {
    aten.index.Tensor: {1},
    aten.index_put.default: {1},
    aten.index_put_.default: {1},
    aten._index_put_impl_.default: {1},
    aten.copy_.default: {1},
}
_NOT_SIMULATED_OPS = {aten._pin_memory.default: "pin_memory"}


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
    """A CPU tensor (``_elem``) presented as living on virtual card ``_index``."""

    _elem: torch.Tensor
    _index: int

    @staticmethod
    def __new__(cls, elem: torch.Tensor, index: int | None = None, requires_grad: bool = False):
        if index is None:
            # type(param)(data, requires_grad=...): code that rebuilds a parameter of its old class
            # (accelerate's set_module_tensor_to_device) means a Parameter, wherever ``data`` lives.
            return torch.nn.Parameter(elem, requires_grad=requires_grad)
        out = torch.Tensor._make_wrapper_subclass(
            cls,
            elem.size(),
            strides=elem.stride(),
            storage_offset=elem.storage_offset(),
            dtype=elem.dtype,
            layout=elem.layout,
            device=elem.device,
            requires_grad=requires_grad,
        )
        out._elem = elem
        out._index = index
        return out

    __torch_function__ = torch._C._disabled_torch_function_impl

    # -- what Python code sees --
    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return torch.device("cuda", self._index)

    @property
    def is_cuda(self) -> bool:  # type: ignore[override]
        return True

    @property
    def is_cpu(self) -> bool:  # type: ignore[override]
        return False

    def get_device(self) -> int:  # type: ignore[override]
        return self._index

    def data_ptr(self) -> int:  # type: ignore[override]
        return self._elem.data_ptr()

    def untyped_storage(self):  # type: ignore[override]
        return self._elem.untyped_storage()

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]
        text = repr(self._elem)
        suffix = f", device='cuda:{self._index}'"
        if self.grad_fn is not None:
            suffix += f", grad_fn=<{type(self.grad_fn).__name__}>"
        elif self.requires_grad:
            suffix += ", requires_grad=True"
        head = text[: -1] if text.endswith(")") else text
        return head + suffix + ")"

    # -- traceable wrapper subclass protocol (Module._apply swaps such tensors with swap_tensors) --
    def __tensor_flatten__(self):
        return ["_elem"], self._index

    @staticmethod
    def __tensor_unflatten__(inner_tensors, index, outer_size, outer_stride):
        return VirtualTensor(inner_tensors["_elem"], index)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kind = _OP_KIND.get(id(func))  # OpOverload.__hash__ is Python code; id() is not (ops live forever)
        if kind is None:
            kind = _OP_KIND[id(func)] = _op_kind(func)
        if kind is not _PLAIN:
            return _dispatch_special(kind, func, args, kwargs or {})
        # The common case, kept lean: every op of a forward pass comes through here.
        index = -1
        uargs = []
        for a in args:
            if type(a) is VirtualTensor:
                if a._index != index:
                    if index >= 0:
                        raise mixed_devices_error(f"cuda:{index}", f"cuda:{a._index}")
                    index = a._index
                uargs.append(a._elem)
            elif type(a) is list or type(a) is tuple:
                state = _Unwrap(())
                state.index = index
                uargs.append(state.unwrap(a, 0))
                state.raise_if_mixed()
                index = state.index
            else:
                uargs.append(a)
        if kwargs:
            state = _Unwrap(())
            state.index = index
            kwargs = {k: state.unwrap(v, -1) for k, v in kwargs.items()}
            state.raise_if_mixed()
            index = state.index
            out = func(*uargs, **kwargs)
        else:
            out = func(*uargs)
        if type(out) is torch.Tensor:
            for a in args:  # in-place / out= ops: the caller gets its own tensor back
                if a is out or (type(a) is VirtualTensor and a._elem is out):
                    return a
            if kwargs:
                for a in kwargs.values():
                    if type(a) is VirtualTensor and a._elem is out:
                        return a
            return adopt(out, index)
        if isinstance(out, (list, tuple)):
            by_id = {id(a._elem): a for a in args if type(a) is VirtualTensor}
            return _wrap_outputs(out, index, by_id)
        return out


_PLAIN = "plain"
_OP_KIND: dict = {}


def _op_kind(func) -> Any:
    if func in _NOT_SIMULATED_OPS or func in _CPU_OK_POSITIONS or func in (aten.histc.default, aten.is_pinned.default):
        return "special"
    if func.name().startswith("aten::_foreach_"):
        return "foreach"
    if torch.Tag.inplace_view in func.tags:
        return "special"
    return _PLAIN


def _dispatch_special(kind, func, args, kwargs):
    if kind == "foreach":
        return _dispatch_foreach(func, args, kwargs)
    if func in _NOT_SIMULATED_OPS:
        raise NotSimulatedError(_NOT_SIMULATED_OPS[func])
    if func is aten.is_pinned.default:
        return False  # as for any CUDA tensor
    state = _Unwrap(_CPU_OK_POSITIONS.get(func, ()))
    uargs = [state.unwrap(a, pos) for pos, a in enumerate(args)]
    ukwargs = {k: state.unwrap(v, -1) for k, v in kwargs.items()} if kwargs else kwargs
    state.raise_if_mixed()
    if func is aten.histc.default and not uargs[0].is_floating_point():
        # CUDA has an integer histc (Mixtral's router uses it when device.type == "cuda"); the CPU has not.
        out = func(uargs[0].float(), *uargs[1:], **ukwargs).to(uargs[0].dtype)
    else:
        out = func(*uargs, **ukwargs)
    if torch.Tag.inplace_view in func.tags:
        _sync_wrapper_metadata(func, args, kwargs)
    return _wrap_outputs(out, state.index, state.by_id)


class _Unwrap:
    """Unwraps arguments (lists one level deep) and records which cards they are on (CUDA's same-device rule)."""

    __slots__ = ("cpu_ok", "index", "conflict", "by_id")

    def __init__(self, cpu_ok) -> None:
        self.cpu_ok = cpu_ok
        self.index: int = -1
        self.conflict: str | None = None
        self.by_id: dict[int, torch.Tensor] = {}

    def unwrap(self, value: Any, pos: int) -> Any:
        if type(value) is VirtualTensor:
            if self.index < 0:
                self.index = value._index
            elif value._index != self.index and self.conflict is None and pos not in self.cpu_ok:
                self.conflict = f"cuda:{value._index}"
            self.by_id[id(value._elem)] = value
            return value._elem
        if isinstance(value, torch.Tensor):
            # A plain tensor here is either the user's (the mode already checked those: CUDA's rule) or a
            # temporary that a C++ composite made from a virtual tensor's options (internal device cpu).
            self.by_id[id(value)] = value
            return value
        if isinstance(value, (list, tuple)) and value and any(isinstance(v, torch.Tensor) for v in value):
            return type(value)(self.unwrap(v, pos) for v in value)
        return value

    def raise_if_mixed(self) -> None:
        if self.conflict is not None and self.index >= 0:
            raise mixed_devices_error(f"cuda:{self.index}", self.conflict)


def _dispatch_foreach(func, args, kwargs):
    """``_foreach_*`` ops take lists whose positions may sit on different cards (optimizers group by the
    C++ device, which is ``cpu`` for every virtual tensor): check and rewrap per list position."""
    lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
    length = len(lists[0]) if lists else 0
    indices: list[int] = []
    by_id: dict[int, VirtualTensor] = {}
    for k in range(length):
        index, conflict = -1, None
        for lst in lists:
            t = lst[k]
            if type(t) is VirtualTensor:
                by_id[id(t._elem)] = t
                if index < 0:
                    index = t._index
                elif t._index != index:
                    conflict = f"cuda:{t._index}"
        if conflict is not None and index >= 0:
            raise mixed_devices_error(f"cuda:{index}", conflict)
        indices.append(index)
    uargs = [
        type(a)(t._elem if type(t) is VirtualTensor else t for t in a) if any(a is lst for lst in lists)
        else (a._elem if type(a) is VirtualTensor else a)
        for a in args
    ]
    out = func(*uargs, **kwargs)
    if isinstance(out, (list, tuple)):
        return type(out)(
            _wrap_one(t, indices[k], by_id) if isinstance(t, torch.Tensor) and indices[k] >= 0 else t
            for k, t in enumerate(out)
        )
    return out


def _wrap_outputs(out: Any, index: int, by_id: dict[int, VirtualTensor]) -> Any:
    if isinstance(out, torch.Tensor):
        return _wrap_one(out, index, by_id)
    if isinstance(out, (list, tuple)):
        return type(out)(_wrap_outputs(o, index, by_id) for o in out)
    return out


def _wrap_one(t: torch.Tensor, index: int, by_id: dict[int, VirtualTensor]) -> torch.Tensor:
    same = by_id.get(id(t))
    if same is not None and (same is t or same._elem is t):
        return same  # in-place / out= op: the caller gets its own tensor back
    return adopt(t, index)


def adopt(elem: torch.Tensor, index: int, requires_grad: bool = False) -> VirtualTensor:
    """Wrap a CPU tensor as living on card ``index``, charging its storage to the card once."""
    fleet = active_fleet
    if fleet is not None:
        storage = elem.untyped_storage()
        ptr = storage.data_ptr()
        if ptr and ptr not in _charged:
            _charged[ptr] = _Charge(storage, _release, fleet, ptr, index, fleet.allocate(index, storage.nbytes()))
    if elem.is_contiguous() and not elem.storage_offset():
        out = _make_wrapper(VirtualTensor, elem.size(), dtype=elem.dtype, device=_CPU, requires_grad=requires_grad)
    else:
        out = _make_wrapper(
            VirtualTensor,
            elem.size(),
            strides=elem.stride(),
            storage_offset=elem.storage_offset(),
            dtype=elem.dtype,
            device=_CPU,
            requires_grad=requires_grad,
        )
    out._elem = elem
    out._index = index
    return out


_make_wrapper = torch.Tensor._make_wrapper_subclass
_CPU = torch.device("cpu")


class _Charge(weakref.ref):
    """A charged storage: when it dies, its bytes go back to its card."""

    __slots__ = ("fleet", "ptr", "index", "rounded")

    def __new__(cls, storage, callback, fleet, ptr, index, rounded):
        self = super().__new__(cls, storage, callback)
        self.fleet, self.ptr, self.index, self.rounded = fleet, ptr, index, rounded
        return self

    def __init__(self, storage, callback, *args) -> None:
        super().__init__(storage, callback)


def _release(charge: _Charge) -> None:
    if _charged.get(charge.ptr) is charge:
        del _charged[charge.ptr]
    charge.fleet.free(charge.index, charge.rounded)


def _sync_wrapper_metadata(func, args, kwargs) -> None:
    """After an in-place view op (``unsqueeze_``, ``as_strided_``...) give the wrapper the new shape too
    (as ``return_and_correct_aliasing`` does: run the op on the wrapper itself, on meta)."""
    with no_dispatch():
        meta_in_tls = torch._C._meta_in_tls_dispatch_include()
        torch._C._set_meta_in_tls_dispatch_include(True)
        try:
            func(*args, **kwargs)
        finally:
            torch._C._set_meta_in_tls_dispatch_include(meta_in_tls)
