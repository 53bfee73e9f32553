"""Everything the fleet patches beyond ``torch.cuda``: ``torch.compile`` (eager), ``torch.load`` onto cards,
``DataParallel`` over the cards, flex attention masks, ``set_default_device``, ``torch.Generator``,
``record_stream``, autocast, threads started in the fleet, transformers' allocator warm-up and weight
materialization. :func:`patch_targets` lists them all (applied on entry, restored on exit).
"""

from __future__ import annotations

import concurrent.futures
import functools
import sys
import warnings
from typing import Any

import torch

from pytest_llmload._internal.virtual.cuda import (
    DefaultStream,
    accelerator_memory_replacements,
    accelerator_replacements,
    card_index,
    cuda_replacements,
)
from pytest_llmload._internal.virtual.fleet import Fleet
from pytest_llmload._internal.virtual.tensor import NotSimulatedError

_compile_warned = False


def _eager_compile(model=None, **kwargs):
    """``torch.compile`` inside a fleet: dynamo cannot trace virtual tensors, so it runs eagerly; a module
    still comes back as what torch returns (an ``OptimizedModule`` whose ``_orig_mod`` is the module)."""
    global _compile_warned
    if not _compile_warned:
        _compile_warned = True
        warnings.warn("torch.compile runs eagerly on virtual GPUs (pytest-llmload)", stacklevel=2)
    if model is None:
        return lambda fn: _eager_compile(fn)
    if isinstance(model, torch.nn.Module):
        from pytest_llmload._internal.compat.torch import eager_optimized_module

        return eager_optimized_module(model)
    return model


def _load_onto_cards(fleet: Fleet, original):
    """``torch.load(f, map_location="cuda:1")`` (a device, a string or a card number): loaded on the CPU, then
    put on that card, as CUDA would. Other map_locations (dicts, callables) go to torch as given."""
    from torch.utils._pytree import tree_map_only

    from pytest_llmload._internal.virtual.ops import resolve_device

    @functools.wraps(original)
    def load(f, map_location=None, *args, **kwargs):
        target = None
        if isinstance(map_location, (str, torch.device, int)) and not isinstance(map_location, bool):
            target = resolve_device(fleet, map_location)
        if target is None or target.type != "cuda":
            return original(f, map_location, *args, **kwargs)
        loaded = original(f, "cpu", *args, **kwargs)
        return tree_map_only(torch.Tensor, lambda t: t.to(target), loaded)

    return load


def _data_parallel_targets(fleet: Fleet) -> list[tuple[Any, str, Any]]:
    """``torch.nn.DataParallel`` over the visible cards: torch's own replicate/scatter/gather logic, with the
    CUDA-only collectives of ``torch.nn.parallel.comm`` done as copies between cards (values and gradients as
    one device computes them), and the replicas applied one after another instead of in threads."""
    import torch.nn.parallel._functions as functions
    import torch.nn.parallel.comm as comm
    from torch._utils import _get_device_index

    def card(device) -> torch.device:
        return torch.device("cuda", _get_device_index(device, True))

    def broadcast_coalesced(tensors, devices, buffer_size=10485760):
        return [[t.to(card(d)) for t in tensors] for d in devices]

    def reduce_add_coalesced(inputs, destination=None, buffer_size=10485760):
        target = card(destination if destination is not None else fleet.current_device())
        return [functools.reduce(torch.add, (t.to(target) for t in group)) for group in zip(*inputs)]

    def scatter(tensor, devices=None, chunk_sizes=None, dim=0, streams=None, *, out=None):
        if out is not None:
            raise NotSimulatedError("torch.nn.parallel.comm.scatter(out=...)")
        parts = tensor.split(list(chunk_sizes), dim) if chunk_sizes else tensor.chunk(len(devices), dim)
        return tuple(part.to(card(d)).contiguous() for part, d in zip(parts, devices))

    def gather(tensors, dim=0, destination=None, *, out=None):
        if out is not None:
            raise NotSimulatedError("torch.nn.parallel.comm.gather(out=...)")
        target = torch.device("cpu") if destination in (-1, "cpu") else card(
            destination if destination is not None else fleet.current_device())
        return torch.cat([t.to(target) for t in tensors], dim)

    def scatter_forward(ctx, target_gpus, chunk_sizes, dim, input):
        target_gpus = [_get_device_index(x, True) for x in target_gpus]
        ctx.dim = dim
        ctx.input_device = input.get_device() if input.device.type != "cpu" else -1
        return comm.scatter(input, target_gpus, chunk_sizes, dim)  # no copy streams: every op is synchronous

    def parallel_apply(self, replicas, inputs, kwargs):
        outputs = []
        for i, (module, args) in enumerate(zip(replicas, inputs)):
            with torch.cuda.device(self.device_ids[i]):
                args = args if isinstance(args, (list, tuple)) else (args,)
                outputs.append(module(*args, **(kwargs[i] if kwargs else {})))
        return outputs

    return [(comm, "broadcast_coalesced", broadcast_coalesced), (comm, "reduce_add_coalesced", reduce_add_coalesced),
            (comm, "scatter", scatter), (comm, "gather", gather),
            (functions.Scatter, "forward", staticmethod(scatter_forward)),
            (torch.nn.DataParallel, "parallel_apply", parallel_apply)]


