"""The session cache: each distinct load is done once, reused, and released deterministically."""

from __future__ import annotations

import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

from pytest_llmload.errors import LLMLoadError, ModelLoadError
from pytest_llmload._internal.loading.call import LoadCall, prepare_load, release_memory
from pytest_llmload._internal.loading.files import load_config, load_tokenizer
from pytest_llmload._internal.loading.placement import cell_placement
from pytest_llmload._internal.config.specs import LLMSpec


class CacheInfo(NamedTuple):
    loads: int  # from_pretrained calls that returned a model
    hits: int  # requests served from the cache
    evictions: int
    size: int  # models held now
    max_models: int


@dataclass
class LoadRecord:
    """What the session keeps of one load after the model itself is released (for the report)."""

    spec: LLMSpec
    info: LoadCall  # what the load did: resolved map, notes, offload folder
    load_seconds: float
    kind: str = "load"  # "load" (first, cached), "reload" (cached again after eviction) or "private"
    uses: int = 1

    @property
    def private(self) -> bool:
        return self.kind == "private"


@dataclass
class CachedModel:
    model: Any
    record: LoadRecord
    watch: Any = None  # the leak check's weak record of the load (session.leaks.LoadWatch)


class ModelCache:
    """Holds at most ``max_models`` loaded models (least recently used is evicted first).

    Failures are remembered too: a model whose config cannot be resolved (an unreachable hub, a
    broken config.json) is tried once per session, and every later cell that needs it fails fast.
    """

    def __init__(self, max_models: int = 2, *, trust_remote_code: bool = False, allow_pickle: bool = False,
                 hub_kernels: bool = False):
        if max_models < 1:
            raise ValueError(f"max_models must be at least 1, got {max_models}")
        self.max_models = max_models
        self.trust_remote_code = trust_remote_code
        self.allow_pickle = allow_pickle
        self.hub_kernels = hub_kernels
        self._entries: OrderedDict[tuple, CachedModel] = OrderedDict()
        self._tokenizers: dict[str, Any] = {}
        self._failures: dict[Any, str] = {}
        self._configs: dict[str, Any] = {}
        self._loaded_keys: set[tuple] = set()
        self.loads = self.hits = self.evictions = 0
        self.config_attempts: dict[str, int] = {}
        self.history: list[LoadRecord] = []  # every load this session, for the report
        self.on_load: list[Callable[[CachedModel], None]] = []
        self._offload_root: str | None = None
        self._finalizer = weakref.finalize(self, _remove_root, None)
        self._private_calls: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.watch = None  # the session's leak check (session.leaks.LeakCheck), told of each load and release

    # -- offload folders -------------------------------------------------------------------
    def offload_root(self) -> str:
        """This session's folder for offloaded weights (each load makes its own folder inside it;
        the root is removed by :meth:`close`)."""
        if self._offload_root is None:
            from pytest_llmload._internal.loading.ownership import session_folder

            self._offload_root = session_folder()
            self._finalizer.detach()
            self._finalizer = weakref.finalize(self, _remove_root, self._offload_root)
        return self._offload_root

    def release_private(self, model: Any, owner: str = "") -> None:
        """Remove the offload folder of a private copy now (its test is over), not when it is collected."""
        if self.watch is not None:
            self.watch.release_private(model, owner)
        call = self._private_calls.pop(model, None)
        if call is not None:
            call.release()

    # -- models ----------------------------------------------------------------------------
    @staticmethod
    def key(spec: LLMSpec, kwargs: dict[str, Any]) -> tuple:
        """The cell (its frozen spec) and any extra from_pretrained kwargs a caller gave."""
        return (spec, _kwargs_key(kwargs))

    def get(self, spec: LLMSpec, **kwargs: Any) -> Any:
        """The model for ``spec`` (and extra ``from_pretrained`` kwargs), loading it on first use."""
        return self.entry(spec, **kwargs).model

    def entry(self, spec: LLMSpec, **kwargs: Any) -> CachedModel:
        key = self.key(spec, kwargs)
        if key in self._entries:
            self.hits += 1
            self._entries.move_to_end(key)
            entry = self._entries[key]
            entry.record.uses += 1
            return entry
        if key in self._failures:
            raise ModelLoadError(self._failures[key])
        while len(self._entries) >= self.max_models:
            self.evict(next(iter(self._entries)))
        return self._load(spec, kwargs, key)

    def load_private(self, spec: LLMSpec, **kwargs: Any) -> Any:
        """A copy of ``spec``'s model that the cache does not hold (for tests that mutate it).

        Its offload folder (if the cache made one) goes with it: at :meth:`release_private` or when the
        copy is garbage collected, whichever comes first.
        """
        entry = self._load(spec, kwargs, None)
        if entry.record.info.offload_folder is not None:
            self._private_calls[entry.model] = entry.record.info
        return entry.model

    def _load(self, spec: LLMSpec, kwargs: dict[str, Any], key: tuple | None) -> CachedModel:
        call = dict(kwargs)
        trust_remote_code = call.pop("trust_remote_code", self.trust_remote_code)
        allow_pickle = call.pop("allow_pickle", self.allow_pickle)
        hub_kernels = call.pop("hub_kernels", self.hub_kernels)
        config = call.pop("config", None)
        if config is None:
            config = self.check_config(spec, trust_remote_code=trust_remote_code)
        start = time.perf_counter()
        token = self.watch.before_load() if self.watch is not None else None
        try:
            info = prepare_load(
                spec.model_spec,
                device_map=spec.device_map_spec,
                precision=spec.precision,
                max_memory=spec.max_memory_dict,
                trust_remote_code=trust_remote_code,
                allow_pickle=allow_pickle,
                hub_kernels=hub_kernels,
                config=config,
                offload_parent=self.offload_root() if cell_placement(spec).needs_offload
                else None,
                **call,
            )
            model = info.run()
        except ModelLoadError as exc:  # LoadCall.run gave back what the failed load allocated
            if key is not None:
                self._failures[key] = str(exc)
            raise
        kind = "private" if key is None else "reload" if key in self._loaded_keys else "load"
        entry = CachedModel(model, LoadRecord(spec, info, time.perf_counter() - start, kind=kind))
        if self.watch is not None:
            entry.watch = self.watch.loaded(token, spec, model, cached=key is not None)
        self.loads += 1
        self.history.append(entry.record)
        if key is not None:  # cached before the callbacks run: a failing callback cannot lose the model
            self._loaded_keys.add(key)
            self._entries[key] = entry
        for callback in self.on_load:
            callback(entry)
        return entry

    def check_config(self, spec: LLMSpec, *, trust_remote_code: bool | None = None):
        """Resolve the model's config once per session; remember a failure for every later cell."""
        trust = self.trust_remote_code if trust_remote_code is None else trust_remote_code
        model = spec.model if trust == self.trust_remote_code else (spec.model, trust)
        if model in self._configs:
            return self._configs[model]
        if model in self._failures:
            raise ModelLoadError(self._failures[model])
        self.config_attempts[model] = self.config_attempts.get(model, 0) + 1
        try:
            self._configs[model] = load_config(spec.model_spec, trust_remote_code=trust)
        except LLMLoadError as exc:
            self._failures[model] = str(exc)
            raise ModelLoadError(str(exc)) from None
        return self._configs[model]

    def tokenizer(self, spec: LLMSpec) -> Any:
        model = spec.model
        if model not in self._tokenizers:
            if ("tokenizer", model) in self._failures:
                raise ModelLoadError(self._failures[("tokenizer", model)])
            self.check_config(spec)
            try:
                self._tokenizers[model] = load_tokenizer(spec.model_spec, trust_remote_code=self.trust_remote_code)
            except ModelLoadError as exc:
                self._failures[("tokenizer", model)] = str(exc)
                raise
        return self._tokenizers[model]

    def evict(self, key: tuple, why: str = "") -> None:
        entry = self._entries.pop(key)
        watch = entry.watch
        if self.watch is not None:
            self.watch.releasing(watch, why or f"evicted: the session cache holds {self.max_models} model(s)")
        entry.model = None
        del entry
        self.evictions += 1
        release_memory()
        if self.watch is not None:
            self.watch.evicted(watch)

    def clear(self) -> None:
        while self._entries:
            self.evict(next(iter(self._entries)), "at the session's end")
        self._tokenizers.clear()

    def close(self) -> None:
        """Release every model and remove the session's offload folders."""
        self.clear()
        self._finalizer()

    def holds(self, spec: LLMSpec, **kwargs: Any) -> bool:
        return self.key(spec, kwargs) in self._entries

    def cache_info(self) -> CacheInfo:
        return CacheInfo(self.loads, self.hits, self.evictions, len(self._entries), self.max_models)


def _kwargs_key(kwargs: dict[str, Any]) -> str:
    return repr(sorted(kwargs.items())) if kwargs else ""


def _remove_root(path: str | None) -> None:
    from pytest_llmload._internal.loading.ownership import remove_owned_folder

    remove_owned_folder(path)
