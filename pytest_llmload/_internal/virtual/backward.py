"""A backward started on the fleet: autograd's own steps, run with the fleet's modes pushed again, so what
autograd computes from card tensors stays on the cards (and is charged there).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from pytest_llmload._internal.virtual.tensor import (
    AutogradOnCards,
    _CARD_OF,
    adopt,
)

_Tensor = torch.Tensor


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
            with fleet.mode_class(fleet, strict=False):
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

    with fleet.mode_class(fleet, strict=False), AutogradOnCards():
        grads = _make_grads(tensors, _tensor_or_tensors_to_tuple(grad_tensors, len(tensors)), is_grads_batched=False)
        retain = a["create_graph"] if a["retain_graph"] is None else a["retain_graph"]
        return _engine_run_backward(tensors, grads, retain, a["create_graph"], inputs, **engine)