def _flex_attention_targets(fleet: Fleet) -> list[tuple[Any, str, Any]]:
    """``create_block_mask``/``create_mask(..., device="cuda:N")``: torch builds them under vmap, whose results
    bypass the fleet's mode (CPU tensors); a mask asked for on a card is put on it, as on CUDA."""
    module = sys.modules.get("torch.nn.attention.flex_attention")
    if module is None:
        return []
    from pytest_llmload._internal.virtual.ops import resolve_device

    def on_card(original, device_position: int):
        @functools.wraps(original)
        def build(*args, **kwargs):
            out = original(*args, **kwargs)
            device = kwargs.get("device", args[device_position] if len(args) > device_position else None)
            target = resolve_device(fleet, device if device is not None else "cuda")
            return out.to(target) if target is not None and target.type == "cuda" else out

        return build

    return [(module, "create_block_mask", on_card(module.create_block_mask, 5)),
            (module, "create_mask", on_card(module.create_mask, 5))]


def _card_default_context(device):
    """``torch.set_default_device("cuda:N")`` inside a fleet: a ``DeviceContext`` pushed *above* the fleet's mode.
    torch puts its own at the bottom of the mode stack, below the fleet, where the device it adds reaches the
    CPU build (``Could not run 'aten::empty.memory_format' with arguments from the 'CUDA' backend``)."""
    import torch.utils._device as device_module
    from torch.overrides import TorchFunctionMode

    class CardDefault(device_module.DeviceContext):
        def __enter__(self):
            self.old_device = device_module.CURRENT_DEVICE
            device_module.CURRENT_DEVICE = self.device
            return TorchFunctionMode.__enter__(self)

        def __exit__(self, *exc):
            device_module.CURRENT_DEVICE = self.old_device
            return TorchFunctionMode.__exit__(self, *exc)

    return CardDefault(device)


def _default_device_setter(fleet: Fleet, original):
    from pytest_llmload._internal.virtual.ops import resolve_device

    @functools.wraps(original)
    def set_default_device(device):
        previous, fleet.default_device_mode = fleet.default_device_mode, None
        if previous is not None:
            previous.__exit__(None, None, None)
        target = resolve_device(fleet, device) if device is not None else None
        if target is None or target.type != "cuda":
            return original(device)
        original(None)
        mode = _card_default_context(target)
        mode.__enter__()
        fleet.default_device_mode = mode
        return None

    return set_default_device


def _generator_class(fleet: Fleet) -> type:
    """``torch.Generator("cuda:N")`` in a fleet: a CPU generator (a card's randomness is the CPU's) whose
    ``device`` is the card; plain generators still pass ``isinstance(g, torch.Generator)``."""
    base = torch._C.Generator

    class _Meta(type(base)):
        def __instancecheck__(cls, obj) -> bool:
            return isinstance(obj, base)

        def __subclasscheck__(cls, sub) -> bool:
            return issubclass(sub, base)

    class Generator(base, metaclass=_Meta):
        __doc__ = base.__doc__

        def __new__(cls, device="cpu"):
            target = resolve_generator_device(fleet, device)
            generator = super().__new__(cls, "cpu" if target.type == "cuda" else device)
            generator._virtual_device = target
            return generator

        def __init__(self, device="cpu") -> None:
            pass

        @property
        def device(self) -> torch.device:
            return self._virtual_device

    Generator.__module__, Generator.__qualname__ = "torch", "Generator"
    return Generator


