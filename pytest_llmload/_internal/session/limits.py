"""GPU CI limits: ``limit_gpu_memory`` / ``--llm-max-gpu-peak`` (a test's GPU peak) and ``--llm-emulate-gpu``
(every visible card looks and acts smaller).

Peaks are the ones ``llm_memory`` measures (:class:`~pytest_llmload._internal.planning.measure.MemoryTracker`): tracked from
the start of the test's setup, read after its body. torch is imported only where a test asks for a limit
and torch is already in use, or where a real GPU is to be capped.
"""

from __future__ import annotations

import pytest

from pytest_llmload.errors import LLMLoadUsageError
from pytest_llmload._internal.config.marks import closest_mark
from pytest_llmload._internal.config.numbers import format_size

_TRACKER = pytest.StashKey[object]()


def peak_problems(peaks: dict[str, dict[int, int]], limit: int, device: int | None, kind: str,
                  source: str) -> list[str]:
    """The over-limit lines for peaks ``{"allocated": {index: bytes}, "reserved": {...}}`` (pure)."""
    problems = []
    for index, peak in sorted(peaks.get(kind, {}).items()):
        if (device is None or index == device) and peak > limit:
            problems.append(f"Test was limited to {format_size(limit)} of {kind} GPU memory on cuda:{index} "
                            f"but its peak was {format_size(peak)} ({source})")
    return problems


class GpuPeakLimit:
    """The plugin object behind ``limit_gpu_memory`` and ``--llm-max-gpu-peak``."""

    def __init__(self, max_peak: int | None) -> None:
        self.max_peak = max_peak

    def _limit(self, item: pytest.Item):
        if item.get_closest_marker("limit_gpu_memory") is not None:
            try:
                size, device, kind = closest_mark(item, "limit_gpu_memory")
            except LLMLoadUsageError as exc:
                raise pytest.fail.Exception(str(exc), pytrace=False) from None
            return size, device, kind, "limit_gpu_memory"
        if self.max_peak is not None:
            return self.max_peak, None, "allocated", "--llm-max-gpu-peak"
        return None

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        limit = self._limit(item)
        if limit is not None:
            from pytest_llmload._internal.planning.measure import MemoryTracker

            device = limit[1]
            if device is not None:
                import torch

                count = torch.cuda.device_count() if torch.cuda.is_available() else 0
                if count and device >= count:  # without GPUs there is nothing to measure on any card
                    raise pytest.fail.Exception(
                        f"{item.nodeid}: limit_gpu_memory(device={device}): this process sees {count} GPU(s) "
                        f"(cuda:0 to cuda:{count - 1}); no GPU {device}", pytrace=False)

            item.stash[_TRACKER] = MemoryTracker(cpu=False).start()

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item):
        result = yield
        tracker = item.stash.get(_TRACKER, None)
        limit = self._limit(item)
        if tracker is None or limit is None:
            return result
        usage = tracker.stop()
        peaks = {"allocated": dict(usage.gpu_allocated_peak), "reserved": dict(usage.gpu_reserved_peak)}
        recorder = getattr(item, "funcargs", {}).get("llm_memory")
        if recorder is not None and hasattr(recorder, "usage"):  # its peaks too (it may have reset them)
            own = recorder.usage
            for kind, values in (("allocated", own.gpu_allocated_peak), ("reserved", own.gpu_reserved_peak)):
                for index, peak in values.items():
                    peaks[kind][index] = max(peaks[kind].get(index, 0), peak)
        size, device, kind, source = limit
        problems = peak_problems(peaks, size, device, kind, source)
        if problems:
            raise pytest.fail.Exception("\n".join(problems), pytrace=False)
        return result

    def pytest_runtest_teardown(self, item: pytest.Item) -> None:
        tracker = item.stash.get(_TRACKER, None)
        if tracker is not None:
            tracker.stop()
            del item.stash[_TRACKER]


# -- --llm-emulate-gpu ------------------------------------------------------------------------------------
class GpuEmulation:
    """Every visible card looks (inventory, markers, fit check, header) and acts (allocations) ``size`` big."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.capped = False

    def start(self) -> None:
        from pytest_llmload._internal.hardware import set_emulated_memory

        set_emulated_memory(self.size)

    def stop(self) -> None:
        from pytest_llmload._internal.hardware import set_emulated_memory

        set_emulated_memory(None)

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        """Cap the real GPUs once, before the first test's fixtures touch one (never in the xdist controller)."""
        if not self.capped:
            self.capped = True
            cap_real_gpus(self.size)


def cap_real_gpus(size: int) -> list[float]:
    """``torch.cuda.set_per_process_memory_fraction`` so that each real visible card holds at most ``size``."""
    from pytest_llmload._internal.hardware import probe_gpus, virtual_gpus_now

    if virtual_gpus_now() is not None or probe_gpus(torch="never").gpus == []:
        return []  # a virtual fleet (its cards shrink instead), or known to have no GPU
    import torch

    if virtual_gpus_now() is not None or not torch.cuda.is_available():
        return []
    fractions = []
    for index in range(torch.cuda.device_count()):
        total = torch.cuda.get_device_properties(index).total_memory
        fraction = min(size / total, 1.0)
        torch.cuda.set_per_process_memory_fraction(fraction, index)
        fractions.append(fraction)
    return fractions
