"""The fleet itself: the spec parser, the cards, per-card allocation accounting and CUDA-shaped OOMs.

Pure Python (no torch import at module level) so a spec can be checked without loading torch.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

from pytest_llmload._internal.config.numbers import format_size, is_whole_number, parse_cards
from pytest_llmload._internal.hardware.sources import _emulation_listeners, emulated_memory, visible_device_ids

DEFAULT_CAPABILITY = (8, 0)
DEFAULT_NAME = "Virtual GPU (CPU)"
# CUDA's caching allocator hands out blocks in multiples of 512 bytes; memory_allocated shows that rounding.
_ALLOC_ROUND = 512

@dataclass(frozen=True)
class CardSpec:
    """One virtual card as the user asked for it."""

    total_memory: int
    capability: tuple[int, int] = DEFAULT_CAPABILITY
    name: str = DEFAULT_NAME


def parse_virtual_spec(spec: object, name: str | None = None, what: str = "virtual GPU spec") -> list[CardSpec]:
    """``"2x24GiB"``, ``"24GiB,16GiB"``, ``"2x80GiB@9.0"`` -> one ``CardSpec`` per card (the one card-spec
    grammar, :func:`~pytest_llmload._internal.config.numbers.parse_cards`). A capability written after the last
    item is the fleet's (``"24GiB,16GiB@9.0"``: both cards); one written after another item is that item's."""
    groups = parse_cards(spec, what)
    fleet_capability = groups[-1].capability or DEFAULT_CAPABILITY
    return [CardSpec(group.size, group.capability or fleet_capability, name or DEFAULT_NAME)
            for group in groups for _ in range(group.count)]


def host_ram_note(cards: list[CardSpec]) -> str | None:
    """A warning for the header when the cards hold more than this host's available RAM, else None."""
    import psutil

    capacity = sum(card.total_memory for card in cards)
    available = psutil.virtual_memory().available
    if capacity <= available:
        return None
    return (f"virtual GPUs {describe_fleet(cards)} hold {format_size(capacity)}, more than this host's "
            f"{format_size(available)} of available RAM: an allocation the host cannot back raises CUDA's "
            "out-of-memory error")


def describe_fleet(cards: list[CardSpec]) -> str:
    """``2x64.0 MiB`` or ``24.0 GiB,16.0 GiB`` (the header's words for a fleet)."""
    sizes = [format_size(card.total_memory) for card in cards]
    if len(set(sizes)) == 1:
        return f"{len(sizes)}x{sizes[0]}"
    return ",".join(sizes)


def visible_ordinals(count: int) -> list[int]:
    """Physical cards that CUDA_VISIBLE_DEVICES exposes, in the order it names them (CUDA's rules:
    the list ends at the first entry that is not a card of this machine)."""
    ids = visible_device_ids()  # the one reader of the variable (hardware/sources.py)
    if ids is None:
        return list(range(count))
    if not ids:
        from pytest_llmload._internal.hardware.xdist import WORKER_SLICE, worker_gpus

        if WORKER_SLICE:  # an xdist worker of a GPU-less machine (--llm-gpus-per-worker): its slice of these cards
            index, per_worker = WORKER_SLICE
            return [int(i) for i in worker_gpus(index, per_worker, [str(i) for i in range(count)])]
    ordinals: list[int] = []
    for part in ids:
        if not is_whole_number(part) or int(part) >= count or int(part) in ordinals:
            break  # "²" and "٣" pass str.isdigit but are no card numbers
        ordinals.append(int(part))
    return ordinals


def cuda_format_size(num_bytes: int) -> str:
    """The size format of CUDA's allocator messages (``20.00 MiB``)."""
    if num_bytes <= 1024:
        return f"{num_bytes} bytes"
    for unit, scale in (("KiB", 2**10), ("MiB", 2**20), ("GiB", 2**30)):
        if num_bytes < scale * 1024 or unit == "GiB":
            return f"{num_bytes / scale:.2f} {unit}"
    raise AssertionError("unreachable")


_live_fleets: weakref.WeakSet = weakref.WeakSet()


def _emulation_changed() -> None:
    """``--llm-emulate-gpu`` (hardware/sources.py owns the size): every virtual card, running or started
    later, holds at most that many bytes."""
    for fleet in list(_live_fleets):
        with fleet.lock:
            for card in fleet.cards:
                card.limit = card.total_memory
                card.reserved = card.allocated  # the next growth is checked against the new limit


