"""``torch.cuda.*`` (and ``torch.accelerator.*``) answered by the fleet, patched in on entry and restored on exit."""

from __future__ import annotations

import concurrent.futures
import functools
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch

from pytest_llmload._internal.virtual.fleet import Fleet
from pytest_llmload._internal.virtual.tensor import NotSimulatedError


@dataclass(frozen=True)
class VirtualDeviceProperties:
    """What ``torch.cuda.get_device_properties`` returns for a virtual card."""

    name: str
    total_memory: int
    major: int
    minor: int
    multi_processor_count: int = 1
    is_integrated: bool = False
    uuid: str = ""

    def __repr__(self) -> str:
        return (
            f"_CudaDeviceProperties(name='{self.name}', major={self.major}, minor={self.minor}, "
            f"total_memory={self.total_memory // 2**20}MB, multi_processor_count={self.multi_processor_count})"
        )


def card_index(fleet: Fleet, device: Any = None) -> int:
    """CUDA's reading of a ``device`` argument: None -> current, int, 'cuda:1', torch.device."""
    if device is None:
        return fleet.current_device()
    if isinstance(device, str):
        device = torch.device(device)
    if isinstance(device, torch.device):
        if device.type != "cuda":
            raise ValueError(f"Expected a cuda device, but got: {device}")
        return fleet.current_device() if device.index is None else fleet.check_index(device.index)
    return fleet.check_index(int(device))


def _not_simulated_class(feature: str) -> type:
    def __new__(cls, *args, **kwargs):
        raise NotSimulatedError(feature)

    return type(feature.replace(".", "_"), (), {"__new__": __new__})


def _not_simulated_function(feature: str) -> Callable[..., Any]:
    def raise_not_simulated(*args, **kwargs):
        raise NotSimulatedError(feature)

    return raise_not_simulated


class DefaultStream:
    """The default stream of a virtual card: every op is synchronous, so it is always idle and never
    capturing. Other streams (and anything else a stream does) are not simulated."""

    def __init__(self, index: int) -> None:
        self.device_index = index
        self.device = torch.device("cuda", index)

    def is_capturing(self) -> bool:
        return False

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        raise NotSimulatedError(f"Stream.{name}")


