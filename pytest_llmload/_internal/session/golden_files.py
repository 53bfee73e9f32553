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

def encode(observed: Observed, tensor_name: str) -> tuple[dict, dict[str, Any]]:
    """The JSON entry of ``observed``, and the tensors too large to inline, by their name in the safetensors."""
    blobs: dict[str, Any] = {}
    if observed.kind == "tensor":
        return {"kind": "tensor", **_tensor_entry(observed.tensors[""], tensor_name, blobs)}, blobs
    if observed.kind == "tensors":
        items = {key: _tensor_entry(t, f"{tensor_name}/{key}", blobs) for key, t in observed.tensors.items()}
        return {"kind": "tensors", "items": items}, blobs
    if observed.kind == "text":
        return ({"kind": "text", "texts": observed.rows} if observed.batched
                else {"kind": "text", "text": observed.rows[0]}), blobs
    entry: dict[str, Any] = {"kind": "ids", "ids": observed.rows if observed.batched else observed.rows[0]}
    if observed.topk is not None:
        entry["scored_from"] = observed.scored_from  # the first position that topk covers
        entry["topk"] = observed.topk if observed.batched else observed.topk[0]
    return entry, blobs


def _tensor_entry(tensor, name: str, blobs: dict[str, Any]) -> dict:
    dtype = str(tensor.dtype).replace("torch.", "")
    entry: dict[str, Any] = {"dtype": dtype, "shape": list(tensor.shape)}
    if tensor.numel() > INLINE_LIMIT:
        blobs[name] = tensor.clone()
        entry["safetensors"] = name
        return entry
    values = tensor.tolist() if not tensor.dtype.is_floating_point else tensor.double().tolist()
    digits = DIGITS.get(dtype)
    entry["data"] = _rounded(values, digits) if digits else values
    return entry


def _rounded(values: Any, digits: int) -> Any:
    if isinstance(values, list):
        return [_rounded(v, digits) for v in values]
    return float(format(values, f".{digits}g"))


def decode(entry: dict, tensor: Any) -> dict:
    """An entry as the comparison wants it: tensors as tensors (``tensor(name)`` reads a large one), ids and
    text as rows."""
    kind = entry.get("kind")
    if kind == "tensor":
        return {"kind": kind, "tensors": {"": _tensor(entry, tensor)}}
    if kind == "tensors":
        return {"kind": kind, "tensors": {key: _tensor(e, tensor) for key, e in entry["items"].items()}}
    if kind == "text":
        return {"kind": kind, "rows": entry["texts"] if "texts" in entry else [entry["text"]]}
    if kind == "ids":
        batched = bool(entry["ids"]) and isinstance(entry["ids"][0], list)
        topk = entry.get("topk")
        return {"kind": kind, "rows": entry["ids"] if batched else [entry["ids"]],
                "topk": topk if topk is None or batched else [topk], "scored_from": entry.get("scored_from", 0)}
    raise ValueError(f"unknown kind {kind!r}")


def _tensor(entry: dict, tensor: Any):
    import torch

    dtype = getattr(torch, entry["dtype"])
    if "safetensors" in entry:
        return tensor(entry["safetensors"])
    data = torch.tensor(entry["data"], dtype=torch.float64 if dtype.is_floating_point else dtype)
    return data.to(dtype).reshape(entry["shape"])


def tensor_names(entry: dict) -> list[str]:
    items = entry.get("items", {}).values() if entry.get("kind") == "tensors" else [entry]
    return [e["safetensors"] for e in items if "safetensors" in e]


# -- one file -----------------------------------------------------------------------------------------------

class GoldenFile:
    """The goldens of one test module, read once (the JSON at first use, the safetensors when a large tensor
    is first compared)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tensors_path = self.path.with_suffix(".safetensors")
        self.goldens: dict[str, dict[str, dict[str, dict]]] = {}
        self.error: str | None = None
        self._tensors: dict[str, Any] | None = None
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                self.goldens = data["goldens"]
                if not isinstance(self.goldens, dict):
                    raise TypeError("'goldens' is not an object")
            except (ValueError, KeyError, TypeError) as exc:
                self.error = f"{self.path} is not a golden file of pytest-llmload ({exc}); fix or remove it"

    def classes(self, test: str, name: str) -> dict[str, dict]:
        """The entries recorded for ``name`` in ``test``, by device class."""
        return self.goldens.get(test, {}).get(name, {})

    def tensor(self, name: str):
        if self._tensors is None:
            from safetensors.torch import load_file

            self._tensors = load_file(str(self.tensors_path)) if self.tensors_path.exists() else {}
        if name not in self._tensors:
            raise KeyError(f"{self.tensors_path} has no tensor {name!r}; record the golden again")
        return self._tensors[name]

    def merge_and_write(self, recorded: dict[tuple[str, str, str], tuple[dict, dict[str, Any]]],
                        module: str) -> None:
        """Replace the ``recorded`` keys (test, name, device class) with their new entries, keep everything
        else, and write both files atomically (the safetensors first: the JSON never names a missing tensor)."""
        if self.error is not None:
            raise ValueError(self.error)
        blobs: dict[str, Any] = {}
        for (test, name, device_class), (entry, entry_blobs) in sorted(recorded.items()):
            self.goldens.setdefault(test, {}).setdefault(name, {})[device_class] = entry
            blobs.update(entry_blobs)
        wanted = {n for names in self.goldens.values() for classes in names.values()
                  for entry in classes.values() for n in tensor_names(entry)}
        if wanted or self.tensors_path.exists():
            tensors = {}
            if self.tensors_path.exists() and wanted - set(blobs):
                from safetensors.torch import load_file

                tensors = load_file(str(self.tensors_path))
            tensors.update(blobs)
            tensors = {n: t.contiguous() for n, t in tensors.items() if n in wanted}
            self._tensors = dict(tensors)
            if tensors:
                _save_tensors_atomically(tensors, self.tensors_path)
            elif self.tensors_path.exists():
                os.unlink(self.tensors_path)
        document = {"about": ABOUT.format(module=module), "format": FORMAT, "goldens": self.goldens}
        write_atomically(str(self.path), dumps(document) + "\n")


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
    return json.dumps(value, ensure_ascii=False)


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
