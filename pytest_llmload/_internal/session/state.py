"""The session: one object per pytest run that ties the plugin objects together.

Each job is a plugin object of its own module, registered in ``plugin.pytest_configure``: the
:class:`~pytest_llmload._internal.session.matrix.Matrix` (cells, ids, grouping), the :class:`~pytest_llmload._internal.session.gating.Gate`
(hardware: skip, or fail in GPU CI mode), the :class:`~pytest_llmload._internal.session.report.Reporter` (load report,
strict-mode summary, baseline), the :class:`~pytest_llmload._internal.session.affinity.Affinity` (xdist scheduling by
cell). The session itself holds the options, the model cache and the fit check, and runs the checks
that follow a test body (footprint regressions, ``max_footprint``).
"""

from __future__ import annotations

import pytest

from pytest_llmload.errors import LLMLoadUsageError
from pytest_llmload._internal.config.marks import closest_mark
from pytest_llmload._internal.config.options import Options, parse_options, reclaim_positional
from pytest_llmload._internal.config.specs import LLMSpec



class LLMLoadSession:
    """Holds one run's options, model cache and fit check, and the plugin objects that do the rest."""

    def __init__(self, config: pytest.Config, options: Options, baseline=None):
        from pytest_llmload._internal.session.gating import Gate
        from pytest_llmload._internal.session.matrix import Matrix, item_spec
        from pytest_llmload._internal.session.report import Reporter

        self.config = config
        self.options = options
        self.reporter = Reporter(config, options, baseline)
        from pytest_llmload._internal.config.options import WORKER_NOTE

        self.gate = Gate(options, self.reporter, config.stash.get(WORKER_NOTE, None))
        self._lazy: dict[str, object] = {}
        self.matrix = Matrix(options, self.need)
        self.reporter.cell_id = self.matrix.ids  # the report names each cell as its tests' ids do
        self.affinity = None
        if config.pluginmanager.hasplugin("xdist") and (
                hasattr(config, "workerinput") or getattr(config.option, "numprocesses", None)):
            from pytest_llmload._internal.session.affinity import Affinity  # under pytest-xdist only

            self.affinity = Affinity(config, item_spec, self.reporter.add_note)
        self.emulation = None
        if options.emulate_gpu:
            from pytest_llmload._internal.session.limits import GpuEmulation

            self.emulation = GpuEmulation(options.emulate_gpu)
        if self.emulation is not None:
            self.emulation.start()
        self.coverage = None
        if options.coverage:
            from pytest_llmload._internal.session.runners import Coverage

            self.coverage = Coverage(config, options, self.reporter)
        if options.max_gpu_peak is not None:
            self.need("max-gpu-peak")
        from pytest_llmload._internal.session.goldens import Goldens
        from pytest_llmload._internal.session.leaks import LeakCheck

        self.goldens = Goldens(config, options)  # llm_golden, assert_matches_golden, --llm-update-goldens
        self.leaks = LeakCheck(options, self.matrix.ids)  # --llm-leak-check, no_gpu_leak
        self.leaks.release_all = self._release_models
        self._cache = None
        self._regressions: list[str] = []  # footprint regressions of the cells the running test used

    @property
    def plugins(self) -> dict[str, object]:
        """The plugin objects to register, by name."""
        plugins = {"llmload-session": self, "llmload-matrix": self.matrix, "llmload-gate": self.gate,
                   "llmload-reporter": self.reporter, "llmload-goldens": self.goldens,
                   "llmload-leak-check": self.leaks}
        if self.affinity is not None:
            plugins["llmload-affinity"] = self.affinity
        if self.emulation is not None:
            plugins["llmload-emulate-gpu"] = self.emulation
        if self.coverage is not None:
            plugins["llmload-coverage"] = self.coverage
        return {**plugins, **self._lazy}

    def need(self, what: str) -> None:
        """Register, on first need, the plugin objects most runs never use (their imports cost start-up):
        the distributed plugin (launched runs, ``tp`` cells, ``requires_world_size``) and the GPU peak
        limit (``limit_gpu_memory``, ``--llm-max-gpu-peak``)."""
        if what in ("tp", "requires_world_size", "launched") and "llmload-dist" not in self._lazy:
            from pytest_llmload._internal.distributed.plugin import DistPlugin

            self._register("llmload-dist", DistPlugin(self.config, self))
        elif what in ("limit_gpu_memory", "max-gpu-peak") and "llmload-gpu-limit" not in self._lazy:
            from pytest_llmload._internal.session.limits import GpuPeakLimit

            self._register("llmload-gpu-limit", GpuPeakLimit(self.options.max_gpu_peak))

    def _register(self, name: str, plugin: object) -> None:
        self._lazy[name] = plugin
        if self.config.pluginmanager.get_plugin("llmload-session") is self:  # else registered with the rest
            self.config.pluginmanager.register(plugin, name)

    @classmethod
    def from_config(cls, config: pytest.Config) -> "LLMLoadSession":
        reclaim_positional(config)
        try:
            options = parse_options(config)
            baseline = None
            if options.baseline:
                from pytest_llmload._internal.session.baseline import Baseline

                baseline = Baseline.load(options.baseline, options.baseline_tolerance)
        except LLMLoadUsageError as exc:
            raise pytest.UsageError(str(exc)) from None
        # The total is checked where the GPUs are whole: an xdist worker sees only its own slice.
        if options.min_gpus and not options.coverage and not hasattr(config, "workerinput"):  # coverage: a plan
            from pytest_llmload._internal.hardware import visible_gpu_count

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
            from pytest_llmload._internal.loading.cache import ModelCache

            self._cache = ModelCache(
                self.options.cache_size,
                trust_remote_code=self.options.trust_remote_code,
                allow_pickle=self.options.allow_pickle,
                hub_kernels=self.options.hub_kernels,
            )
            self._cache.on_load.append(self.reporter.record_load)
            if self.options.leak_check != "off":
                self._cache.watch = self.leaks
        return self._cache

    # -- what the fixtures ask -------------------------------------------------------------
    @property
    def inventory(self):
        return self.gate.inventory

    def default_spec(self) -> LLMSpec:
        return self.matrix.default_spec()

    def check_cell(self, spec: LLMSpec, nodeid: str | None = None, *, own_quantization: bool = False) -> None:
        self.gate.check_cell(spec, self.cache, nodeid, own_quantization=own_quantization)

    def note_use(self, spec: LLMSpec) -> None:
        """The running test used ``spec``'s model: counted in the report, checked against the baseline
        when the test body ends (a regression fails the test, it is not a setup error)."""
        message = self.reporter.note_use(spec)
        if message and message not in self._regressions:
            self._regressions.append(message)

    def _release_models(self) -> None:
        if self._cache is not None:
            self._cache.clear()

    def close(self) -> None:
        if self.emulation is not None:
            self.emulation.stop()
        if self._cache is not None:
            self._cache.watch = None  # the leak check reported at the session's end; unconfigure only cleans up
            self._cache.close()
        if self.affinity is not None:
            self.affinity.close()
        dist = self._lazy.get("llmload-dist")
        if dist is not None:
            dist.close()
        from pytest_llmload._internal.loading.ownership import sweep_dead_sessions

        sweep_dead_sessions()  # offload folders of crashed workers (their finalizers never ran)

    # -- after the test body -----------------------------------------------------------------
    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        self._regressions = []

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item):
        """After the test body: footprint regressions of the cells it used, and ``max_footprint``."""
        result = yield
        if self._regressions:
            raise pytest.fail.Exception("\n".join(self._regressions), pytrace=False)
        mark = item.get_closest_marker("max_footprint")
        if mark is None:
            return result
        from pytest_llmload.assertions import assert_memory_footprint

        try:
            limit = closest_mark(item, "max_footprint")
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
                raise pytest.fail.Exception(f"max_footprint: {exc}", pytrace=False) from None
        return result
