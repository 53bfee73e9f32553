"""The leak check: ``--llm-leak-check=loads|tests|off`` and ``@pytest.mark.no_gpu_leak``.

*loads* (the default): each model the session cache releases (evicted, a ``llm_private_model`` at its
test's end, every model at the session's end) must be collected, with all its tensors, and give back the
GPU memory its load allocated. If not, a warning (a failure under ``--llm-require-gpus``) names the cell and
the chain of references that keeps it alive.

*tests* (and ``no_gpu_leak`` for one test): GPU memory allocated after a test's teardown must equal what it
was before its setup, less what the session cache and fixtures of a wider scope took in between. A test
that leaves more fails, listing the GPU tensors still alive and who holds the largest.

A clean test costs two readings of the GPU counters (none where CUDA never started); the collector runs
only when a reading says something stayed. Nothing here imports torch: the counters are read where torch
is already imported.
"""

from __future__ import annotations

import warnings
import weakref
from typing import TYPE_CHECKING, Any, Callable

import pytest

from pytest_llmload.errors import LLMLoadLeakWarning

if TYPE_CHECKING:  # imported where a load is watched: a run that loads nothing pays nothing for it
    from pytest_llmload._internal.checks.leaks import LoadWatch

_WORKER_KEY = "llmload_leaks"
_SLACK = 64 * 1024  # bytes of a released load's memory not reported when the model and its weights are gone


