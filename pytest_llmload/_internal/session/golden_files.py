"""The golden files: ``goldens/<module>.json`` next to a test module (and ``<module>.safetensors`` beside it
for tensors of more than 4096 values), keyed test -> name -> device class.

The JSON is written for review: sorted keys, one key per line, a tensor's innermost rows and each position's
top tokens on one line each. Recording merges: only the keys recorded in this run are replaced; entries of
other device classes, and of tests that did not run, stay as they were. Writes are atomic.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pytest_llmload._internal.checks.golden import DIGITS, INLINE_LIMIT, Observed
from pytest_llmload._internal.config.options import write_atomically

FORMAT = "pytest-llmload/goldens 1"
ABOUT = ("golden outputs of the tests in {module}: test -> name -> device class. Recorded by "
         "pytest --llm-update-goldens; review changes like code.")


def golden_path(module_path: Any) -> Path:
    """Where the goldens of the test module at ``module_path`` are kept."""
    module = Path(module_path)
    return module.parent / "goldens" / f"{module.stem}.json"


# -- a value as an entry of the JSON (and the large tensors that go beside it), and back -------------------

KINDS = ("tensor", "tensors", "ids", "text")
NON_FINITE = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}  # standard JSON has none
TENSOR = "a tensor (a 'dtype', a 'shape', and 'data' of that shape or a 'safetensors' name)"


class GoldenEntryError(ValueError):
    """A golden that cannot be used, as one line that says where, why and what to do."""


class _Problem(Exception):
    """The rest of a GoldenEntryError's sentence, before its caller says where."""


def encode(observed: Observed, key: tuple[str, ...]) -> tuple[dict, dict[str, Any]]:
    """The JSON entry of ``observed`` recorded under ``key`` (test, name, device class), and the tensors too
    large to inline, by their name in the safetensors."""
    blobs: dict[str, Any] = {}
    if observed.kind == "tensor":
        return {"kind": "tensor", **_tensor_entry(observed.tensors[""], tensor_key(*key), blobs)}, blobs
    if observed.kind == "tensors":
        items = {k: _tensor_entry(t, tensor_key(*key, k), blobs) for k, t in observed.tensors.items()}
        return {"kind": "tensors", "items": items}, blobs
    if observed.kind == "text":
        return ({"kind": "text", "texts": observed.rows} if observed.batched
                else {"kind": "text", "text": observed.rows[0]}), blobs
    entry: dict[str, Any] = {"kind": "ids", "ids": observed.rows if observed.batched else observed.rows[0]}
    if observed.topk is not None:
        entry["scored_from"] = observed.scored_from  # the first position that topk covers
        entry["topk"] = observed.topk if observed.batched else observed.topk[0]
    return entry, blobs


def tensor_key(*parts: str) -> str:
    """A tensor's name in the safetensors: the parts joined by '/', each with '%' and '/' escaped, so that
    no two (test, name, device class[, dict key]) share one. Files name their tensors, so older names read."""
    return "/".join(p.replace("%", "%25").replace("/", "%2F") for p in parts)


def _tensor_entry(tensor, name: str, blobs: dict[str, Any]) -> dict:
    dtype = str(tensor.dtype).replace("torch.", "")
    entry: dict[str, Any] = {"dtype": dtype, "shape": list(tensor.shape)}
    if tensor.numel() > INLINE_LIMIT:
        blobs[name] = tensor.clone()
        entry["safetensors"] = name
        return entry
    values = tensor.tolist() if not tensor.dtype.is_floating_point else tensor.double().tolist()
    entry["data"] = _stored(values, DIGITS.get(dtype)) if tensor.dtype.is_floating_point else values
    return entry


def _stored(values: Any, digits: int | None) -> Any:
    """Floats as written: with ``digits`` significant digits; NaN and infinities as "nan", "inf", "-inf"."""
    if isinstance(values, list):
        return [_stored(v, digits) for v in values]
    if values != values or values in (float("inf"), float("-inf")):
        return "nan" if values != values else "inf" if values > 0 else "-inf"
    return float(format(values, f".{digits}g")) if digits else values


def decode(entry: Any, tensor: Any) -> dict:
    """An entry as the comparison wants it: tensors as tensors (``tensor(name)`` reads a large one), ids and
    text as rows. An entry of the wrong structure raises _Problem (what it should be)."""
    if not isinstance(entry, dict) or entry.get("kind") not in KINDS:
        raise _bad("an object whose 'kind' is tensor, tensors, ids or text")
    kind = entry["kind"]
    if kind == "tensor":
        return {"kind": kind, "tensors": {"": _tensor(entry, tensor)}}
    if kind == "tensors":
        items = entry.get("items")
        if not isinstance(items, dict) or not items:
            raise _bad(f"a dict of tensors ('items': key -> {TENSOR})")
        return {"kind": kind, "tensors": {key: _tensor(e, tensor) for key, e in items.items()}}
    if kind == "text":
        rows = entry["texts"] if "texts" in entry else [entry.get("text")]
        if not isinstance(rows, list) or not rows or not all(isinstance(r, str) for r in rows):
            raise _bad("text ('text': a string, or 'texts': a non-empty list of strings)")
        return {"kind": kind, "rows": rows}
    ids, topk, scored_from = entry.get("ids"), entry.get("topk"), entry.get("scored_from", 0)
    batched = isinstance(ids, list) and bool(ids) and isinstance(ids[0], list)
    rows, topk = (ids, topk) if batched else ([ids], topk if topk is None else [topk])
    if not (all(_ints(r) for r in rows) and _ints([scored_from]) and scored_from >= 0 and (
            topk is None or (isinstance(topk, list) and len(topk) == len(rows)
                             and all(isinstance(r, list) and all(_ints(p) for p in r) for r in topk)))):
        raise _bad("token ids ('ids': a list of ints or of lists of ints; with 'topk': per sequence, per scored "
                   "position, a list of token ids; 'scored_from': a whole number >= 0)")
    return {"kind": kind, "rows": rows, "topk": topk, "scored_from": scored_from}


