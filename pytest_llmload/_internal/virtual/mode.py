"""The TorchFunctionMode that runs the fleet: every torch call made while a fleet is active comes here.

It turns ``cuda`` device requests into virtual tensors (``Tensor.to/.cuda/.cpu/.type_as``, any call with
``device=``: factories, ``*_like``, ``new_*``; ``torch.device(int)``; ``_parse_to``, what ``Module.to``
uses), checks CUDA's same-device rule at the call, and puts each call's new tensors on the card of its
inputs. Moves between devices are an autograd Function, so gradients flow back; a backward started here
runs with the mode (and ``AutogradOnCards``) active, so what autograd computes stays on the cards too.
"""

from __future__ import annotations

import copy as _copy
import inspect
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from pytest_llmload._internal.virtual.fleet import Fleet
from pytest_llmload._internal.virtual import tensor as _tensor_module
from pytest_llmload._internal.virtual.tensor import (
    _CARD_CLASSES,
    AutogradOnCards,
    _CARD_OF,
    adopt,
    adopt_outputs,
    charge,
    mixed_devices_error,
    recharge,
    release_to_cpu,
    to_plain,
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


def _host_out_of_memory(fleet, exc: BaseException, args, kwargs) -> BaseException:
    """The host's allocator could not back a card's allocation: CUDA's OOM type for the card of the call."""
    import re

    import psutil

    index = _check_devices(args, kwargs or {}, False)
    device = (kwargs or {}).get("device")
    if index < 0 and device is not None:
        target = resolve_device(fleet, device)
        index = target.index if target is not None and target.type == "cuda" else -1
    if index < 0:
        return exc  # a CPU allocation of the user's: the host's own error
    found = re.search(r"allocate (\d+) bytes", str(exc))
    wanted = int(found.group(1)) if found else 0
    card = fleet.cards[index]
    if wanted > card.total_memory - card.allocated:  # past the card itself: the card's own OOM
        return fleet.out_of_memory(index, wanted)
    return fleet.out_of_memory(index, wanted, host_available=psutil.virtual_memory().available)


def _pin_memory(fleet, func, args, kwargs):
    """``t.pin_memory()``: a pinned buffer is ordinary host memory here (a copy, as CUDA makes); a card
    tensor cannot be pinned, as on CUDA."""
    tensor = args[0]
    if type(tensor) in _CARD_OF:
        legacy = _Tensor.type(tensor).replace("torch.", "torch.cuda.", 1)
        raise RuntimeError(f"cannot pin '{legacy}' only dense CPU tensors can be pinned")
    with torch.no_grad():
        return _Tensor.clone(tensor)


def _storages(values) -> set[int]:
    found = set()
    for value in values:
        if isinstance(value, torch.Tensor):
            found.add(value.untyped_storage().data_ptr())
        elif isinstance(value, (list, tuple)):
            found |= _storages(value)
    return found


def _factory(fleet, func, args, kwargs):
    """A call with ``device=``: run it on the CPU and put the result on the card asked for."""
    target = resolve_device(fleet, kwargs.get("device"))
    if kwargs.get("pin_memory"):
        # Libraries ask for pinned host buffers once torch.cuda.is_available() (safetensors reading offloaded
        # weights does): host memory on a CPU-only machine, same values. Tensor.pin_memory() itself raises.
        kwargs = {**kwargs, "pin_memory": False}
    on_card = target is not None and target.type == "cuda"
    out = func(*args, **{**kwargs, "device": _CPU if on_card else target})
    if not isinstance(out, torch.Tensor):
        return out
    out = _not_an_input(out, args)
    return adopt(out, target.index, fresh=True) if on_card else out


def _not_an_input(out: torch.Tensor, inputs) -> torch.Tensor:
    """``out``, or a plain copy of it where it is a card tensor or shares an input's storage (``as_tensor``,
    ``asarray`` and ``new_tensor`` may hand back their input itself): a result on another device, or
    made fresh, is a copy (as on CUDA)."""
    if type(out) in _CARD_OF or out.untyped_storage().data_ptr() in _storages(inputs):
        with torch.no_grad():
            out = release_to_cpu(_Tensor.clone(out)) if type(out) in _CARD_OF else _Tensor.clone(out)
    return out


def _new_on_card(fleet, func, args, kwargs):
    """``t.new_tensor(data)`` / ``t.new(...)``: the result is on ``t``'s card, whatever device the data is on
    (as on CUDA)."""
    if "device" in kwargs:
        return _factory(fleet, func, args, kwargs)
    tensor = args[0]
    out = func(*args, **kwargs)
    if type(tensor) not in _CARD_OF or not isinstance(out, torch.Tensor):
        return out
    return adopt(_not_an_input(out, args[1:]), tensor._index, fresh=True)


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


def _histc(fleet, func, args, kwargs):
    """CUDA has an integer ``histc`` (Mixtral's router uses it when ``device.type == "cuda"``); the CPU has not."""
    tensor = args[0]
    if type(tensor) in _CARD_OF and not tensor.is_floating_point():
        out = func(tensor.float(), *args[1:], **kwargs).to(tensor.dtype)
        return adopt(out, tensor._index)
    return _generic(fleet, func, args, kwargs)


def _set_data(fleet, func, args, kwargs):
    """``t.data = other`` (what ``Module._apply`` does): ``t`` keeps its identity and moves to ``other``'s device."""
    tensor, value = args[0], args[1]
    func(tensor, value)
    if type(value) in _CARD_OF:
        adopt(tensor, value._index)
    elif type(tensor) in _CARD_OF:
        to_plain(tensor)
    return None


def _deepcopy(fleet, func, args, kwargs):
    tensor = args[0]
    memo = args[1] if len(args) > 1 else kwargs.get("memo", {})
    if type(tensor) not in _CARD_OF:
        return func(*args, **kwargs)
    if id(tensor) in memo:
        return memo[id(tensor)]
    with torch.no_grad():
        new = _Tensor.clone(tensor)
    new.requires_grad_(tensor.requires_grad)
    adopt(new, tensor._index, fresh=True)
    memo[id(tensor)] = new
    state = {k: v for k, v in vars(tensor).items() if k != "_index"}
    for name, value in _copy.deepcopy(state, memo).items():
        setattr(new, name, value)
    grad = tensor.grad  # (read with the mode off: a gradient autograd made may still be a plain object)
    if grad is not None:
        if type(grad) is _Tensor:
            adopt(grad, tensor._index)  # a parameter's gradient lives on its card
        new.grad = _deepcopy(fleet, func, (grad, memo), {})
    return new


# -- backward: autograd's own steps, run below its __torch_function__ check, with the fleet active ------

_BACKWARD_SIGNATURES: dict[Any, inspect.Signature] = {}


def _bound(func, args, kwargs) -> dict[str, Any]:
    signature = _BACKWARD_SIGNATURES.get(func)
    if signature is None:
        signature = _BACKWARD_SIGNATURES[func] = inspect.signature(func)
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


def _backward(fleet, func, args, kwargs):
    """``loss.backward()``, ``torch.autograd.backward``, ``torch.autograd.grad``.

    A ``__torch_function__`` handler runs with its mode switched off, so a plain call here would run the whole
    backward outside the fleet: custom backward code and activation checkpointing's recomputation would then ask
    the CPU build for CUDA. So the handler does what those functions do after their override check
    (``_make_grads``, ``_engine_run_backward``) with the fleet's mode pushed again, and ``AutogradOnCards``
    puts gradients on their cards."""
    a = _bound(func, args, kwargs)
    if func is torch.autograd.grad:
        if a["is_grads_batched"]:
            return func(*args, **kwargs)
        inputs = _as_tuple(a["inputs"])
        result = _run_backward(fleet, _as_tuple(a["outputs"]), a["grad_outputs"], a, inputs,
                               allow_unreachable=a["allow_unused"], accumulate_grad=False)
        if a["materialize_grads"]:
            with VirtualDeviceMode(fleet, strict=False):
                result = tuple(
                    r if r is not None else torch.zeros_like(i, requires_grad=a["create_graph"])
                    for r, i in zip(result, inputs)
                )
        for r, i in zip(result, inputs):  # gradients are on their input's card
            if type(r) is _Tensor and type(i) in _CARD_OF:
                adopt(r, i._index)
        if isinstance(a["inputs"], dict):
            return dict(zip(a["inputs"].keys(), result))
        return result
    if func is _Tensor.backward:
        tensors, grad_tensors = (a["self"],), a["gradient"]
    else:
        tensors = _as_tuple(a["tensors"])
        grad_tensors = a["grad_tensors"] if a["grad_tensors"] is not None else a.get("grad_variables")
    inputs = a["inputs"]
    if inputs is not None:
        inputs = _as_tuple(inputs)
    if not all(isinstance(t, torch.Tensor) for t in tensors) or inputs == ():
        return func(*args, **kwargs)  # gradient edges, or autograd's own error for an empty ``inputs``
    _run_backward(fleet, tensors, grad_tensors, a, inputs or (), allow_unreachable=True, accumulate_grad=True)
    return None


def _as_tuple(value) -> tuple:
    """A tensor, a dict of tensors or an iterable of them (autograd's ``inputs``/``outputs``), as a tuple."""
    if isinstance(value, torch.Tensor):
        return (value,)
    return tuple(value.values() if isinstance(value, dict) else value)


def _run_backward(fleet, tensors, grad_tensors, a, inputs, **engine):
    """Autograd's own steps (``_make_grads``, then the engine) with the fleet's modes pushed again."""
    from torch.autograd import _make_grads, _tensor_or_tensors_to_tuple
    from torch.autograd.graph import _engine_run_backward

    with VirtualDeviceMode(fleet, strict=False), AutogradOnCards():
        grads = _make_grads(tensors, _tensor_or_tensors_to_tuple(grad_tensors, len(tensors)), is_grads_batched=False)
        retain = a["create_graph"] if a["retain_graph"] is None else a["retain_graph"]
        return _engine_run_backward(tensors, grads, retain, a["create_graph"], inputs, **engine)


def _index_devices(value) -> list:
    """The tensors of an index argument (a tensor, or a tuple/list of tensors, slices, None, ints)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, torch.Tensor)]
    return []


# Calls where CUDA accepts CPU tensors next to cuda ones: indexing with CPU indices, assigning CPU values.
def _mixed_ok(fleet, func, args, kwargs):
    first = args[0] if args else None
    card = _CARD_OF.get(type(first))
    if func is not _Tensor.copy_ and len(args) > 1:
        # CUDA's rule for indices: on the CPU or on the indexed tensor's own device
        where = f"cuda:{card}" if card is not None else str(first.device) if isinstance(first, torch.Tensor) else None
        for index in _index_devices(args[1]):
            index_card = _CARD_OF.get(type(index))
            if index_card is not None and index_card != card and not _in_vmap():
                raise RuntimeError(
                    f"indices should be either on cpu or on the same device as the indexed tensor ({where})"
                )
    out = func(*args, **kwargs)
    if card is not None:
        adopt_outputs(out, card, args)
    return out


def _no_cpu_scalars(fleet, func, args, kwargs):
    """Calls that are not elementwise kernels (cat, stack, index_select, embedding): CUDA refuses a 0-dim CPU
    tensor next to cuda ones there too."""
    return _generic(fleet, func, args, kwargs, scalars_ok=False)


def _resize(fleet, func, args, kwargs):
    """``resize_`` / ``resize_as_`` on a card tensor: the card's count follows the storage's new size."""
    tensor = args[0]
    card = _CARD_OF.get(type(tensor))
    if card is None or _tensor_module.active_fleet is None:
        return func(*args, **kwargs)
    storage = tensor.untyped_storage()
    before = (storage.data_ptr(), storage.nbytes())
    out = func(*args, **kwargs)
    storage = tensor.untyped_storage()
    if (storage.data_ptr(), storage.nbytes()) != before:
        recharge(tensor, card, before[0])
    return out


def _tensor(fleet, func, args, kwargs):
    """``torch.tensor(data)`` without ``device=``: a copy of a card tensor stays on its card (as on CUDA); a
    new tensor built from a list of values (``item()`` of card scalars) is a CPU tensor."""
    if "device" in kwargs:
        return _factory(fleet, func, args, kwargs)
    out = func(*args, **kwargs)
    data = args[0] if args else kwargs.get("data")
    card = _CARD_OF.get(type(data))
    if card is not None and isinstance(out, torch.Tensor) and out is not data:
        adopt(out, card)
    return out


def _foreach(fleet, func, args, kwargs):
    """``_foreach_*`` ops take lists whose positions may sit on different cards (optimizers group tensors by
    their real device, the CPU for every card): CUDA's rule and the result's card per list position."""
    lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
    length = len(lists[0]) if lists else 0
    indices: list[int] = []
    for k in range(length):
        index, conflict = -1, None
        for lst in lists:
            t = lst[k]
            if type(t) in _CARD_OF:
                if index < 0:
                    index = t._index
                elif t._index != index:
                    conflict = f"cuda:{t._index}"
            elif t.dim() != 0 and conflict is None:
                conflict = str(t.device)
        if conflict is not None and index >= 0:
            raise mixed_devices_error(f"cuda:{index}", conflict)
        indices.append(index)
    out = func(*args, **kwargs)
    if isinstance(out, (list, tuple)):
        for k, t in enumerate(out):
            if type(t) is _Tensor and k < length and indices[k] >= 0:
                adopt(t, indices[k])
    return out


def _generic(fleet, func, args, kwargs, scalars_ok: bool = True):
    index = _check_devices(args, kwargs, getattr(fleet.thread_state, "strict", True), scalars_ok)
    out = func(*args, **kwargs)
    if index >= 0:
        adopt_outputs(out, index, args)
    return out


_HANDLERS = {
    _Tensor.type: _type,
    _Tensor.new_tensor: _new_on_card,
    _Tensor.new: _new_on_card,
    _Tensor.to: _to,
    _Tensor.cuda: _cuda,
    _Tensor.cpu: _cpu,
    _Tensor.type_as: _type_as,
    _Tensor.numpy: _numpy,
    _Tensor.pin_memory: _pin_memory,
    _Tensor.histc: _histc,
    torch.histc: _histc,
    _Tensor.data.__set__: _set_data,
    _Tensor.__deepcopy__: _deepcopy,
    _Tensor.backward: _backward,
    torch.autograd.backward: _backward,
    torch.autograd.grad: _backward,
    torch.device: _device,
    torch._C._nn._parse_to: _parse_to,
}
for _func in (torch.cat, torch.concat, torch.concatenate, torch.stack, torch.hstack, torch.vstack, torch.dstack,
              torch.index_select, _Tensor.index_select, torch.nn.functional.embedding, torch.embedding):
    _HANDLERS[_func] = _no_cpu_scalars
_HANDLERS[torch.tensor] = _tensor
_HANDLERS[_Tensor.resize_] = _resize
_HANDLERS[_Tensor.resize_as_] = _resize
_HANDLERS[torch._has_compatible_shallow_copy_type] = lambda fleet, func, args, kwargs: func(*args, **kwargs)
for _func in (_Tensor.__getitem__, _Tensor.__setitem__, _Tensor.index_put_, _Tensor.index_put, torch.index_put,
              _Tensor.copy_):
    _HANDLERS[_func] = _mixed_ok

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


def _check_devices(args, kwargs, strict: bool = True, scalars_ok: bool = True) -> int:
    """CUDA's rule for a call: tensors on one card, except (``scalars_ok``, elementwise kernels) 0-dim CPU
    tensors. Returns the card (-1: none). (Checked at the Python call: below it, C++ composites make CPU
    temporaries from a card tensor.) ``strict=False``: plain tensors are no mix (autograd's gradients)."""
    index, plain = -1, None
    for value in (*args, *kwargs.values()) if kwargs else args:
        for item in value if type(value) is list or type(value) is tuple else (value,):
            card = _card_get(type(item))
            if card is not None:
                if card != index:
                    if index >= 0:
                        raise mixed_devices_error(f"cuda:{index}", f"cuda:{card}")
                    index = card
            elif plain is None and isinstance(item, torch.Tensor) and (not scalars_ok or item.dim() != 0):
                plain = item
    if index >= 0 and plain is not None and strict and not _in_vmap():
        raise mixed_devices_error(f"cuda:{index}", str(plain.device))
    return index


def _in_vmap() -> bool:
    """Inside ``vmap`` a card tensor is wrapped in a batched tensor that looks like a plain one (flex attention
    builds and applies its masks so): no device mix can be seen there. Asked only when a mix was found."""
    return torch._C._functorch.maybe_current_level() is not None


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
                    if _tensor_module.active_fleet is not None and out._base is None:
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
