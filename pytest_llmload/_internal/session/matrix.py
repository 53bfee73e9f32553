"""The test matrix: which cells a test runs in, their ids, and the order that loads each cell once."""

from __future__ import annotations

import pytest

from pytest_llmload.errors import LLMLoadUsageError
from pytest_llmload._internal.config.marks import MARKERS, parsed_marks
from pytest_llmload._internal.config.specs import LLMSpec, make_spec


def item_spec(item: pytest.Item) -> LLMSpec | None:
    """The cell a collected test runs in (None for a test that uses no llm fixture)."""
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("llm_spec") if callspec is not None else None


def matrix_ids(cells: list[LLMSpec]) -> list[str]:
    """Readable test ids, unique: cells whose labels collide get a short hash of what tells them apart."""
    labels = [c.id for c in cells]
    return [_hashed_id(c) if labels.count(c.id) > 1 else c.id for c in cells]


def _hashed_id(cell: LLMSpec) -> str:
    import hashlib

    return f"{cell.id}-{hashlib.sha1(cell.key.encode()).hexdigest()[:6]}"


class CellIds:
    """Each cell's id for the whole session, fixed the first time the session meets the cell, so every test
    of a cell and the load report name it alike (the report's ``id`` is the test id's cell part).

    Cells whose labels collide get a short hash (as :func:`matrix_ids`), also where one test's own matrix
    holds only one of them; a cell met later whose label is taken gets the hash, the first keeps its id.
    Every process collects the same tests in the same order, so xdist workers agree."""

    def __init__(self) -> None:
        self.ids: dict[str, str] = {}  # cell key -> id
        self._taken: dict[str, str] = {}  # id -> cell key

    def assign(self, cells: list[LLMSpec]) -> list[str]:
        new = [c for c in dict.fromkeys(cells) if c.key not in self.ids]
        for cell, plain in zip(new, matrix_ids(new)):
            if plain in self._taken:
                plain = _hashed_id(cell)
            self.ids[cell.key] = plain
            self._taken[plain] = cell.key
        return [self.ids[c.key] for c in cells]

    def __call__(self, cell: LLMSpec) -> str:
        return self.ids.get(cell.key) or self.assign([cell])[0]


class Matrix:
    """The plugin object that parametrizes llm tests over their cells and groups them by cell."""

    def __init__(self, options, on_need=None) -> None:
        self.options = options
        self.on_need = on_need or (lambda what: None)  # told of markers/cells that need a lazy plugin
        self.ids = CellIds()
        self.ids.assign(self.cells())  # the configured matrix first: its collisions are known up front

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
            for name in MARKERS:  # each marker parsed once; the checks at setup read the same values
                parsed = parsed_marks(metafunc.definition, name, metafunc.config)
                if parsed:
                    self.on_need(name)
                if name == "llm" and parsed:
                    axes = parsed[0]  # the closest llm marker wins
        except LLMLoadUsageError as exc:
            raise pytest.fail.Exception(str(exc), pytrace=False) from None
        if "llm_spec" not in metafunc.fixturenames:
            return
        cells = self.cells(axes)
        if any(c.device_map_spec.kind == "tp" for c in cells):
            self.on_need("tp")
        metafunc.parametrize("llm_spec", cells, ids=self.ids.assign(cells), indirect=True)

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        """Group tests by matrix cell when there are more cells than the cache holds, so each loads once."""
        order: dict[LLMSpec, int] = {}
        for item in items:
            spec = item_spec(item)
            if spec is not None:
                order.setdefault(spec, len(order))
        if len(order) <= self.options.cache_size:
            return
        # Reorder only the llm tests, among the positions they hold; other tests keep their places.
        slots = [i for i, item in enumerate(items) if item_spec(item) is not None]
        grouped = sorted((items[i] for i in slots), key=lambda item: order[item_spec(item)])
        for slot, item in zip(slots, grouped):
            items[slot] = item