def resolve_generator_device(fleet: Fleet, device: Any) -> torch.device:
    target = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    if target.type == "cuda":
        return torch.device("cuda", card_index(fleet, target))
    return target


def _record_stream(original):
    """``Tensor.record_stream``: a virtual card has one stream and every op is synchronous, so recording a
    card tensor's use on a stream has nothing to do (exact, not approximate)."""

    @functools.wraps(original)
    def record_stream(self, stream):
        from pytest_llmload._internal.virtual.tensor import _CARD_OF

        if type(self) in _CARD_OF and isinstance(stream, DefaultStream):
            return None
        return original(self, stream)

    return record_stream


def _thread_start_guard(fleet: Fleet, original_start, mode_factory):
    """A ``threading.Thread`` started from a fleet thread runs in the fleet (as on CUDA, where every thread
    sees the cards), on the card that was current where it was started."""

    @functools.wraps(original_start)
    def start(self):
        if getattr(fleet.thread_state, "mode_depth", 0) > 0:
            device = fleet.current_device()
            run = self.run

            def run_in_fleet():
                with mode_factory():
                    fleet.set_device(device)
                    return run()

            self.run = run_in_fleet
        return original_start(self)

    return start


def _submit_guard(fleet: Fleet, original_submit, mode_factory):
    """Thread pools started from a fleet thread (transformers 5 loads weights in one) run in the fleet too."""

    @functools.wraps(original_submit)
    def submit(self, fn, /, *args, **kwargs):
        if getattr(fleet.thread_state, "mode_depth", 0) <= 0:
            return original_submit(self, fn, *args, **kwargs)
        device = fleet.current_device()

        def in_fleet(*a, **k):
            with mode_factory():
                fleet.set_device(device)
                return fn(*a, **k)

        return original_submit(self, in_fleet, *args, **kwargs)

    return submit


def _skip_allocator_warmup(model, expanded_device_map, hf_quantizer):
    """transformers' ``caching_allocator_warmup`` reserves ``min(bytes, total - 1.2 GiB)`` (negative on a small
    card); a virtual card has no caching allocator to warm, so it is skipped."""
    return None


def _materialize_onto_cards(fleet: Fleet, original):
    """transformers 5 reads each checkpoint tensor (``slice[...]``, a fresh CPU tensor) and moves it to its
    device. A fresh tensor that nobody else holds becomes the card's tensor as it is: no second copy, as on
    a CPU load. A tensor that is not fresh (a state_dict the caller passed) is copied as usual."""
    from pytest_llmload._internal.virtual.ops import resolve_device
    from pytest_llmload._internal.virtual.tensor import put_on_card

    @functools.wraps(original)
    def _materialize_copy(tensor, device=None, dtype=None):
        target = resolve_device(fleet, device) if device is not None else None
        if target is None or target.type != "cuda" or isinstance(tensor, torch.Tensor):
            return original(tensor, device, dtype)
        fresh = tensor[...]
        if dtype is not None and fresh.dtype != dtype:
            fresh = fresh.to(dtype=dtype)
        return put_on_card(fresh, target.index)

    return _materialize_copy


def _checkpoint_metadata(original):
    """Activation checkpointing compares each recomputed tensor's shape, dtype and device with the forward's.
    Its hooks run inside a torch call, where a fresh detached copy of a card tensor is a plain object: the
    check compares the real device (the CPU for every card) so the two sides agree as they do on CUDA."""

    @functools.wraps(original)
    def meta(x):
        with torch._C.DisableTorchFunction():
            return {"shape": x.shape, "dtype": x.dtype, "device": torch._C.TensorBase.device.__get__(x)}

    return meta