class LeakCheck:
    """The pytest plugin ("llmload-leak-check") and the session cache's watcher."""

    def __init__(self, options, cell_id: Callable[[Any], str] = lambda spec: spec.id) -> None:
        self.mode = options.leak_check
        self.strict = bool(options.require_gpus)
        self.cell_id = cell_id
        # (domain, device) -> bytes the cached models' loads took; a domain is a fleet or the machine's CUDA
        # (a test's fleet ends with it while the models it loaded stay cached: counters of one domain only)
        self.cache_held: dict[tuple, int] = {}
        self.fixture_held: dict[int, tuple] = {}  # id(wider-scoped FixtureDef) -> (domain, what its setup took)
        self.pending: list[LoadWatch] = []  # private copies released; checked after their test's teardown
        self.private: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # private model -> LoadWatch
        self.held: dict[int, LoadWatch] = {}  # the cached models' watches, by id
        self.found: list[str] = []  # leaks found where no test can fail (the session's end)
        self.release_all: Callable[[], None] = lambda: None  # the session's: releases every cached model
        self._at_end = False
        self._item: pytest.Item | None = None  # the test running now
        self._reported: dict[int, weakref.ref] = {}  # GPU tensors a report named already, by id
        self._before: tuple | None = None
        self._failed: set[str] = set()

    @property
    def on(self) -> bool:
        return self.mode != "off"

    # -- the cache's side -------------------------------------------------------------------------------
    def before_load(self) -> tuple:
        from pytest_llmload._internal.checks.leaks import gpu_allocated, memory_domain

        return memory_domain(), gpu_allocated()

    def loaded(self, token: tuple, spec: Any, model: Any, *, cached: bool) -> LoadWatch | None:
        from pytest_llmload._internal.checks.leaks import gpu_allocated, memory_domain

        domain, before = token
        now = gpu_allocated() if memory_domain() == domain else {}
        took = {device: now[device] - before.get(device, 0) for device in now}
        try:
            ref = weakref.ref(model)
        except TypeError:
            return None
        from pytest_llmload._internal.checks.leaks import LoadWatch, watched_tensors

        watch = LoadWatch(self.cell_id(spec), ref, watched_tensors(model), domain, took)
        if cached:
            self.held[id(watch)] = watch
            for device, size in took.items():
                key = (domain, device)
                self.cache_held[key] = self.cache_held.get(key, 0) + size
        else:
            self.private[model] = watch
        return watch

    def releasing(self, watch: LoadWatch | None, why: str) -> None:
        """Called before the cache drops its reference (the GPU reading the release is measured from)."""
        from pytest_llmload._internal.checks.leaks import gpu_allocated

        if watch is not None:
            watch.why = why
            watch.before_release = gpu_allocated()

    def evicted(self, watch: LoadWatch | None) -> None:
        """The cache dropped a cached model and collected garbage: measure now; judge now, or after the
        running test's teardown where the model may still be the test's own (a fixture value, a local)."""
        if watch is None:
            return
        self.held.pop(id(watch), None)
        for device, size in watch.took.items():
            key = (watch.domain, device)
            self.cache_held[key] = self.cache_held.get(key, 0) - size
            if not self.cache_held[key]:
                del self.cache_held[key]
        if not self.on or self._measure(watch):
            return
        if self._item is not None and not self._at_end:
            watch.deferred = True
            self.pending.append(watch)
        else:
            self._report(self._verify_safely(watch), at_end=self._at_end)

    def release_private(self, model: Any, nodeid: str) -> None:
        """``llm_private_model``'s teardown let go of its copy; pytest still holds it until the teardown ends."""
        watch = self.private.pop(model, None)
        if watch is not None:
            self.releasing(watch, f"llm_private_model of {nodeid}, at its teardown")
            self.pending.append(watch)

    # -- the verdict ------------------------------------------------------------------------------------
    def _measure(self, watch: LoadWatch) -> bool:
        """Read the GPU counters for ``watch.missing``; True when the model, every storage and the memory
        its load took are gone (the common case: nothing more to do)."""
        from pytest_llmload._internal.checks.leaks import clear_gpu_workspaces, gpu_allocated, memory_domain

        def short() -> dict[str, int]:  # per card: what the load took less what the release gave back
            now = gpu_allocated()
            return {d: watch.took[d] - (watch.before_release.get(d, 0) - now.get(d, 0)) for d in watch.took}

        missing: dict[str, int] = {}
        if watch.took and watch.before_release and memory_domain() == watch.domain:
            missing = short()
            if any(size > 0 for size in missing.values()):
                clear_gpu_workspaces()  # a first matmul's cuBLAS workspace is CUDA's, not the model's
                missing = short()
        gone = watch.model() is None and not any(w.alive() for w in watch.tensors)
        # With the model and every weight gone, what is short is what the load left elsewhere (bitsandbytes
        # keeps its quantization maps on the card, ~1 KiB): reported above 64 KiB or 1% of the load only.
        floor = (lambda d: max(_SLACK, watch.took[d] // 100)) if gone else (lambda d: 0)
        watch.missing = {d: size for d, size in missing.items() if size > floor(d)}
        return gone and not watch.missing

    def _verify_safely(self, watch: LoadWatch) -> str | None:
        try:
            return self.verify(watch)
        except Exception as exc:  # the walk met something it cannot read: still say what leaked
            return (f"llm leak check: cell {watch.cell} was released ({watch.why}) but is still alive "
                    f"(what holds it could not be worked out: {type(exc).__name__}: {exc})")

    def verify(self, watch: LoadWatch) -> str | None:
        """None when the model, its tensors and its GPU memory are gone; else the message."""
        from pytest_llmload._internal.checks.leaks import tensor_info
        from pytest_llmload._internal.checks.referrers import referrer_chain
        from pytest_llmload._internal.config.numbers import format_size

        if watch.missing is None:
            self._measure(watch)
        model = watch.model()
        alive = [watched for watched in watch.tensors if watched.alive()]
        from pytest_llmload._internal.checks.leaks import storage_holders

        survivors = storage_holders(alive) if alive else []  # (name, tensor) for each storage still allocated
        if watch.deferred and model is None and not alive:
            return None  # the running test held it; its memory went with the test's references
        missing = watch.missing or {}
        if model is None and not alive and not missing:
            return None
        head = f"llm leak check: cell {watch.cell} was released ({watch.why})"
        memory = ["still allocated of what its load allocated: " + ", ".join(
            f"{format_size(size)} on {device}" for device, size in sorted(missing.items()))] if missing else []
        if model is None and alive and not survivors:
            lines = [f"{head}; its model was collected but {len(alive)} of its tensors' storages were not "
                     f"({', '.join(w.name for w in alive[:4])}) and no Python object holds them: an autograd graph "
                     "or a C++ cache does", *memory]
            chain = []
        elif model is not None:
            lines = [f"{head} but its model ({type(model).__name__}) was not collected", *memory, "kept alive by:"]
            chain = referrer_chain(model, ignore=(survivors,))
            del model
        elif survivors:
            infos = sorted((tensor_info(t, name) for name, t in survivors), key=lambda info: -info.nbytes)
            total = format_size(sum(info.nbytes for info in infos))
            if any(w.tensor() is None for w in alive):
                what = "its model was resurrected by a __del__ after the collector found it unreachable"
            else:
                what = "its model was collected but not all its tensors"
            lines = [f"{head}; {what}: {len(infos)} tensor(s), {total}, are still alive: "
                     + ", ".join(i.describe() for i in infos[:3]) + (", ..." if len(infos) > 3 else ""),
                     *memory, f"{infos[0].name} is kept alive by:"]
            largest = next(t for name, t in survivors if name == infos[0].name)
            chain = referrer_chain(largest, ignore=(survivors,))
        else:
            lines = [f"{head}; its model and tensors were collected", *memory]
            chain = self._tensor_holders()
        if chain and chain[0].startswith("sys.last_"):
            return None  # pytest keeps the last failure's frames for post-mortem debugging: not the test's leak
        return "\n".join(lines + [f"  {line}" for line in chain])

    def _tensor_holders(self) -> list[str]:
        """The GPU tensors Python holds that no cached model owns and no earlier report named, and who holds
        the largest (a gradient left on a cached model's weight is named as such: C++ holds it)."""
        from pytest_llmload._internal.checks.leaks import gpu_tensors, reported_before
        from pytest_llmload._internal.checks.referrers import referrer_chain

        from pytest_llmload._internal.checks.leaks import tensor_info

        grads = self._gradients()  # C++ holds them: no Python object until asked for, so not in gpu_tensors
        alive = [(t, info) for t, info in gpu_tensors(self._accounted()) if not reported_before(t, self._reported)]
        seen = {id(t) for t, _ in alive}
        alive += [(g, tensor_info(g)) for g, _ in grads.values()
                  if id(g) not in seen and not reported_before(g, self._reported) and g.device.type == "cuda"]
        alive.sort(key=lambda pair: -pair[1].nbytes)
        grads = {key: name for key, (_, name) in grads.items()}
        if not alive:
            return ["no GPU tensor that Python holds is new (held from C++: an autograd graph, a CUDA graph or "
                    "a library's own cache)"]
        lines = ["GPU tensors still alive: " + ", ".join(
            (f"{grads[id(t)]}: " if id(t) in grads else "") + info.describe() for t, info in alive[:5])
            + (f", and {len(alive) - 5} more" if len(alive) > 5 else ""),
            f"the largest ({alive[0][1].describe()}) is kept alive by:"]
        largest = alive[0][0]
        for tensor, _ in alive:  # a later test's report does not blame these again
            self._reported[id(tensor)] = weakref.ref(tensor)
        del alive
        if id(largest) in grads:
            return lines + [f"  {grads[id(largest)]} (autograd keeps it on the weight until zero_grad(set_to_none=True))"]
        return lines + [f"  {line}" for line in referrer_chain(largest)]

    def _gradients(self) -> dict[int, tuple[Any, str]]:
        """id(gradient) -> (gradient, "the gradient of NAME of cell CELL") for the models the cache holds."""
        grads = {}
        for watch in [*self.held.values(), *self.private.values()]:
            for watched in watch.tensors:
                tensor = watched.tensor()
                grad = getattr(tensor, "grad", None) if tensor is not None else None
                if grad is not None:
                    grads[id(grad)] = (grad, f"the gradient of {watched.name} of cell {watch.cell}")
        return grads

    def _accounted(self) -> set[int]:
        """ids of the tensors of models the cache still holds (their memory is the cache's, not a leak)."""
        accounted = set()
        for watch in self.held.values():
            for watched in watch.tensors:
                tensor = watched.tensor()
                if tensor is not None:
                    accounted.add(id(tensor))
        return accounted

    def _report(self, message: str | None, *, at_end: bool = False) -> None:
        if message is None:
            return
        if at_end:
            self.found.append(message)
        elif self.strict:
            raise pytest.fail.Exception(message + "\n(a failure under --llm-require-gpus)", pytrace=False)
        else:
            warnings.warn_explicit(LLMLoadLeakWarning(message), LLMLoadLeakWarning, "llmload leak check", 0)

    # -- the tests' side --------------------------------------------------------------------------------
    def _checks(self, item: pytest.Item) -> bool:
        return self.mode == "tests" or (self.on and item.get_closest_marker("no_gpu_leak") is not None)

    @pytest.hookimpl(wrapper=True, trylast=True)
    def pytest_runtest_setup(self, item: pytest.Item):
        """Read the counters before any fixture (inside a test's own virtual fleet, which starts before)."""
        self._before = None
        if self._checks(item):
            from pytest_llmload._internal.checks.leaks import gpu_allocated, memory_domain

            domain = memory_domain()
            self._before = (domain, gpu_allocated(), self._held(domain), self._fixtures_total(domain))
        return (yield)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem):
        self._item, self._before = item, None
        try:
            return (yield)
        finally:
            self._item = None

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call):
        report = yield
        if report.failed or hasattr(report, "wasxfail"):  # an xfail's traceback keeps its frames too
            self._failed.add(item.nodeid)
        return report

    @pytest.hookimpl(wrapper=True, trylast=True)
    def pytest_runtest_teardown(self, item: pytest.Item, nextitem):
        try:
            result = yield
        except BaseException:  # a finalizer failed: that is the news; others' deferred releases wait
            self.pending = [w for w in self.pending if w.deferred]
            self._before = None
            raise
        pending, self.pending = self.pending, []
        if pending or self._before is not None:
            from pytest_llmload._internal.checks.leaks import drop_test_references

            drop_test_references(item)
        if pending:
            from pytest_llmload._internal.loading.call import release_memory

            release_memory()
        failed = item.nodeid in self._failed  # its traceback keeps its frames alive: the failure is the news
        self._failed.discard(item.nodeid)
        if failed:  # its own private copy is not judged; models evicted while it ran wait for the next teardown
            self.pending = [w for w in pending if w.deferred]
            pending = []
        messages = [m for m in (self._verify_safely(w) for w in pending) if m]
        del pending
        before, self._before = self._before, None
        if before is not None and not messages and not failed:
            message = self._test_leak(item, before)
            if message:
                raise pytest.fail.Exception(message, pytrace=False)
        for message in messages:
            self._report(message)
        return result

    def _held(self, domain) -> dict[str, int]:
        return {device: size for (where, device), size in self.cache_held.items() if where == domain}

    def _fixtures_total(self, domain) -> dict[str, int]:
        total: dict[str, int] = {}
        for where, took in self.fixture_held.values():
            if where == domain:
                for device, size in took.items():
                    total[device] = total.get(device, 0) + size
        return total

    def _test_leak(self, item: pytest.Item, before: tuple) -> str | None:
        from pytest_llmload._internal.checks.leaks import clear_gpu_workspaces, gpu_allocated, memory_domain
        from pytest_llmload._internal.config.numbers import format_size

        domain, at_setup, cache_before, fixtures_before = before
        if domain is None or memory_domain() != domain:
            return None

        def left() -> dict[str, int]:
            now, held, fixtures = gpu_allocated(), self._held(domain), self._fixtures_total(domain)
            return {d: size for d in now if (size := now[d] - at_setup.get(d, 0)
                                              - (held.get(d, 0) - cache_before.get(d, 0))
                                              - (fixtures.get(d, 0) - fixtures_before.get(d, 0))) > 0}

        if not left():
            return None  # the common case: two counter readings and nothing else
        from pytest_llmload._internal.loading.call import release_memory

        release_memory()  # garbage in reference cycles is not a leak
        clear_gpu_workspaces()
        leaked = left()
        if not leaked:
            return None
        amounts = ", ".join(f"{format_size(size)} on {device}" for device, size in sorted(leaked.items()))
        return "\n".join([f"llm leak check ({'no_gpu_leak' if self.mode != 'tests' else 'tests mode'}): "
                          f"{item.nodeid} left GPU memory allocated after its teardown that was not before its "
                          f"setup: {amounts}", *self._tensor_holders()])

    @pytest.hookimpl(wrapper=True)
    def pytest_fixture_setup(self, fixturedef, request):
        """What a fixture of a wider scope than the test allocates stays with it, not with the test."""
        if fixturedef.scope == "function" or self._before is None:
            return (yield)
        from pytest_llmload._internal.checks.leaks import gpu_allocated, memory_domain

        domain = memory_domain()
        start, held = gpu_allocated(), self._held(domain)
        try:
            return (yield)
        finally:
            now, cached = gpu_allocated(), self._held(domain)  # what the cache took or gave back in it is the cache's
            took = {d: size for d in now
                    if (size := now[d] - start.get(d, 0) - (cached.get(d, 0) - held.get(d, 0)))}
            if took and memory_domain() == domain:
                self.fixture_held[id(fixturedef)] = (domain, took)

    def pytest_fixture_post_finalizer(self, fixturedef, request) -> None:
        self.fixture_held.pop(id(fixturedef), None)

    # -- the session's end ------------------------------------------------------------------------------
    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        """Release every cached model now (not at unconfigure) so what stays alive reaches the summary."""
        if self.on:
            self._at_end = True
            try:
                self.release_all()
            finally:
                self._at_end = False
        config = session.config
        if hasattr(config, "workeroutput"):
            config.workeroutput[_WORKER_KEY] = list(self.found)
        elif self.found and self.strict and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    @pytest.hookimpl(optionalhook=True)  # an xdist hook: absent under -p no:xdist
    def pytest_testnodedown(self, node, error) -> None:
        output = getattr(node, "workeroutput", None) or {}
        self.found.extend(m for m in output.get(_WORKER_KEY, []) if m not in self.found)

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.found and not hasattr(terminalreporter.config, "workeroutput"):
            terminalreporter.section("llmload: leak check", sep="-", red=True)
            for message in self.found:
                terminalreporter.write_line(message)
            if self.strict:
                terminalreporter.write_line("(--llm-require-gpus: a leak fails the run)")
