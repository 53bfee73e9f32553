"""What keeps GPU memory: the GPU counters, the GPU tensors Python still holds, and the leak check's weak
record of a load (its model, and each weight's tensor and storage).

Used by the leak check (``pytest_llmload._internal.session.leaks``); who holds an object is
``checks/referrers.py``. Everything here reads; nothing frees.
"""

from __future__ import annotations

import gc
import sys
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable



def gpu_allocated() -> dict[str, int]:
    """``memory_allocated`` of each GPU this process has initialised (a virtual fleet's cards included),
    by device name; empty where torch is not imported or CUDA never started (nothing can be on a card)."""
    from pytest_llmload._internal.planning.measure import cuda_in_use

    torch = cuda_in_use()
    if torch is None:
        return {}
    return {f"cuda:{index}": torch.cuda.memory_allocated(index) for index in range(torch.cuda.device_count())}


def memory_domain() -> object | None:
    """What the GPU counters belong to now: the running virtual fleet, the machine's CUDA, or None.
    Two readings are comparable only within one domain (a test's fleet ends with the test)."""
    from pytest_llmload._internal.virtual import active_fleet

    fleet = active_fleet()
    if fleet is not None:
        return fleet
    torch = sys.modules.get("torch")
    if torch is None:  # nothing can be on a card yet; if CUDA is there, a later reading is comparable
        return "cuda"
    try:
        return "cuda" if torch.cuda.is_available() else None  # CUDA not started yet reads 0 allocated
    except Exception:
        return None


def clear_gpu_workspaces() -> None:
    """Give back what CUDA keeps on its own after a first use (cuBLAS workspaces), so a reading counts tensors."""
    from pytest_llmload._internal.planning.measure import cuda_in_use

    torch = cuda_in_use()
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None) if torch is not None else None
    if clear is not None:
        try:
            clear()
        except Exception:
            pass


@dataclass(frozen=True)
class TensorInfo:
    """One tensor still alive: how a failure names it."""

    name: str  # the parameter's name for a model's tensor, else ""
    shape: tuple
    dtype: str
    device: str
    nbytes: int

    def describe(self) -> str:
        from pytest_llmload._internal.config.numbers import format_size

        label = f"{self.name}: " if self.name else ""
        return f"{label}tensor{list(self.shape)} {self.dtype} on {self.device}, {format_size(self.nbytes)}"


def tensor_info(tensor: Any, name: str = "") -> TensorInfo:
    try:
        nbytes = tensor.untyped_storage().nbytes()
    except Exception:
        nbytes = tensor.numel() * tensor.element_size()
    return TensorInfo(name, tuple(tensor.shape), str(tensor.dtype).replace("torch.", ""), str(tensor.device), nbytes)


def gpu_tensors(exclude: Iterable[int] = ()) -> list[tuple[Any, TensorInfo]]:
    """Every tensor on a GPU that Python still holds (one per storage), largest first; ``exclude``: ids of
    tensors that are accounted for (the cached models' weights)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return []
    skip = set(exclude)
    seen: set[tuple[str, int]] = set()
    found = []
    from pytest_llmload._internal.virtual import active_fleet

    fleet = active_fleet()
    virtual = sys.modules.get("pytest_llmload._internal.virtual.tensor")  # its charges, where a fleet runs
    for obj in gc.get_objects():
        if not issubclass(type(obj), torch.Tensor) or id(obj) in skip:
            continue
        try:
            if obj.device.type != "cuda":
                continue
            storage = (str(obj.device), obj.untyped_storage().data_ptr())
        except Exception:
            continue
        if storage in seen:
            continue
        if fleet is not None:  # only what the running fleet's counters hold (not a card tensor of an older fleet)
            charge = virtual._charged.get(storage[1])
            if charge is None or getattr(charge, "fleet", None) is not fleet or not getattr(charge, "live", False):
                continue
        seen.add(storage)
        found.append((obj, tensor_info(obj)))
    found.sort(key=lambda pair: -pair[1].nbytes)
    return found


@dataclass
class LoadWatch:
    """What the check keeps of one load: weak references only, and the GPU memory the load took."""

    cell: str
    model: weakref.ref
    tensors: list  # WatchedTensor: each parameter and buffer, one per storage
    domain: Any  # the fleet or "cuda" the load's memory was counted in (checks.leaks.memory_domain)
    took: dict = field(default_factory=dict)  # device -> bytes the load added to memory_allocated
    before_release: dict = field(default_factory=dict)
    why: str = ""
    missing: dict | None = None  # device -> bytes of the load's memory not given back (None: not measured yet)
    deferred: bool = False  # released while a test ran: judged after its teardown, when pytest let go of it


@dataclass
class WatchedTensor:
    """One parameter or buffer: a weak reference to the tensor and one to its storage. The collector clears
    the first when it finds the tensor unreachable, even if a ``__del__`` then resurrects it; the storage's
    (a C++ weak pointer) expires only when the memory is really freed."""

    name: str
    tensor: weakref.ref
    storage: Any  # torch.multiprocessing.reductions.StorageWeakRef
    data_ptr: int
    device: str

    def alive(self) -> bool:
        return self.tensor() is not None or not self.storage.expired()


def watched_tensors(model: Any) -> list[WatchedTensor]:
    from torch.multiprocessing.reductions import StorageWeakRef

    watched, seen = [], set()
    try:
        items = list(model.named_parameters(remove_duplicate=True)) + list(model.named_buffers())
    except Exception:
        return watched
    for name, tensor in items:
        try:
            if tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            key = (str(tensor.device), storage.data_ptr())
            if key in seen:
                continue
            seen.add(key)
            watched.append(WatchedTensor(name, weakref.ref(tensor), StorageWeakRef(storage), key[1], key[0]))
        except Exception:  # a tensor subclass that cannot say: not watched, never a failed load
            pass
    return watched


def storage_holders(alive: list[WatchedTensor]) -> list[tuple[str, Any]]:
    """A Python tensor for each storage still allocated: the watched one, or (when the collector cleared its
    weak reference) one found among every tensor Python holds."""
    found = [(w.name, tensor) for w in alive if (tensor := w.tensor()) is not None]
    lost = {(w.device, w.data_ptr): w.name for w in alive if w.tensor() is None}
    if lost:
        import gc
        import sys

        torch = sys.modules["torch"]
        for obj in gc.get_objects():
            if issubclass(type(obj), torch.Tensor):
                try:
                    key = (str(obj.device), obj.untyped_storage().data_ptr())
                except Exception:
                    continue
                if key in lost:
                    found.append((lost.pop(key), obj))
    return found


def reported_before(tensor: Any, reported: dict) -> bool:
    ref = reported.get(id(tensor))
    return ref is not None and ref() is tensor


def drop_test_references(item: Any) -> None:
    """Every fixture of ``item`` is finalized; pytest drops its values and captured log records right after
    the teardown hooks (runtestprotocol, the logging plugin). Dropped now, they are not taken for a leak."""
    funcargs = getattr(item, "funcargs", None)
    if isinstance(funcargs, dict):
        funcargs.clear()
    try:
        from _pytest.logging import caplog_records_key
    except ImportError:  # pragma: no cover - pytest moved it
        return
    records = item.stash.get(caplog_records_key, {})
    for when in ("setup", "call"):  # their text is in the reports already
        if isinstance(records.get(when), list):
            records[when].clear()