def _bad(what: str) -> _Problem:
    return _Problem(f"is not {what}; fix it or record it again")


def _ints(row: Any) -> bool:
    return isinstance(row, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in row)


def _tensor(entry: Any, tensor: Any):
    import torch

    dtype = getattr(torch, entry.get("dtype"), None) if isinstance(entry, dict) and isinstance(
        entry.get("dtype"), str) else None
    shape = entry.get("shape") if isinstance(dtype, torch.dtype) else None
    if not _ints(shape) or any(n < 0 for n in shape):
        raise _bad(TENSOR)
    if isinstance(entry.get("safetensors"), str):
        return tensor(entry["safetensors"])
    try:
        data = torch.tensor(_read_numbers(entry.get("data")),
                            dtype=torch.float64 if dtype.is_floating_point else dtype)
        return data.to(dtype).reshape(shape)
    except (TypeError, ValueError, RuntimeError, OverflowError):  # not numbers, ragged, or not of that shape
        raise _bad(TENSOR) from None


def _read_numbers(values: Any) -> Any:
    if isinstance(values, list):
        return [_read_numbers(v) for v in values]
    return NON_FINITE.get(values, values) if isinstance(values, str) else values


def tensor_names(entry: Any) -> list[str]:
    """The safetensors names an entry holds (none for one of the wrong structure)."""
    if not isinstance(entry, dict):
        return []
    items = entry.get("items") if entry.get("kind") == "tensors" else {"": entry}
    return [e["safetensors"] for e in (items.values() if isinstance(items, dict) else ())
            if isinstance(e, dict) and isinstance(e.get("safetensors"), str)]


