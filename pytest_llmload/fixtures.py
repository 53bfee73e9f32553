"""The fixtures users request. Each loads through the session cache; errors end the test in one line."""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

import pytest

from pytest_llmload._internal.session import SESSION_KEY  # the session, set in pytest_configure
from pytest_llmload.errors import LLMLoadError

if TYPE_CHECKING:
    from pytest_llmload._internal.session.state import LLMLoadSession
    from pytest_llmload._internal.config.specs import LLMSpec

# Nothing heavier than pytest is imported here: this module is imported with the plugin at every pytest
# start, also where no test asks for an llm fixture.


def _session(request: pytest.FixtureRequest) -> LLMLoadSession:
    return request.config.stash[SESSION_KEY]


@contextmanager
def _clean_errors() -> Iterator[None]:
    """A load error fails the test with its one-line message, not a traceback through our internals."""
    try:
        yield
    except LLMLoadError as exc:
        raise pytest.fail.Exception(str(exc), pytrace=False) from None


@pytest.fixture
def llm_spec(request: pytest.FixtureRequest) -> LLMSpec:
    """The current matrix cell: ``.model``, ``.device_map``, ``.precision`` (and ``.id``)."""
    spec = getattr(request, "param", None)
    return spec if spec is not None else _session(request).default_spec()


@pytest.fixture
def llm_model(request: pytest.FixtureRequest, llm_spec) -> Any:
    """The model of the current cell, shared through the session cache (do not mutate it)."""
    session = _session(request)
    session.check_cell(llm_spec, request.node.nodeid)
    with _clean_errors():
        model = session.cache.get(llm_spec)
    session.note_use(llm_spec)
    return model


@pytest.fixture
def llm_private_model(request: pytest.FixtureRequest, llm_spec) -> Iterator[Any]:
    """A copy of the current cell's model loaded for this test alone, for tests that train or mutate it."""
    session = _session(request)
    session.check_cell(llm_spec, request.node.nodeid)
    with _clean_errors():
        model = session.cache.load_private(llm_spec)
    session.note_use(llm_spec)
    yield model
    # Its offload folder goes now, not at the end. The model itself goes when pytest drops this fixture's value,
    # after this teardown: collecting garbage here could not free it (the leak check, on by default, collects
    # and empties the CUDA cache once pytest has let go; the fit check does before it would skip a cell).
    session.cache.release_private(model, request.node.nodeid)


@pytest.fixture
def llm_tokenizer(request: pytest.FixtureRequest, llm_spec) -> Any:
    """The tokenizer stored with the current cell's model (cached per model)."""
    with _clean_errors():
        return _session(request).cache.tokenizer(llm_spec)


@pytest.fixture
def llm_golden(request: pytest.FixtureRequest):
    """``llm_golden.check(name, value, *, atol=None, rtol=None, topk=None, tokenizer=None)``: compare a tensor,
    a dict of tensors, token ids or text with the golden recorded for this test and device class (recorded
    by ``--llm-update-goldens``), as ``assert_matches_golden`` does."""
    from pytest_llmload._internal.session.goldens import GoldenChecker

    return GoldenChecker(_session(request).goldens, request.node)


class ModelLoader:
    """``llm_load(model=None, *, device_map=None, precision=None, max_memory=None, **kwargs)``.

    Loads through the session cache; ``None`` means the session's first configured value, except that
    ``dtype=``/``quantization_config=``/``load_in_8bit=`` set the precision when ``precision`` is None
    (given both, they must agree). ``private=True`` returns a copy the cache does not hold.
    ``trust_remote_code=``/``allow_pickle=`` override the session's options for this call.
    """

    def __init__(self, session):
        self._session = session

    def spec(self, model=None, *, device_map=None, precision=None, max_memory=None):
        from pytest_llmload._internal.config.specs import make_spec

        default = self._session.default_spec()
        return make_spec(
            model if model is not None else default.model_spec,
            device_map if device_map is not None else default.device_map_spec,
            precision if precision is not None else default.precision,
            max_memory if max_memory is not None else default.max_memory_dict,
        )

    def __call__(self, model=None, *, device_map=None, precision=None, max_memory=None, private=False, **kwargs):
        with _clean_errors():
            from pytest_llmload._internal.loading.precision import reconcile_precision

            if kwargs.get("config", 0) is None:
                kwargs.pop("config")  # None means "read it", as from_pretrained takes it
            precision = reconcile_precision(precision, kwargs)
            spec = self.spec(model, device_map=device_map, precision=precision, max_memory=max_memory)
            self._session.check_cell(spec, own_quantization="quantization_config" in kwargs)
            cache = self._session.cache
            model = cache.load_private(spec, **kwargs) if private else cache.get(spec, **kwargs)
        self._session.note_use(spec)
        return model

    def tokenizer(self, model=None):
        with _clean_errors():
            return self._session.cache.tokenizer(self.spec(model))

    def cache_info(self):
        """Loads, hits, evictions, size and capacity of the session cache."""
        return self._session.cache.cache_info()


@pytest.fixture(scope="session")
def llm_load(request: pytest.FixtureRequest) -> ModelLoader:
    """A factory that loads any model through the session cache."""
    return ModelLoader(_session(request))


@pytest.fixture(scope="session")
def gpu_inventory(request: pytest.FixtureRequest):
    """The visible GPUs (index, name, total and free memory) and the bitsandbytes backend, probed once."""
    return _session(request).inventory


@pytest.fixture
def llm_memory():
    """Peak memory of the test: CPU RSS delta and, per GPU, allocated/reserved peaks and driver-level use.

    ``llm_memory.usage`` holds the peaks so far whenever it is read (the whole test's at its end, also in
    the JSON report); ``with llm_memory.track() as usage:`` measures a block. GPU peaks are reset at the
    start, so tests do not see each other's peaks.
    """
    from pytest_llmload._internal.planning.measure import MemoryRecorder

    recorder = MemoryRecorder()
    recorder.start()
    yield recorder
    recorder.stop()


@pytest.fixture
def llm_dist(request: pytest.FixtureRequest):
    """This process's rank, world size, local rank and process group (rank 0 of 1 and no group when the
    run was not launched by torchrun/accelerate launch)."""
    from pytest_llmload._internal.distributed.world import DistInfo, launched_world

    world = launched_world()
    group = None
    if world.launched:
        import torch.distributed as dist

        if dist.is_initialized():
            group = dist.group.WORLD
    return DistInfo(world.rank, world.world_size, world.local_rank, group)
