"""The session manager: one object per pytest run that holds the options, the cache and the state.

Every hook other than option registration is a method here (registered in ``pytest_configure``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import pytest

from .errors import LLMLoadError, LLMLoadUsageError
from .sizes import parse_size
from .specs import (
    LLMSpec,
    make_spec,
    parse_device_map,
    parse_max_memory,
    parse_model,
    parse_precision,
    split_values,
)

SESSION_KEY = pytest.StashKey["LLMLoadSession"]()
DEFAULT_MODEL = "builtin:tiny-llama"
_MARKER_AXES = {"models": parse_model, "device_maps": parse_device_map, "precisions": parse_precision}


@dataclass
class Options:
    models: list
    device_maps: list
    precisions: list
    max_memory: dict | None
    require_gpus: bool
    min_gpus: int | None
    trust_remote_code: bool
    allow_pickle: bool
    cache_size: int
    report: str | None
    fit_margin: float | None = 0.1  # None: fit check off
    cuda_context: int | None = None  # None: measured
    baseline: str | None = None
    baseline_tolerance: float = 0.05


def _values(config: pytest.Config, name: str) -> list[str]:
    cli = config.getoption(name, None)
    if cli:
        return split_values(cli)
    return split_values(config.getini(name) or [])


def _scalar(config: pytest.Config, name: str) -> Any:
    cli = config.getoption(name, None)
    return cli if cli is not None else config.getini(name)


def _parse_require_gpus(value: Any) -> tuple[bool, int | None]:
    if value in (None, "", False):
        return False, None
    if value is True:
        return True, None
    text = str(value).strip().lower()
    if text in ("true", "yes", "on"):
        return True, None
    if text in ("false", "no", "off"):
        return False, None
    if text.isdigit():
        return (True, int(text)) if int(text) > 0 else (True, None)
    raise LLMLoadUsageError(f"invalid --llm-require-gpus value {value!r}: expected no value, true/false or a GPU count")


def _reclaim_positional(config: pytest.Config) -> None:
    """``pytest --llm-require-gpus tests/`` makes argparse take ``tests/`` as the optional count: give it back."""
    value = config.getoption("llm_require_gpus", None)
    if not isinstance(value, str) or value.strip().lower() in ("true", "yes", "on", "false", "no", "off"):
        return
    if value.strip().isdigit() or not os.path.exists(value.split("::")[0]):
        return
    config.option.llm_require_gpus = "true"
    if config.args_source == pytest.Config.ArgsSource.ARGS:
        config.args.append(value)
    else:
        config.args[:] = [value]
        config.args_source = pytest.Config.ArgsSource.ARGS


def parse_options(config: pytest.Config) -> Options:
    """Read and check every option at start-up; a bad value raises one :class:`LLMLoadUsageError`."""
    models = [parse_model(v) for v in _values(config, "llm_models")] or [parse_model(DEFAULT_MODEL)]
    device_maps = [parse_device_map(v) for v in _values(config, "llm_device_maps")] or [parse_device_map("auto")]
    precisions = [parse_precision(v) for v in _values(config, "llm_precisions")] or ["auto"]
    require, min_gpus = _parse_require_gpus(_scalar(config, "llm_require_gpus"))
    size_text = _scalar(config, "llm_cache_size") or "2"
    if not str(size_text).strip().isdigit() or int(size_text) < 1:
        raise LLMLoadUsageError(f"invalid --llm-cache-size value {size_text!r}: expected a whole number >= 1")
    margin_text = str(_scalar(config, "llm_fit_margin") or "0.1").strip().lower()
    if margin_text in ("off", "no", "false", "none"):
        fit_margin = None
    else:
        try:
            fit_margin = float(margin_text)
            if not 0 <= fit_margin < 1:
                raise ValueError
        except ValueError:
            raise LLMLoadUsageError(
                f"invalid --llm-fit-margin value {margin_text!r}: expected a fraction in [0, 1) such as 0.1, or 'off'"
            ) from None
    context_text = _scalar(config, "llm_cuda_context")
    cuda_context = parse_size(context_text) if context_text and str(context_text) != "auto" else None
    tolerance_text = str(_scalar(config, "llm_footprint_tolerance") or "0.05")
    try:
        baseline_tolerance = float(tolerance_text)
        if baseline_tolerance < 0:
            raise ValueError
    except ValueError:
        raise LLMLoadUsageError(
            f"invalid --llm-footprint-tolerance value {tolerance_text!r}: expected a fraction >= 0 such as 0.05"
        ) from None
    return Options(
        baseline=_scalar(config, "llm_footprint_baseline") or None,
        baseline_tolerance=baseline_tolerance,
        fit_margin=fit_margin,
        cuda_context=cuda_context,
        models=_unique(models),
        device_maps=_unique(device_maps),
        precisions=_unique(precisions),
        max_memory=parse_max_memory(_scalar(config, "llm_max_memory")),
        require_gpus=require,
        min_gpus=min_gpus,
        trust_remote_code=bool(_scalar(config, "llm_trust_remote_code")),
        allow_pickle=bool(_scalar(config, "llm_allow_pickle")),
        cache_size=int(size_text),
        report=_scalar(config, "llm_report") or None,
    )


def _unique(values: list) -> list:
    out = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


class LLMLoadSession:
    """Holds one run's options, model cache and the record of what was loaded."""

    def __init__(self, config: pytest.Config, options: Options):
        self.config = config
        self.options = options
        self._cache = None
        self._inventory = None
        self._needs: dict[tuple, dict] = {}
        self._pending_loads: list[dict] = []
        self._used: set[str] = set()
        self.footprint_regressions: dict[str, str] = {}
        from .report import LoadReport

        self.report = LoadReport()
        self._baseline = None
        self.strict_failures: list[tuple[str, str]] = []
        self.worker_note = os.environ.get("LLMLOAD_WORKER_GPUS_NOTE")

    @classmethod
    def from_config(cls, config: pytest.Config) -> "LLMLoadSession":
        _reclaim_positional(config)
        try:
            options = parse_options(config)
        except LLMLoadUsageError as exc:
            raise pytest.UsageError(str(exc)) from None
        session = cls(config, options)
        try:
            session._baseline = session._load_baseline()
        except LLMLoadUsageError as exc:
            raise pytest.UsageError(str(exc)) from None
        if options.min_gpus:
            from .hardware import visible_gpu_count

            found = visible_gpu_count()
            if found < options.min_gpus:
                raise pytest.UsageError(
                    f"--llm-require-gpus={options.min_gpus}: this GPU CI job needs {options.min_gpus} visible "
                    f"GPU{'s' if options.min_gpus > 1 else ''}; found {found}"
                )
        return session

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
            self._cache.on_load.append(self._record_load)
        return self._cache

    # -- the load report and footprint baselines ---------------------------------------------
    def _record_load(self, entry) -> None:
        from .report import describe_load

        load = describe_load(entry.model, entry.record)
        self._pending_loads.append(load)
        old = self._baseline.get(load["id"]) if self._baseline is not None else None
        if old is not None and load["footprint_bytes"] > old * (1 + self.options.baseline_tolerance):
            from .sizes import format_size

            grown = load["footprint_bytes"] / old - 1
            self.footprint_regressions[load["id"]] = (
                f"footprint of {load['id']} grew by {grown:.1%}: {format_size(old)} ({old} bytes) in the baseline "
                f"{self.options.baseline}, {format_size(load['footprint_bytes'])} ({load['footprint_bytes']} bytes) "
                f"now; the tolerance is {self.options.baseline_tolerance:.0%}"
            )

    def note_use(self, spec: LLMSpec) -> None:
        """The running test used ``spec``'s model (counted in the report, checked against the baseline)."""
        from .report import cell_key

        self._used.add(cell_key(spec))
        message = self.footprint_regressions.get(spec.id)
        if message:
            raise pytest.fail.Exception(message, pytrace=False)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call):
        report = yield
        if call.when == "teardown" and (self._pending_loads or self._used):
            import json

            from .report import PROPERTY

            payload = {"loads": self._pending_loads, "used": sorted(self._used),
                       "worker": os.environ.get("PYTEST_XDIST_WORKER", "main")}
            report.user_properties.append((PROPERTY, json.dumps(payload)))
            self._pending_loads, self._used = [], set()
        return report

    def pytest_runtest_logreport(self, report) -> None:
        if report.when != "teardown":
            return
        import json

        from .report import PROPERTY

        for name, value in report.user_properties:
            if name == PROPERTY:
                payload = json.loads(value)
                self.report.add(payload, payload.get("worker", "main"))

    def _load_baseline(self) -> dict | None:
        path = self.options.baseline
        if not path or not os.path.exists(path):
            return None if not path else {}
        import json

        try:
            with open(path) as f:
                data = json.load(f)
            return {str(k): int(v) for k, v in data["footprints"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise LLMLoadUsageError(
                f"invalid footprint baseline {path}: expected JSON {{\"footprints\": {{cell id: bytes}}}} ({exc})"
            ) from None

    def _write_baseline(self) -> None:
        """Record footprints of cells the baseline does not have yet (existing entries are kept)."""
        import json

        known = dict(self._baseline or {})
        new = {c["id"]: c["footprint_bytes"] for c in self.report.cells.values()
               if "footprint_bytes" in c and c["id"] not in known}
        if not new and os.path.exists(self.options.baseline):
            return
        known.update(new)
        with open(self.options.baseline, "w") as f:
            json.dump({"schema": "pytest-llmload/footprints", "version": 1,
                       "footprints": dict(sorted(known.items()))}, f, indent=2)
            f.write("\n")

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()
        from .safety import sweep_dead_sessions

        sweep_dead_sessions()  # offload folders of crashed workers (their finalizers never ran)

    # -- hardware --------------------------------------------------------------------------
    @property
    def inventory(self):
        """This process's GPUs and bitsandbytes backend, probed on first use, once."""
        from .hardware import virtual_gpus_now

        if virtual_gpus_now() is not None:  # a virtual fleet (maybe one test's): not cached here
            from .hardware import probe_inventory

            return probe_inventory(bitsandbytes=True)
        if self._inventory is None or self._inventory.bitsandbytes_error == "not probed":
            import dataclasses

            from .hardware import probe_bitsandbytes

            gpus = self.gpus
            version, backend, error = probe_bitsandbytes("cuda:0" if gpus.gpus else "cpu")
            self._inventory = dataclasses.replace(gpus, bitsandbytes_version=version,
                                                  bitsandbytes_backend=backend, bitsandbytes_error=error)
        return self._inventory

    @property
    def gpus(self):
        """This process's GPUs only: importing and trying bitsandbytes costs seconds, so only when needed."""
        from .hardware import probe_inventory, virtual_gpus_now

        if virtual_gpus_now() is not None:
            return probe_inventory(bitsandbytes=False)  # not cached: a marker's fleet lasts one test
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
            self.strict_failures.append((nodeid or "(llm_load)", message))
            pytest.fail(f"{message} (--llm-require-gpus: missing hardware fails instead of skipping)", pytrace=False)
        raise pytest.skip.Exception(message, _use_item_location=True)

    def check_cell(self, spec: LLMSpec, nodeid: str | None = None, *, own_quantization: bool = False) -> None:
        """Skip (or fail in strict mode) a cell that cannot run here, before anything loads."""
        from .hardware import cell_reasons
        from .loading import quantized_map_problem

        problem = quantized_map_problem(spec.precision, spec.device_map)
        if problem and not own_quantization:
            raise pytest.skip.Exception(problem, _use_item_location=True)
        from .specs import QUANTIZED_PRECISIONS

        reasons = cell_reasons(spec, self.inventory if spec.precision in QUANTIZED_PRECISIONS else self.gpus)
        if reasons and self.worker_note and _mentions_gpus(reasons):
            reasons.append(self.worker_note)
        self.missing_hardware(nodeid, reasons)
        self.missing_hardware(nodeid, self.fit_reasons(spec))

    def fit_reasons(self, spec: LLMSpec) -> list[str]:
        """The fit check: why the cell's weights would not fit the memory free now (empty if they would).

        Models the cache holds are released first if that is what makes room.
        """
        if self.options.fit_margin is None or self.cache.holds(spec):
            return []
        from .fit import fit_problems, free_memory, weights_upper_bound

        key = (spec.model, spec.device_map_spec.key, spec.precision, spec.max_memory)
        try:
            bound = weights_upper_bound(spec)
            if bound is not None and key not in self._needs:
                # Cheap first: if the whole model fits on every device it could use, no plan is needed.
                free = free_memory(self.gpus, current=True)
                context = self._context_bytes()
                if not fit_problems({d: bound for d in free}, free, margin=self.options.fit_margin,
                                    context_bytes=context):
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

    def _need_and_free(self, spec: LLMSpec, key: tuple, fresh: bool = False):
        from .fit import cell_need, free_memory

        free = free_memory(self.gpus, current=True)
        if fresh or key not in self._needs:
            self._needs[key] = cell_need(spec, free)
        return self._needs[key], free

    def _context_bytes(self) -> dict:
        """CUDA context size for each visible GPU this process has not used yet."""
        if not self.gpus.gpus:
            return {}
        if self.gpus.source == "virtual":
            return {g.index: 0 for g in self.gpus.gpus}  # a virtual card has no CUDA context
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

    def cells(self, marker: pytest.Mark | None = None) -> list[LLMSpec]:
        """The matrix for one test: its ``llm`` marker's axes where given, else the options'."""
        axes = {"models": self.options.models, "device_maps": self.options.device_maps,
                "precisions": self.options.precisions}
        if marker is not None:
            if marker.args:
                raise LLMLoadUsageError(
                    "@pytest.mark.llm takes keyword arguments only: models=, device_maps=, precisions="
                )
            unknown = set(marker.kwargs) - set(_MARKER_AXES)
            if unknown:
                raise LLMLoadUsageError(
                    f"@pytest.mark.llm got unknown argument(s) {', '.join(sorted(unknown))}: "
                    "expected models=, device_maps=, precisions="
                )
            for axis, parse in _MARKER_AXES.items():
                if axis in marker.kwargs:
                    values = marker.kwargs[axis]
                    if isinstance(values, (str, dict, int)):
                        values = [values]
                    axes[axis] = _unique([parse(v) for v in values])
                    if not axes[axis]:
                        raise LLMLoadUsageError(f"@pytest.mark.llm({axis}=...) is empty")
        return [
            make_spec(m, d, p, self.options.max_memory)
            for m in axes["models"]
            for d in axes["device_maps"]
            for p in axes["precisions"]
        ]

    @pytest.hookimpl
    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if "llm_spec" not in metafunc.fixturenames:
            return
        try:
            cells = self.cells(metafunc.definition.get_closest_marker("llm"))
        except LLMLoadUsageError as exc:
            raise pytest.fail(f"{metafunc.definition.nodeid}: {exc}", pytrace=False) from None
        metafunc.parametrize("llm_spec", cells, ids=[c.id for c in cells], indirect=True)

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        """Group tests by matrix cell when there are more cells than the cache holds, so each loads once."""
        order: dict[str, int] = {}
        for item in items:
            spec = _item_spec(item)
            if spec is not None:
                order.setdefault(spec.id, len(order))
        if len(order) <= self.options.cache_size:
            return
        # Reorder only the llm tests, among the positions they hold; other tests keep their places.
        slots = [i for i, item in enumerate(items) if _item_spec(item) is not None]
        grouped = sorted((items[i] for i in slots), key=lambda item: order[_item_spec(item).id])
        for slot, item in zip(slots, grouped):
            items[slot] = item

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        """Hardware markers: skip (or fail in GPU CI mode) with what was needed and what was found."""
        from .hardware import bitsandbytes_reasons, marker_gpu_reasons

        gpu_marks = list(item.iter_markers("requires_gpus"))
        bnb_mark = item.get_closest_marker("requires_bitsandbytes")
        if not gpu_marks and bnb_mark is None:
            return
        reasons: list[str] = []
        try:
            for mark in gpu_marks:
                reasons += marker_gpu_reasons(self.gpus, mark.args, mark.kwargs)
        except LLMLoadUsageError as exc:
            raise pytest.fail.Exception(str(exc), pytrace=False) from None
        if reasons and self.worker_note:
            reasons.append(self.worker_note)
        if bnb_mark is not None:
            reasons += bitsandbytes_reasons(self.inventory)
        self.missing_hardware(item.nodeid, _unique(reasons))

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item):
        """``@pytest.mark.max_footprint(limit)``: after the test body, check the model it used."""
        result = yield
        mark = item.get_closest_marker("max_footprint")
        if mark is None:
            return result
        from .assertions import assert_memory_footprint

        if len(mark.args) != 1 or mark.kwargs:
            raise pytest.fail.Exception("max_footprint takes one limit: @pytest.mark.max_footprint('2 GiB')",
                                        pytrace=False)
        funcargs = getattr(item, "funcargs", {})
        models = [funcargs[name] for name in ("llm_model", "llm_private_model") if name in funcargs]
        if not models:
            raise pytest.fail.Exception("max_footprint needs the test to use llm_model or llm_private_model",
                                        pytrace=False)
        try:
            for model in models:
                assert_memory_footprint(model, max=mark.args[0])
        except LLMLoadUsageError as exc:
            raise pytest.fail.Exception(f"max_footprint: {exc}", pytrace=False) from None
        except AssertionError as exc:
            raise pytest.fail.Exception(f"max_footprint: {exc}", pytrace=False) from None
        return result

    def pytest_report_header(self, config: pytest.Config) -> str:
        from .hardware import header_line

        if self.options.require_gpus:  # GPU CI: worth the seconds to try bitsandbytes before any test
            return self.inventory.describe()
        return self._inventory.describe() if self._inventory is not None else header_line()

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.strict_failures:
            terminalreporter.section("llmload: missing hardware (--llm-require-gpus)", sep="-", red=True)
            for nodeid, reason in self.strict_failures:
                terminalreporter.write_line(f"FAILED {nodeid}: {reason}")
        if not self.report.cells or hasattr(self.config, "workerinput"):
            return
        cells = self.report.cells.values()
        loads, tests = sum(c["loads"] for c in cells), sum(c["tests"] for c in cells)
        terminalreporter.section("llmload: load report", sep="-")
        terminalreporter.write_line(f"llmload: {loads} load(s) of {len(self.report.cells)} cell(s), "
                                    f"used {tests} time(s)")
        terminalreporter.write_line(self.report.table())
        if self.options.report:
            self.report.write(self.options.report)
            terminalreporter.write_line(f"llmload: report written to {self.options.report}")
        if self.options.baseline:
            self._write_baseline()


def _mentions_gpus(reasons: list[str]) -> bool:
    return any("GPU" in r or "cuda" in r for r in reasons)


def _item_spec(item: pytest.Item) -> LLMSpec | None:
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("llm_spec") if callspec is not None else None