@dataclass
class Card:
    """A visible virtual card and its allocation counters (bytes)."""

    spec: CardSpec
    allocated: int = 0
    peak_allocated: int = 0
    reserved: int = 0
    peak_reserved: int = 0
    limit: int = 0  # total_memory, kept here: allocate() reads it for every new tensor

    def __post_init__(self) -> None:
        self.limit = self.total_memory

    @property
    def total_memory(self) -> int:
        emulated = emulated_memory()
        return self.spec.total_memory if emulated is None else min(self.spec.total_memory, emulated)


@dataclass(eq=False)
class Fleet:
    """The cards a process sees while a fleet is active, and what each holds."""

    specs: list[CardSpec]
    cards: list[Card] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    default_device_mode: Any = None  # torch.set_default_device("cuda:N") inside the fleet (virtual/patches.py)
    mode_class: Any = None  # the fleet's torch-function mode class, set when it starts (virtual/__init__.py)

    def __post_init__(self) -> None:
        self.cards = [Card(self.specs[i]) for i in visible_ordinals(len(self.specs))]
        self.thread_state = threading.local()
        _live_fleets.add(self)

    # -- current device (per thread, like CUDA) --
    def current_device(self) -> int:
        return getattr(self.thread_state, "device", 0)

    def set_device(self, index: int) -> None:
        self.thread_state.device = self.check_index(index)

    def check_index(self, index: int) -> int:
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(self.cards):
            raise RuntimeError(
                f"CUDA error: invalid device ordinal (virtual GPU {index!r}; "
                f"this fleet has {len(self.cards)} visible card(s))"
            )
        return index

    # -- accounting --
    def allocate(self, index: int, num_bytes: int) -> int:
        """Charge ``num_bytes`` to card ``index``; a card past its capacity raises CUDA's OOM."""
        rounded = (num_bytes + _ALLOC_ROUND - 1) // _ALLOC_ROUND * _ALLOC_ROUND
        card = self.cards[index]
        with self.lock:
            allocated = card.allocated + rounded
            if allocated > card.reserved:  # reserved <= limit: below it there is room
                if allocated > card.limit:
                    raise self.out_of_memory(index, rounded)
                card.reserved = allocated
                if allocated > card.peak_reserved:
                    card.peak_reserved = allocated
            card.allocated = allocated
            if allocated > card.peak_allocated:
                card.peak_allocated = allocated
        return rounded

    def free(self, index: int, rounded: int) -> None:
        with self.lock:
            self.cards[index].allocated -= rounded

    def out_of_memory(self, index: int, num_bytes: int, *, host_available: int | None = None) -> BaseException:
        """CUDA's OOM for card ``index``; with ``host_available``, the card had room but the host's RAM could
        not back the allocation (a card bigger than the RAM free on this machine)."""
        import torch

        card = self.cards[index]
        why = ("virtual GPU: a CPU-backed card of this pytest-llmload fleet" if host_available is None else
               f"virtual GPU: the host could not back it: {format_size(host_available)} of RAM available")
        free = max(card.total_memory - card.reserved, 0)
        return torch.OutOfMemoryError(
            f"CUDA out of memory. Tried to allocate {cuda_format_size(num_bytes)}. GPU {index} has a total "
            f"capacity of {cuda_format_size(card.total_memory)} of which {cuda_format_size(free)} is free. "
            f"Of the allocated memory {cuda_format_size(card.allocated)} is allocated by PyTorch, and "
            f"{cuda_format_size(card.reserved - card.allocated)} is reserved by PyTorch but unallocated. ({why})"
        )

    def empty_cache(self) -> None:
        with self.lock:
            for card in self.cards:
                card.reserved = card.allocated

    def reset_peak(self, index: int) -> None:
        with self.lock:
            card = self.cards[index]
            card.peak_allocated = card.allocated
            card.peak_reserved = card.reserved

    def mem_get_info(self, index: int) -> tuple[int, int]:
        card = self.cards[index]
        return max(card.total_memory - card.reserved, 0), card.total_memory


if _emulation_changed not in _emulation_listeners:
    _emulation_listeners.append(_emulation_changed)
