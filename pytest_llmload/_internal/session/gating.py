"""The hardware gate: what this process can use, and skipping (or, in GPU CI mode, failing) what it cannot.

``Gate`` probes the GPUs lazily once and tries bitsandbytes only when a quantized cell or a marker
needs it; the reasons themselves are pure functions in :mod:`pytest_llmload._internal.hardware`.
"""

from __future__ import annotations


import pytest

from pytest_llmload.errors import LLMLoadError, LLMLoadUsageError
from pytest_llmload._internal.config.marks import parsed_marks
from pytest_llmload._internal.config.specs import QUANTIZED_PRECISIONS, LLMSpec, unique


class Gate:
    """The plugin object behind ``requires_gpus``/``requires_bitsandbytes`` and every cell's hardware check."""

    def __init__(self, options, reporter, worker_note: str | None = None) -> None:
        self.options = options
        self.reporter = reporter
        self._fit = None
        self._inventory = None
        self._bitsandbytes_probed = False
        self._map_problems: dict[tuple, list[str]] = {}
        self.worker_note = worker_note  # what --llm-gpus-per-worker gave this xdist worker

    @property
    def fit(self):
        """The session's fit check (made on first use: most runs never load a cell)."""
        if self._fit is None:
            from pytest_llmload._internal.planning.fit_check import FitChecker

            self._fit = FitChecker(self.options.fit_margin, self.options.cuda_context)
        return self._fit

    # -- what this process has ---------------------------------------------------------------------
    @property
    def inventory(self):
        """This process's GPUs and the bitsandbytes backend (tried on first use, once)."""
        from pytest_llmload._internal.hardware import probe_inventory, virtual_gpus_now

        if virtual_gpus_now() is not None:  # a virtual fleet (maybe one test's): not cached here
            return probe_inventory(bitsandbytes=True)
        if not self._bitsandbytes_probed:
            import dataclasses

            from pytest_llmload._internal.hardware import bitsandbytes_status

            gpus = self.gpus
            status = bitsandbytes_status("cuda:0" if gpus.gpus else "cpu")  # cached per process
            self._inventory = dataclasses.replace(gpus, bitsandbytes_version=status.version,
                                                  bitsandbytes_backend=status.backend, bitsandbytes_error=status.error)
            self._bitsandbytes_probed = True
        return self._inventory

    @property
    def gpus(self):
        """This process's GPUs only: importing and trying bitsandbytes costs seconds, so only when needed."""
        from pytest_llmload._internal.hardware import probe_inventory, virtual_gpus_now

        if virtual_gpus_now() is not None:
            return probe_inventory(bitsandbytes=False)  # not cached: a marker's fleet lasts one test
        if self._inventory is None:
            self._inventory = probe_inventory(bitsandbytes=False)
        return self._inventory

    # -- skip, or fail in GPU CI mode -----------------------------------------------------------------
    def missing_hardware(self, nodeid: str | None, reasons: list[str]) -> None:
        """Skip for missing hardware, or fail in GPU CI mode (``--llm-require-gpus``). No-op without reasons."""
        if not reasons:
            return
        message = "; ".join(reasons)
        if self.options.require_gpus:
            self.reporter.missing[nodeid or "(llm_load)"] = message
            pytest.fail(f"{message} (--llm-require-gpus: missing hardware fails instead of skipping)", pytrace=False)
        raise pytest.skip.Exception(message, _use_item_location=True)

    def check_cell(self, spec: LLMSpec, cache, nodeid: str | None = None, *, own_quantization: bool = False) -> None:
        """Skip (or fail in strict mode) a cell that cannot run here, before anything loads; fail a cell
        whose custom map does not fit the model."""
        from pytest_llmload._internal.hardware import cell_reasons
        from pytest_llmload._internal.loading.placement import cell_placement

        problem = cell_placement(spec).quantized_problem(spec.precision)
        if problem and not own_quantization:
            raise pytest.skip.Exception(problem, _use_item_location=True)
        reasons = cell_reasons(spec, self.inventory if spec.precision in QUANTIZED_PRECISIONS else self.gpus)
        if reasons and self.worker_note and any("GPU" in r or "cuda" in r for r in reasons):
            reasons.append(self.worker_note)
        self.missing_hardware(nodeid, reasons)
        problems = self.map_problems(spec)
        if problems:
            raise pytest.fail.Exception(
                f"device map {spec.device_map_spec.label} does not fit {spec.model}:\n"
                + "\n".join(f"- {p}" for p in problems), pytrace=False)
        self.missing_hardware(nodeid, self.fit.reasons(spec, cache, self.gpus))

    def map_problems(self, spec: LLMSpec) -> list[str]:
        """``validate_device_map`` of a configured custom map against the model (once per model and map)."""
        if spec.device_map_spec.kind != "custom":
            return []
        key = (spec.model_spec, spec.device_map_spec)
        if key not in self._map_problems:
            from pytest_llmload._internal.planning.validation import validate_device_map

            try:
                self._map_problems[key] = validate_device_map(spec.model_spec, spec.device_map,
                                                              gpus=self.gpus.count)
            except LLMLoadError:
                self._map_problems[key] = []  # a broken config: the load reports it, naming the file
        return self._map_problems[key]

    # -- hooks ------------------------------------------------------------------------------------------
    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        """Hardware markers: skip (or fail in GPU CI mode) with what was needed and what was found."""
        from pytest_llmload._internal.hardware import bitsandbytes_reasons, gpu_reasons

        bnb_mark = item.get_closest_marker("requires_bitsandbytes")
        if item.get_closest_marker("requires_gpus") is None and bnb_mark is None:
            return
        reasons: list[str] = []
        try:
            for n, memory in parsed_marks(item, "requires_gpus"):
                reasons += gpu_reasons(self.gpus, n, memory)
            parsed_marks(item, "requires_bitsandbytes")
        except LLMLoadUsageError as exc:
            raise pytest.fail.Exception(str(exc), pytrace=False) from None
        if reasons and self.worker_note:
            reasons.append(self.worker_note)
        if bnb_mark is not None:
            reasons += bitsandbytes_reasons(self.inventory)
        self.missing_hardware(item.nodeid, unique(reasons))

    def pytest_report_header(self, config: pytest.Config) -> list[str]:
        from pytest_llmload._internal.hardware import header_line, virtual_gpus_now

        if self.options.require_gpus:  # GPU CI: worth the seconds to try bitsandbytes before any test
            lines = [self.inventory.describe()]
        else:
            lines = [self._inventory.describe() if self._inventory is not None else header_line()]
        import sys

        virtual = sys.modules.get("pytest_llmload._internal.virtual")  # imported once a fleet started; not for the header
        fleet = virtual.active_fleet() if virtual is not None else None
        if fleet is not None:
            from pytest_llmload._internal.virtual.pytest_support import inherited_note

            note = inherited_note(config)
            if note:
                lines.append(f"llmload: {note}")
            from pytest_llmload._internal.virtual.fleet import host_ram_note

            note = host_ram_note(fleet.specs)
            if note:
                lines.append(f"llmload: warning: {note}")
        if self.options.hub_kernels and virtual_gpus_now():
            lines.append("llmload: --llm-hub-kernels: hub kernels never apply on virtual GPUs (their CUDA code "
                         "cannot run on CPU cards); loads there pass use_kernels=False")
        elif self.options.hub_kernels:
            lines.append("llmload: hub kernels on (--llm-hub-kernels): transformers may kernelize loads with "
                         "kernels fetched from the Hub (not the code under test)")
        return lines
