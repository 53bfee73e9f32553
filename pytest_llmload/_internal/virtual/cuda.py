"""``torch.cuda.*`` (and ``torch.accelerator.*``) answered by the fleet, patched in on entry and restored on exit."""

from __future__ import annotations

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