class _TypesWithCards(list):
    """torch's list of the tensor types its foreach kernels take, with the fleet's card classes in it (a CUDA
    tensor is a plain ``torch.Tensor``). What is appended while the fleet runs (DTensor's import adds itself)
    goes to torch's own list too, so it is still there when the fleet stops and the list is put back."""

    def __init__(self, original: list, cards: list) -> None:
        super().__init__([*original, *cards])
        self.original = original

    def append(self, item) -> None:
        self.original.append(item)
        super().append(item)


def _foreach_targets(fleet: Fleet) -> list[tuple[Any, str, Any]]:
    """Optimizers (``_default_to_fused_or_foreach``) and ``clip_grad_norm_`` take their foreach kernels by
    default for CUDA tensors only where ``type(t) in _foreach_supported_types``: card tensors count, so they
    take the path (and its moment-sized temporaries) CUDA's take, not the per-tensor loop."""
    import torch.optim.optimizer as optimizer
    import torch.utils._foreach_utils as foreach_utils

    from pytest_llmload._internal.virtual.tensor import card_class

    cards = [card_class(i) for i in range(len(fleet.cards))]
    return [(module, "_foreach_supported_types", _TypesWithCards(module._foreach_supported_types, cards))
            for module in (optimizer, foreach_utils)]


def patch_targets(fleet: Fleet, mode_factory) -> list[tuple[Any, str, Any]]:
    """``(object, attribute, replacement)`` for everything the fleet patches."""

    cuda = cuda_replacements(fleet)
    targets: list[tuple[Any, str, Any]] = [(torch.cuda, name, value) for name, value in cuda.items()]
    if hasattr(torch, "accelerator"):
        targets += [
            (torch.accelerator, name, value)
            for name, value in accelerator_replacements(fleet, cuda).items()
            if hasattr(torch.accelerator, name)
        ]
    accelerator_memory = sys.modules.get("torch.accelerator.memory")
    if accelerator_memory is not None:
        targets += [(accelerator_memory, name, value)
                    for name, value in accelerator_memory_replacements(cuda).items() if hasattr(accelerator_memory, name)]
    targets.append((torch, "compile", _eager_compile))
    targets.append((torch, "Generator", _generator_class(fleet)))
    targets.append((torch.Tensor, "record_stream", _record_stream(torch.Tensor.record_stream)))
    import torch._dynamo.config as dynamo_config

    # what was compiled before the fleet started runs eagerly in it too (dynamo cannot trace a card's tensors)
    targets.append((dynamo_config, "disable", True))
    targets.append((torch, "load", _load_onto_cards(fleet, torch.load)))
    targets.append((torch, "set_default_device", _default_device_setter(fleet, torch.set_default_device)))
    targets += _data_parallel_targets(fleet)
    targets += _flex_attention_targets(fleet)
    targets += _foreach_targets(fleet)
    from pytest_llmload._internal.virtual.autocast import autocast_targets

    targets += autocast_targets(lambda: fleet.thread_state)
    import torch.utils.checkpoint as checkpoint

    checks = dict(checkpoint._allowed_determinism_checks_to_fns)
    checks[checkpoint._DEFAULT_DETERMINISM_MODE] = _checkpoint_metadata(checks[checkpoint._DEFAULT_DETERMINISM_MODE])
    targets.append((checkpoint, "_allowed_determinism_checks_to_fns", checks))
    executor = concurrent.futures.ThreadPoolExecutor
    targets.append((executor, "submit", _submit_guard(fleet, executor.submit, mode_factory)))
    import threading

    targets.append((threading.Thread, "start", _thread_start_guard(fleet, threading.Thread.start, mode_factory)))
    from pytest_llmload._internal.compat.transformers import fleet_patch_targets

    # transformers' allocator warmup and weight materialization; a release without them fails the start loudly
    replacements = {"caching_allocator_warmup": lambda module: _skip_allocator_warmup,
                    "_materialize_copy": lambda module: _materialize_onto_cards(fleet, module._materialize_copy)}
    for module, name in fleet_patch_targets():
        targets.append((module, name, replacements[name](module)))
    return targets
