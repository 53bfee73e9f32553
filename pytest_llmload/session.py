"""The session manager: one object per pytest run that holds the options, the cache and the hardware gate.

It owns the matrix (cells, ids, grouping), the gate (skip, or fail in GPU CI mode), the fit check's
state and the markers' run-time checks. The load report, strict-mode summary and baseline live in
:class:`~pytest_llmload.report.Reporter`, a plugin object of its own.
"""

from __future__ import annotations

import hashlib
import os
import pytest

from .errors import LLMLoadError, LLMLoadUsageError
from .marks import MARKERS, parse_mark
from .options import Options, parse_options, reclaim_positional
from .specs import LLMSpec, make_spec

SESSION_KEY = pytest.StashKey["LLMLoadSession"]()


class LLMLoadSession:
    """Holds one run's options, model cache and hardware inventory; gates cells and markers."""

    def __init__(self, config: pytest.Config, options: Options, baseline=None):
        from .report import Reporter

        self.config = config
        self.options = options
        self.reporter = Reporter(config, options, baseline)
        self._cache = None
        self._inventory = None
        self._bitsandbytes_probed = False
        self._needs: dict[LLMSpec, dict] = {}
        self._map_problems: dict[tuple, list[str]] = {}
        self._regressions: list[str] = []  # footprint regressions of the cells the running test used
        self.worker_note = os.environ.get("LLMLOAD_WORKER_GPUS_NOTE")
        from .affinity import Affinity

        self.affinity = Affinity(config, _item_spec)
        self.reporter.notes_from.append(lambda: self.affinity.split_note)

    @classmethod
    def from_config(cls, config: pytest.Config) -> "LLMLoadSession":
        reclaim_positional(config)
        try:
            options = parse_options(config)
            baseline = None
            if options.baseline:
                from .baseline import Baseline

                baseline = Baseline.load(options.baseline, options.baseline_tolerance)
        except LLMLoadUsageError as exc:
            raise pytest.UsageError(str(exc)) from None
        # The total is checked where the GPUs are whole: an xdist worker sees only its own slice.
        if options.min_gpus and not hasattr(config, "workerinput"):
            from .hardware import visible_gpu_count

            found = visible_gpu_count()
            if found < options.min_gpus:
                raise pytest.UsageError(
                    f"--llm-require-gpus={options.min_gpus}: this GPU CI job needs {options.min_gpus} visible "
                    f"GPU{'s' if options.min_gpus > 1 else ''}; found {found}"
                )
        return cls(config, options, baseline)

    # -- the cache, created on first use so that torch is imported only when needed -------
    @property
    def cache(self):
        if self._cache is None:
            from .cache import ModelCache

            self._cache = ModelCache(
                self.options.cache_size,
                trust_remote_code=self.options.trust_remote_code,
                allow_pickle=self.options.allow_pickle,
            )
            self._cache.on_load.append(self.reporter.record_load)
        return self._cache

    def note_use(self, spec: LLMSpec) -> None:
        """The running test used ``spec``'s model: counted in the report, checked against the baseline
        when the test body ends (a regression fails the test, it is not a setup error)."""
        message = self.reporter.note_use(spec)
        if message and message not in self._regressions:
            self._regressions.append(message)

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()
        from .ownership import sweep_dead_sessions

        sweep_dead_sessions()  # offload folders of crashed workers (their finalizers never ran)

    # -- hardware --------------------------------------------------------------------------
    @property
    def inventory(self):
        """This process's GPUs and the bitsandbytes backend (tried on first use, once)."""
        if not self._bitsandbytes_probed:
            import dataclasses

            from .hardware import probe_bitsandbytes

            gpus = self.gpus
            version, backend, error = probe_bitsandbytes("cuda:0" if gpus.gpus else "cpu")
            self._inventory = dataclasses.replace(gpus, bitsandbytes_version=version,
                                                  bitsandbytes_backend=backend, bitsandbytes_error=error)
            self._bitsandbytes_probed = True
        return self._inventory

    @property
    def gpus(self):
        """This process's GPUs only: importing and trying bitsandbytes costs seconds, so only when needed."""
        if self._inventory is None:
            from .hardware import probe_inventory

            self._inventory = probe_inventory(bitsandbytes=False)
        return self._inventory

    def missing_hardware(self, nodeid: str | None, reasons: list[str]) -> None:
        """Skip for missing hardware, or fail in GPU CI mode (``--llm-require-gpus``). No-op without reasons."""
        if not reasons:
            return
        message = "; ".join(reasons)
        if self.options.require_gpus:
            self.reporter.missing[nodeid or "(llm_load)"] = message
            pytest.fail(f"{message} (--llm-require-gpus: missing hardware fails instead of skipping)", pytrace=False)
        raise pytest.skip.Exception(message, _use_item_location=True)

    def check_cell(self, spec: LLMSpec, nodeid: str | None = None, *, own_quantization: bool = False) -> None:
        """Skip (or fail in strict mode) a cell that cannot run here, before anything loads; fail a cell
        whose custom map does not fit the model."""
        from .hardware import cell_reasons
        from .loading import quantized_map_problem
        from .specs import QUANTIZED_PRECISIONS

        problem = quantized_map_problem(spec.precision, spec.device_map)
        if problem and not own_quantization:
            raise pytest.skip.Exception(problem, _use_item_location=True)
        reasons = cell_reasons(spec, self.inventory if spec.precision in QUANTIZED_PRECISIONS else self.gpus)
        if reasons and self.worker_note and _mentions_gpus(reasons):
            reasons.append(self.worker_note)
        self.missing_hardware(nodeid, reasons)
        problems = self.map_problems(spec)
        if problems:
            raise pytest.fail.Exception(
                f"device map {spec.device_map_spec.label} does not fit {spec.model}:\n"
                + "\n".join(f"- {p}" for p in problems), pytrace=False)
        self.missing_hardware(nodeid, self.fit_reasons(spec))

    def map_problems(self, spec: LLMSpec) -> list[str]:
        """``validate_device_map`` of a configured custom map against the model (once per model and map)."""
        if spec.device_map_spec.kind != "custom":
            return []
        key = (spec.model_spec, spec.device_map_spec)
        if key not in self._map_problems:
            from .validation import validate_device_map

            try:
                self._map_problems[key] = validate_device_map(spec.model_spec, spec.device_map,
                                                              gpus=self.gpus.count)
            except LLMLoadError:
                self._map_problems[key] = []  # a broken config: the load reports it, naming the file
        return self._map_problems[key]

    def fit_reasons(self, spec: LLMSpec) -> list[str]:
        """The fit check: why the cell's weights would not fit the memory free now (empty if they would).

        Models the cache holds are released first if that is what makes room.
        """
        if self.options.fit_margin is None or self.cache.holds(spec):
            return []
        from .fit import fit_problems, free_memory, weights_upper_bound

        key = spec
        try:
            bound = weights_upper_bound(spec)
            if bound is not None and key not in self._needs:
                # Cheap first: if the whole model fits on every device it could use, no plan is needed.
                free = free_memory(self.gpus, current=True)
                if not fit_problems({d: bound for d in free}, free, margin=self.options.fit_margin,
                                    context_bytes=self._context_bytes()):
                    return []
            problems = fit_problems(*self._need_and_free(spec, key), margin=self.options.fit_margin,
                                    context_bytes=self._context_bytes())
            if problems and self.cache.cache_info().size:
                self.cache.clear()
                problems = fit_problems(*self._need_and_free(spec, key, fresh=True),
                                        margin=self.options.fit_margin, context_bytes=self._context_bytes())
        except LLMLoadError:
            return []  # the load itself reports a broken config, with its own message
        return problems

    def _need_and_free(self, spec: LLMSpec, key: LLMSpec, fresh: bool = False):
        from .fit import cell_need, free_memory

        free = free_memory(self.gpus, current=True)
        if fresh or key not in self._needs:
            self._needs[key] = cell_need(spec, free)
        return self._needs[key], free

    def _context_bytes(self) -> dict:
        """CUDA context size for each visible GPU this process has not used yet."""
        if not self.gpus.gpus:
            return {}
        from .fit import DEFAULT_CUDA_CONTEXT, measure_cuda_context, used_gpus

        if self.options.cuda_context is None:
            try:
                self.options.cuda_context = measure_cuda_context(0)
            except Exception:  # noqa: BLE001 - a driver that cannot tell: use the usual size
                self.options.cuda_context = DEFAULT_CUDA_CONTEXT
        used = used_gpus()
        return {g.index: 0 if g.index in used else self.options.cuda_context for g in self.gpus.gpus}

    # -- the matrix ------------------------------------------------------------------------
    def default_spec(self) -> LLMSpec:
        o = self.options
        return make_spec(o.models[0], o.device_maps[0], o.precisions[0], o.max_memory)

    def cells(self, axes_override: dict[str, list] | None = None) -> list[LLMSpec]:
        """The matrix for one test: its ``llm`` marker's axes where given, else the options'."""
        axes = {"models": self.options.models, "device_maps": self.options.device_maps,
                "precisions": self.options.precisions, **(axes_override or {})}
        return [
            make_spec(m, d, p, self.options.max_memory)
            for m in axes["models"]
            for d in axes["device_maps"]
            for p in axes["precisions"]
        ]

    @pytest.hookimpl
    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        """Check this plugin's markers once, at collection, and parametrize llm tests over their matrix."""
        axes = None
        try:
            for mark in metafunc.definition.iter_markers():
                if mark.name in MARKERS:
                    parsed = parse_mark(mark, metafunc.definition.nodeid)
                    if mark.name == "llm" and axes is None:
                        axes = parsed  # the closest llm marker wins
        except LLMLoadUsageError as exc:
            raise pytest.fail.Exception(str(exc), pytrace=False) from None
        if "llm_spec" not in metafunc.fixturenames:
            return
        cells = self.cells(axes)
        metafunc.parametrize("llm_spec", cells, ids=matrix_ids(cells), indirect=True)

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        """Group tests by matrix cell when there are more cells than the cache holds, so each loads once."""
        order: dict[LLMSpec, int] = {}
        for item in items:
            spec = _item_spec(item)
            if spec is not None:
                order.setdefault(spec, len(order))
        if len(order) <= self.options.cache_size:
            return
        # Reorder only the llm tests, among the positions they hold; other tests keep their places.
        slots = [i for i, item in enumerate(items) if _item_spec(item) is not None]
        grouped = sorted((items[i] for i in slots), key=lambda item: order[_item_spec(item)])
        for slot, item in zip(slots, grouped):
            items[slot] = item

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        """Hardware markers: skip (or fail in GPU CI mode) with what was needed and what was found."""
        from .hardware import bitsandbytes_reasons, gpu_reasons

        self._regressions = []
        gpu_marks = list(item.iter_markers("requires_gpus"))
        bnb_mark = item.get_closest_marker("requires_bitsandbytes")
        if not gpu_marks and bnb_mark is None:
            return
        reasons: list[str] = []
        try:
            for mark in gpu_marks:
                n, memory = parse_mark(mark, item.nodeid)
                reasons += gpu_reasons(self.gpus, n, memory)
            if bnb_mark is not None:
                parse_mark(bnb_mark, item.nodeid)
        except LLMLoadUsageError as exc:
            raise pytest.fail.Exception(str(exc), pytrace=False) from None
        if reasons and self.worker_note:
            reasons.append(self.worker_note)
        if bnb_mark is not None:
            reasons += bitsandbytes_reasons(self.inventory)
        self.missing_hardware(item.nodeid, _unique(reasons))

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item):
        """After the test body: footprint regressions of the cells it used, and ``max_footprint``."""
        result = yield
        if self._regressions:
            raise pytest.fail.Exception("\n".join(self._regressions), pytrace=False)
        mark = item.get_closest_marker("max_footprint")
        if mark is None:
            return result
        from .assertions import assert_memory_footprint

        try:
            limit = parse_mark(mark, item.nodeid)
        except LLMLoadUsageError as exc:
            raise pytest.fail.Exception(str(exc), pytrace=False) from None
        funcargs = getattr(item, "funcargs", {})
        models = [funcargs[name] for name in ("llm_model", "llm_private_model") if name in funcargs]
        if not models:
            raise pytest.fail.Exception("max_footprint needs the test to use llm_model or llm_private_model",
                                        pytrace=False)
        for model in models:
            try:
                assert_memory_footprint(model, max=limit)
            except AssertionError as exc:
                message = str(exc)
            else:
                continue
            raise pytest.fail.Exception(f"max_footprint: {message}", pytrace=False)
        return result

    def pytest_report_header(self, config: pytest.Config) -> str:
        from .hardware import header_line

        if self.options.require_gpus:  # GPU CI: worth the seconds to try bitsandbytes before any test
            return self.inventory.describe()
        return self._inventory.describe() if self._inventory is not None else header_line()


def matrix_ids(cells: list[LLMSpec]) -> list[str]:
    """Readable test ids, unique: cells whose labels collide get a short hash of what tells them apart."""
    labels = [c.id for c in cells]
    return [f"{c.id}-{hashlib.sha1(c.key.encode()).hexdigest()[:6]}" if labels.count(c.id) > 1 else c.id
            for c in cells]


def _unique(values: list) -> list:
    from .specs import unique

    return unique(values)


def _mentions_gpus(reasons: list[str]) -> bool:
    return any("GPU" in r or "cuda" in r for r in reasons)


def _item_spec(item: pytest.Item) -> LLMSpec | None:
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("llm_spec") if callspec is not None else None
