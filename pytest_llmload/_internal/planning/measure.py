"""Memory measured while tests run: the CPU RSS peak and, per GPU, allocated/reserved peaks (``llm_memory``).

The training-memory estimate lives in :mod:`pytest_llmload._internal.planning.training_memory`.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from pytest_llmload._internal.config.numbers import format_size


# -- measurement -----------------------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass
class MemoryUsage:
    """Peak memory during a block: per GPU (allocated, reserved, driver-level used) and the CPU RSS delta."""

    cpu_peak_delta: int = 0
    gpu_allocated_peak: dict[int, int] = field(default_factory=dict)
    gpu_reserved_peak: dict[int, int] = field(default_factory=dict)
    gpu_used: dict[int, int] = field(default_factory=dict)  # total - free, as nvidia-smi shows it
    seconds: float = 0.0

    def describe(self) -> str:
        parts = [f"cpu +{format_size(self.cpu_peak_delta)}"]
        for index in sorted(self.gpu_allocated_peak):
            parts.append(f"cuda:{index} allocated {format_size(self.gpu_allocated_peak[index])}, reserved "
                         f"{format_size(self.gpu_reserved_peak[index])}, used {format_size(self.gpu_used[index])}")
        return "; ".join(parts)


class _RssSampler(threading.Thread):
    def __init__(self, interval: float = 0.001):
        super().__init__(daemon=True)
        self.interval, self.peak, self._stop_event = interval, _rss(), threading.Event()
        self._lock = threading.Lock()

    def observe(self, rss: int) -> int:
        """Take ``rss`` into the peak (from the sampling thread or a reader) and return the peak."""
        with self._lock:
            self.peak = max(self.peak, rss)
            return self.peak

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.observe(_rss())
            self._stop_event.wait(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.observe(_rss())


class _NoSampler:
    def __init__(self, rss: int) -> None:
        self.peak = rss

    def start(self) -> None:
        return None

    def observe(self, rss: int) -> int:
        self.peak = max(self.peak, rss)
        return self.peak

    def stop(self) -> int:
        return self.peak


class MemoryTracker:
    """Peaks since :meth:`start`, readable at any time (:meth:`snapshot`) and final at :meth:`stop`.

    GPU peaks are reset on start, so trackers that follow each other do not see each other's peaks.
    """

    def __init__(self, *, cpu: bool = True) -> None:
        self.usage = MemoryUsage()
        self.cpu = cpu  # False: GPU peaks only (no RSS sampling thread)
        self._sampler: _RssSampler | None = None
        self._start_rss = 0
        self._start = 0.0


    def start(self) -> "MemoryTracker":
        torch = cuda_in_use()
        if torch is not None:
            for index in range(torch.cuda.device_count()):
                torch.cuda.reset_peak_memory_stats(index)
        self._start_rss = _rss()
        self._sampler = _RssSampler() if self.cpu else _NoSampler(self._start_rss)
        self._sampler.start()
        self._start = time.perf_counter()
        return self

    @property
    def running(self) -> bool:
        return self._sampler is not None

    def snapshot(self) -> MemoryUsage:
        """Fill :attr:`usage` with the peaks so far (the tracker keeps running)."""
        if self._sampler is None:
            return self.usage
        self._fill(self._sampler.observe(_rss()))  # kept: a peak a reader saw is a peak of the whole run
        return self.usage

    def stop(self) -> MemoryUsage:
        if self._sampler is not None:
            self._fill(self._sampler.stop())
            self._sampler = None
        return self.usage

    def _fill(self, peak_rss: int) -> None:
        usage = self.usage
        usage.seconds = time.perf_counter() - self._start
        usage.cpu_peak_delta = max(peak_rss - self._start_rss, 0)
        torch = cuda_in_use()
        if torch is not None:
            for index in range(torch.cuda.device_count()):
                usage.gpu_allocated_peak[index] = int(torch.cuda.max_memory_allocated(index))
                usage.gpu_reserved_peak[index] = int(torch.cuda.max_memory_reserved(index))
                free, total = torch.cuda.mem_get_info(index)
                usage.gpu_used[index] = int(total - free)


def cuda_in_use():
    """torch, where this process has started CUDA (a virtual fleet's included); None where it has not, or
    torch is not imported: then nothing can be on a card and no counter needs reading."""
    import sys

    torch = sys.modules.get("torch")
    try:
        return torch if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized() else None
    except Exception:  # a broken driver is the gate's business, not the counters'
        return None


@contextmanager
def track_memory() -> Iterator[MemoryUsage]:
    """Record peak memory inside the block; GPU peaks are reset on entry so blocks do not see each other."""
    tracker = MemoryTracker().start()
    try:
        yield tracker.usage
    finally:
        tracker.stop()


def saved_activation_bytes(model, inputs: dict[str, Any]) -> int:
    """Bytes autograd saves for backward in one forward pass (storages counted once, weights excluded)."""
    import torch

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[tuple[int, int], int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = model(**inputs)
    loss = getattr(output, "loss", None)
    if loss is not None:
        loss.backward()
    return sum(seen.values())


class MemoryRecorder:
    """What the ``llm_memory`` fixture gives: the whole test's peaks in ``.usage``, blocks with ``.track()``.

    ``.usage`` is live: read during the test, it holds the peaks so far; the plugin records the whole
    test's peaks when the test body ends (in the JSON report's ``tests`` and the report's user_properties).
    """

    def __init__(self) -> None:
        self._tracker = MemoryTracker()

    @property
    def usage(self) -> MemoryUsage:
        return self._tracker.snapshot()

    def start(self) -> None:
        self._tracker.start()

    def stop(self) -> MemoryUsage:
        return self._tracker.stop()

    def track(self):
        return track_memory()