def read_tensors(path: Path, names: Any = None) -> dict[str, Any]:
    """The tensors ``names`` (all when None) of the safetensors file at ``path`` that holds them; _Problem
    (what is wrong with the file) when it is not one that pytest-llmload wrote, or cannot be read."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            kind = (f.metadata() or {}).get("format")
            if kind != FORMAT:
                why = "no format metadata" if kind is None else f"its format is {kind!r}"
                raise _Problem(f"is not a golden file of pytest-llmload ({why})")
            keys = set(f.keys())
            return {n: f.get_tensor(n) for n in (keys if names is None else names) if n in keys}
    except _Problem:
        raise
    except Exception as exc:  # safetensors' SafetensorError, an OSError: a damaged or unreadable file
        raise _Problem(f"cannot be read ({type(exc).__name__}: {exc})") from None


def entry_label(*keys: str) -> str:
    return "goldens" + "".join(f"[{json.dumps(k, ensure_ascii=False)}]" for k in keys)


# -- one file -----------------------------------------------------------------------------------------------

class GoldenFile:
    """The goldens of one test module, read once (the JSON at first use, the safetensors when a large tensor
    is first compared). ``shown``: the path as messages show it."""

    def __init__(self, path: Path, shown: str | None = None):
        self.path = Path(path)
        self.tensors_path = self.path.with_suffix(".safetensors")
        self.shown = shown or str(self.path)
        self.tensors_shown = (self.shown[:-len(".json")] if self.shown.endswith(".json") else self.shown) + \
            ".safetensors"
        self.goldens: dict[str, Any] = {}
        self.error: str | None = None
        self._tensors: dict[str, Any] | None = None
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                self.goldens = data["goldens"]
                if not isinstance(self.goldens, dict):
                    raise TypeError("'goldens' is not an object")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                self.error = f"{self.shown} is not a golden file of pytest-llmload ({exc}); fix or remove it"

    def classes(self, test: str, name: str) -> dict[str, dict]:
        """The entries recorded for ``name`` in ``test``, by device class (GoldenEntryError for a level of
        the wrong structure)."""
        names = self.goldens.get(test, {})
        if not isinstance(names, dict):
            raise self._error((test,), _bad("an object (golden name -> device class -> entry)"))
        classes = names.get(name, {})
        if not isinstance(classes, dict):
            raise self._error((test, name), _bad("an object (device class -> entry)"))
        for device_class, entry in classes.items():
            if not isinstance(entry, dict):
                raise self._error((test, name, device_class), _bad("an object with a 'kind'"))
        return classes

    def read(self, test: str, name: str, device_class: str) -> dict:
        """The golden (test, name, device class), decoded; GoldenEntryError says what is wrong with it."""
        try:
            return decode(self.goldens[test][name][device_class], self._tensor)
        except _Problem as problem:
            raise self._error((test, name, device_class), problem) from None

    def _error(self, keys: tuple, problem: _Problem) -> GoldenEntryError:
        return GoldenEntryError(f"{self.shown}: entry {entry_label(*keys)} {problem}")

    def _tensor(self, name: str):
        if self._tensors is None:
            if not self.tensors_path.exists():
                raise _Problem(f"keeps its values in {self.tensors_shown}, which is missing; record it again")
            try:
                self._tensors = read_tensors(self.tensors_path)
            except _Problem as problem:
                raise _Problem(f"keeps its values in {self.tensors_shown}, which {problem}; move that file away "
                               "and record it again") from None
        if name not in self._tensors:
            raise _Problem(f"names the tensor {name!r}, which {self.tensors_shown} does not have; record it again")
        return self._tensors[name]

    def merge_and_write(self, recorded: dict[tuple[str, str, str], tuple[dict, dict[str, Any]]],
                        module: str) -> list[str]:
        """Replace the ``recorded`` keys (test, name, device class) with their new entries, keep everything
        else, and write both files atomically (the safetensors first: the JSON never names a tensor this run
        dropped). A safetensors file that pytest-llmload did not write is never touched: ValueError, nothing
        written. Returns the entries kept from before that name a tensor the safetensors file lacks."""
        if self.error is not None:
            raise ValueError(self.error)
        exists = self.tensors_path.exists()
        if exists:
            try:
                read_tensors(self.tensors_path, ())  # is it ours, and readable
            except _Problem as problem:
                raise ValueError(f"{self.tensors_shown} {problem}; move it away") from None
        blobs: dict[str, Any] = {}
        for (test, name, device_class), (entry, entry_blobs) in sorted(recorded.items()):
            if not isinstance(self.goldens.get(test), dict):  # absent, or of the wrong structure: recorded anew
                self.goldens[test] = {}
            if not isinstance(self.goldens[test].get(name), dict):
                self.goldens[test][name] = {}
            self.goldens[test][name][device_class] = entry
            blobs.update(entry_blobs)
        named = [(entry_label(test, name, device_class), n) for test, names in self.goldens.items()
                 if isinstance(names, dict) for name, classes in names.items() if isinstance(classes, dict)
                 for device_class, entry in classes.items() for n in tensor_names(entry)]
        wanted = {n for _, n in named}
        tensors: dict[str, Any] = {}
        if exists and wanted - set(blobs):
            try:
                tensors = read_tensors(self.tensors_path, wanted - set(blobs))
            except _Problem as problem:
                raise ValueError(f"{self.tensors_shown} {problem}; move it away") from None
        tensors.update(blobs)
        self._tensors = None  # read again when next compared
        if tensors:
            _save_tensors_atomically({n: t.contiguous() for n, t in tensors.items()}, self.tensors_path)
        elif exists and not wanted:  # ours, and no entry names a tensor in it any more
            os.unlink(self.tensors_path)
        document = {"about": ABOUT.format(module=module), "format": FORMAT, "goldens": self.goldens}
        write_atomically(str(self.path), dumps(document) + "\n")
        return sorted({entry for entry, n in named if n not in tensors})


def _save_tensors_atomically(tensors: dict[str, Any], path: Path) -> None:
    import tempfile

    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".llmload-", suffix=".tmp", dir=str(path.parent))
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": FORMAT})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def dumps(value: Any, level: int = 0) -> str:
    """JSON for review: objects one key per line (sorted), lists of numbers or strings on one line."""
    pad, inner = "  " * level, "  " * (level + 1)
    if isinstance(value, dict) and value:
        return "{\n" + ",\n".join(f"{inner}{json.dumps(k)}: {dumps(v, level + 1)}"
                                  for k, v in sorted(value.items())) + f"\n{pad}}}"
    if isinstance(value, list) and any(isinstance(v, (list, dict)) for v in value):
        return "[\n" + ",\n".join(inner + dumps(v, level + 1) for v in value) + f"\n{pad}]"
    return json.dumps(value, ensure_ascii=False, allow_nan=False)


# -- what an xdist worker sends the controller (config.workeroutput: plain data and bytes) ----------------------

def to_wire(recorded: dict[str, dict[tuple[str, str, str], tuple[dict, dict[str, Any]]]]) -> list[dict]:
    out = []
    for path, entries in recorded.items():
        for (test, name, device_class), (entry, blobs) in entries.items():
            payload = None
            if blobs:
                from safetensors.torch import save

                payload = save({n: t.contiguous() for n, t in blobs.items()})
            out.append({"path": path, "key": [test, name, device_class], "entry": entry, "blobs": payload})
    return out


def from_wire(records: list[dict], into: dict[str, dict]) -> None:
    for record in records:
        blobs = {}
        if record.get("blobs"):
            from safetensors.torch import load

            blobs = load(record["blobs"])
        into.setdefault(record["path"], {})[tuple(record["key"])] = (record["entry"], blobs)