def cuda_replacements(fleet: Fleet) -> dict[str, Any]:
    """The ``torch.cuda`` attributes the fleet answers, by name."""

    def card(device=None):
        return fleet.cards[card_index(fleet, device)]

    def props(device=None) -> VirtualDeviceProperties:
        chosen = card(device)
        return VirtualDeviceProperties(
            chosen.spec.name, chosen.total_memory, chosen.spec.capability[0], chosen.spec.capability[1]
        )

    class device:
        """``with torch.cuda.device(i):`` on the fleet."""

        def __init__(self, device: Any) -> None:
            self.idx = -1 if device is None or device == -1 else card_index(fleet, device)
            self.prev_idx = -1

        def __enter__(self):
            self.prev_idx = fleet.current_device()
            if self.idx >= 0:
                fleet.set_device(self.idx)

        def __exit__(self, *exc):
            fleet.set_device(self.prev_idx)
            return False

    def memory_stats(device=None) -> dict[str, int]:
        chosen = card(device)
        return {
            "allocated_bytes.all.current": chosen.allocated,
            "allocated_bytes.all.peak": chosen.peak_allocated,
            "reserved_bytes.all.current": chosen.reserved,
            "reserved_bytes.all.peak": chosen.peak_reserved,
            "active_bytes.all.current": chosen.allocated,
            "active_bytes.all.peak": chosen.peak_allocated,
        }

    def noop(*args, **kwargs) -> None:
        return None

    def set_fraction(fraction, device=None) -> None:
        """CUDA's cap on what this process may allocate on a card: the card's own limit (an OOM past it)."""
        if not isinstance(fraction, float):  # CUDA's own checks, word for word
            raise TypeError("Invalid type for fraction argument, must be `float`")
        if fraction < 0 or fraction > 1:
            raise ValueError(f"Invalid fraction value: {fraction}. Allowed range: 0~1")
        chosen = card(device)
        with fleet.lock:
            chosen.limit = int(chosen.total_memory * fraction)
            chosen.reserved = min(chosen.reserved, max(chosen.allocated, chosen.limit))

    def summary(device=None) -> str:
        index = card_index(fleet, device)
        chosen = fleet.cards[index]
        return (f"|  virtual GPU {index} ({chosen.spec.name}, pytest-llmload): a CPU-backed card\n"
                f"|  allocated {chosen.allocated} bytes (peak {chosen.peak_allocated}); "
                f"reserved {chosen.reserved} bytes (peak {chosen.peak_reserved}); "
                f"capacity {chosen.total_memory} bytes\n")

    def manual_seed(seed) -> None:  # not torch.manual_seed: that calls torch.cuda.manual_seed_all
        torch.default_generator.manual_seed(int(seed))

    def reseed() -> None:
        torch.default_generator.seed()

    def get_rng_state(device="cuda"):
        card_index(fleet, device)  # an unknown card is CUDA's error
        return torch.get_rng_state()

    def set_rng_state(new_state, device="cuda") -> None:
        card_index(fleet, device)
        torch.set_rng_state(new_state)

    def set_rng_state_all(new_states) -> None:
        for new_state in new_states:
            torch.set_rng_state(new_state)

    def in_fleet() -> bool:
        return getattr(fleet.thread_state, "mode_depth", 0) > 0

    # A thread that is not in the fleet (the main thread while a fleet runs in a worker thread it started)
    # sees the machine's own CUDA: its torch calls do not run on the cards, so it is not told they exist.
    original_available, original_count = torch.cuda.is_available, torch.cuda.device_count
    replacements: dict[str, Any] = {
        "is_available": lambda: bool(fleet.cards) if in_fleet() else original_available(),
        "device_count": lambda: len(fleet.cards) if in_fleet() else original_count(),
        "is_initialized": lambda: True,
        "init": noop,
        "_lazy_init": noop,
        "current_device": fleet.current_device,
        "set_device": lambda device: fleet.set_device(card_index(fleet, device)),
        "device": device,
        "synchronize": lambda device=None: (card_index(fleet, device), None)[1],
        "empty_cache": fleet.empty_cache,
        "mem_get_info": lambda device=None: fleet.mem_get_info(card_index(fleet, device)),
        "get_device_properties": props,
        "get_device_name": lambda device=None: props(device).name,
        "get_device_capability": lambda device=None: card(device).spec.capability,
        "memory_allocated": lambda device=None: card(device).allocated,
        "max_memory_allocated": lambda device=None: card(device).peak_allocated,
        "memory_reserved": lambda device=None: card(device).reserved,
        "max_memory_reserved": lambda device=None: card(device).peak_reserved,
        "memory_stats": memory_stats,
        "reset_peak_memory_stats": lambda device=None: fleet.reset_peak(card_index(fleet, device)),
        "reset_max_memory_allocated": lambda device=None: fleet.reset_peak(card_index(fleet, device)),
        "is_bf16_supported": lambda including_emulation=True: bool(fleet.cards)
        and (including_emulation or props(0).major >= 8),
        "current_stream": lambda device=None: DefaultStream(card_index(fleet, device)),
        "default_stream": lambda device=None: DefaultStream(card_index(fleet, device)),
        # Randomness on virtual cards comes from the CPU generator: every card shares it, so seeding a card
        # seeds it (randn on a card is repeatable after torch.cuda.manual_seed, as on CUDA) and a card's RNG
        # state is its state (activation checkpointing saves and restores it where real CUDA is initialised).
        "manual_seed": manual_seed,
        "manual_seed_all": manual_seed,
        "seed": reseed,
        "seed_all": reseed,
        "initial_seed": torch.initial_seed,
        "get_rng_state": get_rng_state,
        "set_rng_state": set_rng_state,
        "get_rng_state_all": lambda: [torch.get_rng_state() for _ in fleet.cards],
        "set_rng_state_all": set_rng_state_all,
    }
    replacements.update(
        memory_summary=lambda device=None, abbreviated=False: summary(device),
        memory_snapshot=lambda *args, **kwargs: [],  # no segments: a virtual card has no caching allocator
        can_device_access_peer=lambda device, peer: (card_index(fleet, device), card_index(fleet, peer)) and True,
        reset_accumulated_memory_stats=lambda device=None: (card_index(fleet, device), None)[1],
        ipc_collect=noop,
        get_sync_debug_mode=lambda: 0,
        set_sync_debug_mode=lambda debug_mode: None,
        is_current_stream_capturing=lambda: False,
        device_of=lambda obj: device(obj.get_device() if obj.is_cuda else -1),
        set_per_process_memory_fraction=set_fraction,
    )
    for feature in ("Stream", "Event", "ExternalStream", "CUDAGraph", "graph"):
        replacements[feature] = _not_simulated_class(f"torch.cuda.{feature}")
    for feature in (
        "stream", "set_stream", "make_graphed_callables",
        "graph_pool_handle", "caching_allocator_alloc",
    ):
        replacements[feature] = _not_simulated_function(f"torch.cuda.{feature}")
    return replacements


def accelerator_replacements(fleet: Fleet, cuda: dict[str, Any]) -> dict[str, Any]:
    """``torch.accelerator.*``: the same answers, for code that asks the generic API."""
    return {
        "is_available": cuda["is_available"],
        "device_count": cuda["device_count"],
        "current_accelerator": lambda check_available=False: torch.device("cuda") if fleet.cards else None,
        "current_device_index": fleet.current_device,
        "current_device_idx": fleet.current_device,
        "set_device_index": cuda["set_device"],
        "set_device_idx": cuda["set_device"],
        "synchronize": cuda["synchronize"],
        "empty_cache": cuda["empty_cache"],
        "memory_allocated": cuda["memory_allocated"],
        "max_memory_allocated": cuda["max_memory_allocated"],
        "memory_reserved": cuda["memory_reserved"],
        "max_memory_reserved": cuda["max_memory_reserved"],
        "reset_peak_memory_stats": cuda["reset_peak_memory_stats"],
        "get_memory_info": cuda["mem_get_info"],
        "current_stream": cuda["current_stream"],
    }


def accelerator_memory_replacements(cuda: dict[str, Any]) -> dict[str, Any]:
    """``torch.accelerator.memory``: its functions read ``memory_stats`` of this module; the fleet answers."""
    return {
        "memory_stats": cuda["memory_stats"],
        "empty_cache": cuda["empty_cache"],
        "get_memory_info": cuda["mem_get_info"],
        "reset_peak_memory_stats": cuda["reset_peak_memory_stats"],
        "reset_accumulated_memory_stats": cuda["reset_accumulated_memory_stats"],
    }


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

    from pytest_llmload._internal.virtual.mode import resolve_device

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
    from pytest_llmload._internal.virtual.mode import resolve_device

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
    from pytest_llmload._internal.virtual.mode import resolve_device

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
    from pytest_llmload._internal.virtual.mode import resolve_device
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
