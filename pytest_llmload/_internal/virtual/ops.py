"""What the fleet's torch-function mode does for each kind of call: moves between devices, factories with a
``device=``, CUDA's same-device rule with its exceptions, backward, deepcopy, resizes (``_HANDLERS``, by
function). ``mode.py`` dispatches to these; the common case (an op on one card's tensors) stays inline there.
"""

from __future__ import annotations

import copy as _copy

import torch

from pytest_llmload._internal.virtual import tensor as _tensor_module
from pytest_llmload._internal.virtual.tensor import (
    _CARD_OF,
    adopt,
    adopt_outputs,
    mixed_devices_error,
    recharge,
    release_to_cpu,
    to_plain,
)

from pytest_llmload._internal.virtual.backward import _backward
from pytest_llmload._internal.virtual.moves import (
    _cpu,
    _cuda,
    _device,
    _numpy,
    _parse_to,
    _to,
    _type,
    _type_as,
    resolve_device,
)

_Tensor = torch.Tensor
_card_get = _CARD_OF.get
_CPU = torch.device("cpu")


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


