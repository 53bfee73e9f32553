"""What hardware this process can use, probed lazily once, and the reasons a test cannot run on it.

GPUs come from NVML where ``nvidia-ml-py`` is installed (no CUDA context is created, which matters
for the pytest-xdist controller), else from torch. ``CUDA_VISIBLE_DEVICES`` is respected either way.
The reasons are computed by pure functions of an :class:`Inventory`, so they are testable anywhere.
"""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass

from .errors import LLMLoadUsageError
from .sizes import format_size, parse_size
from .specs import QUANTIZED_PRECISIONS, LLMSpec, is_whole_number


@dataclass(frozen=True)
class GPU:
    index: int  # index as torch sees it (after CUDA_VISIBLE_DEVICES)
    name: str
    total_memory: int
    free_memory: int
    capability: tuple[int, int] | None = None

    @property
    def supports_bf16(self) -> bool:
        return self.capability is None or self.capability >= (8, 0)


@dataclass(frozen=True)
class Inventory:
    """The visible GPUs and the bitsandbytes backend of this process."""

    gpus: tuple[GPU, ...] = ()
    bitsandbytes_version: str | None = None
    bitsandbytes_backend: str | None = None  # "cuda", "cpu", ... once tried; None when not working
    bitsandbytes_error: str | None = None
    source: str = "none"

    @property
    def count(self) -> int:
        return len(self.gpus)

    def __len__(self) -> int:
        return len(self.gpus)

    def __iter__(self):
        return iter(self.gpus)

    def __getitem__(self, index: int) -> GPU:
        return self.gpus[index]

    @property
    def bitsandbytes_works(self) -> bool:
        return self.bitsandbytes_backend is not None

    def describe_gpus(self) -> str:
        if not self.gpus:
            return "no GPU"
        if self.source == "virtual":
            return _virtual_description(list(self.gpus))
        names: dict[str, int] = {}
        for gpu in self.gpus:
            names[gpu.name] = names.get(gpu.name, 0) + 1
        parts = ", ".join(f"{n} x{c}" if c > 1 else n for n, c in names.items())
        return f"{len(self.gpus)} GPU{'s' if len(self.gpus) > 1 else ''} ({parts})"

    def describe(self) -> str:
        if self.bitsandbytes_version is None:
            bnb = "bitsandbytes not installed"
        elif self.bitsandbytes_backend:
            bnb = f"bitsandbytes {self.bitsandbytes_version} ({self.bitsandbytes_backend})"
        else:
            bnb = f"bitsandbytes {self.bitsandbytes_version} (no working backend: {self.bitsandbytes_error})"
        return f"llmload: {self.describe_gpus()}; {bnb}"


def visible_device_ids() -> list[str] | None:
    """The entries of ``CUDA_VISIBLE_DEVICES`` (None when unset: all devices are visible)."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    ids = []
    for part in value.split(","):
        part = part.strip()
        if not part or part.startswith("-"):
            break  # CUDA stops at the first invalid entry
        ids.append(part)
    return ids


def _probe_nvml() -> list[GPU] | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver: NVML cannot tell, torch may
        return None
    try:
        count = pynvml.nvmlDeviceGetCount()
        handles = []
        visible = visible_device_ids()
        if visible is None:
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        else:
            for entry in visible:
                if is_whole_number(entry):
                    if int(entry) >= count:
                        break
                    handles.append(pynvml.nvmlDeviceGetHandleByIndex(int(entry)))
                else:
                    handles.append(pynvml.nvmlDeviceGetHandleByUUID(entry))
        gpus = []
        for index, handle in enumerate(handles):
            name = pynvml.nvmlDeviceGetName(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            try:
                capability = tuple(pynvml.nvmlDeviceGetCudaComputeCapability(handle))
            except Exception:  # noqa: BLE001
                capability = None
            gpus.append(GPU(index, name.decode() if isinstance(name, bytes) else name,
                            int(memory.total), int(memory.free), capability))
        return gpus
    finally:
        pynvml.nvmlShutdown()


def _probe_torch() -> list[GPU]:
    import torch

    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        gpus.append(GPU(index, props.name, int(total), int(free), (props.major, props.minor)))
    return gpus


def import_bitsandbytes():
    """Import bitsandbytes without the noise its import makes (torch.jit deprecation warnings, a
    kernels-community warning on CPUs with AVX512-BF16): pytest-llmload chooses when it is imported."""
    import logging
    import sys
    import warnings

    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"]
    logger = logging.getLogger("bitsandbytes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            import bitsandbytes
    finally:
        logger.setLevel(level)
    return bitsandbytes


def probe_bitsandbytes(device: str = "cpu") -> tuple[str | None, str | None, str | None]:
    """(version, working backend, error): a tiny int8 layer really runs on ``device``, or the error says why."""
    try:
        version = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        return None, None, "not installed"
    try:
        import torch

        bnb = import_bitsandbytes()
        layer = bnb.nn.Linear8bitLt(8, 8, has_fp16_weights=False).to(device)
        with torch.no_grad():
            out = layer(torch.ones(2, 8, device=device, dtype=torch.float16 if device != "cpu" else torch.float32))
        if not torch.isfinite(out.float()).all():
            return version, None, "int8 matmul gave non-finite values"
    except Exception as exc:  # noqa: BLE001 - any failure means no working backend
        return version, None, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return version, device.split(":")[0], None


def _probe_nvidia_smi() -> list[GPU] | None:
    import shutil
    import subprocess

    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run(
            [exe, "--query-gpu=index,name,memory.total,memory.free,compute_cap", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    rows = [[c.strip() for c in line.split(",")] for line in out.strip().splitlines() if line.strip()]
    by_index = {r[0]: r for r in rows if len(r) >= 4}
    visible = visible_device_ids()
    chosen = [by_index[i] for i in (visible if visible is not None else list(by_index)) if i in by_index]
    gpus = []
    for index, row in enumerate(chosen):
        try:
            cap = tuple(int(x) for x in row[4].split(".")) if len(row) > 4 and is_whole_number(row[4][:1]) else None
            gpus.append(GPU(index, row[1], int(float(row[2])) * 2**20, int(float(row[3])) * 2**20, cap))
        except ValueError:
            return None  # output this parser does not understand: let torch tell
    return gpus


def virtual_gpus_now() -> list[GPU] | None:
    """The cards of the virtual GPU fleet running now (they replace the machine's), or None."""
    import sys

    module = sys.modules.get("pytest_llmload.virtual")
    fleet = module.active_fleet() if module is not None else None
    if fleet is None:
        return None
    return [GPU(i, c.spec.name, c.total_memory, c.total_memory - c.reserved, c.spec.capability)
            for i, c in enumerate(fleet.cards)]


def visible_gpu_count() -> int:
    """How many GPUs this process sees, without creating a CUDA context where NVML or nvidia-smi can tell."""
    virtual = virtual_gpus_now()
    if virtual is not None:
        return len(virtual)
    gpus = _probe_nvml()
    if gpus is None:
        gpus = _probe_nvidia_smi()
    if gpus is not None and (gpus or not _torch_sees_cuda_hint()):
        return len(gpus)
    import torch

    return torch.cuda.device_count()


def _torch_sees_cuda_hint() -> bool:
    # Without NVML and nvidia-smi, GPUs can still exist (containers without the tools): ask torch
    # only when a driver is plausibly there.
    return os.path.exists("/proc/driver/nvidia") or os.path.exists("/dev/nvidia0")


def header_line() -> str:
    """The pytest header line, from sources that create no CUDA context and import no torch.

    bitsandbytes is only named here; its backend is tried when a test first needs it.
    """
    virtual = virtual_gpus_now()
    gpus = virtual if virtual is not None else _probe_nvml()
    if gpus is None:
        gpus = _probe_nvidia_smi()
    try:
        bnb = f"bitsandbytes {importlib.metadata.version('bitsandbytes')} (backend tried on first use)"
    except importlib.metadata.PackageNotFoundError:
        bnb = "bitsandbytes not installed"
    if gpus is None:
        return f"llmload: GPUs unknown until first use (no NVML); {bnb}"
    if virtual is not None:
        return f"llmload: {_virtual_description(virtual)}; {bnb}"
    return f"llmload: {Inventory(tuple(gpus)).describe_gpus()}; {bnb}"


def _virtual_description(gpus: list[GPU]) -> str:
    sizes = [format_size(g.total_memory) for g in gpus]
    shape = f"{len(sizes)}x{sizes[0]}" if len(set(sizes)) == 1 else ",".join(sizes)
    return f"{len(gpus)} virtual GPU{'s' if len(gpus) != 1 else ''} ({shape}, on the CPU)"


_virtual_bitsandbytes: list[tuple] = []


def probe_inventory(*, bitsandbytes: bool = True) -> Inventory:
    """Probe this process's GPUs (a running virtual fleet, else NVML, then torch) and, if asked, bitsandbytes."""
    gpus, source = virtual_gpus_now(), "virtual"
    if gpus is None:
        gpus, source = _probe_nvml(), "nvml"
    if gpus is None:
        gpus, source = _probe_torch(), "torch"
    if bitsandbytes and source == "virtual":
        # A virtual card is CPU memory: bitsandbytes runs through its CPU backend, with cpu maps (once per process)
        if not _virtual_bitsandbytes:
            _virtual_bitsandbytes.append(probe_bitsandbytes("cpu"))
        version, backend, error = _virtual_bitsandbytes[0]
    elif bitsandbytes:
        version, backend, error = probe_bitsandbytes("cuda:0" if gpus else "cpu")
    else:
        version, backend, error = None, None, None  # not tried: the Gate tries it when a cell needs it
    return Inventory(tuple(gpus), version, backend, error, source)


# -- reasons: pure functions of an inventory ------------------------------------------------------


def _gpu_list(gpus) -> str:
    if not gpus:
        return "found none"
    return f"found {len(gpus)} (" + ", ".join(format_size(g.total_memory) for g in gpus) + ")"


def gpu_reasons(inventory: Inventory, n: int = 1, memory: int | str | None = None) -> list[str]:
    """Why ``n`` GPUs with ``memory`` each are not available here (empty when they are)."""
    need = parse_size(memory) if memory is not None else None
    what = f"{n} GPU{'s' if n != 1 else ''}" + (f" with >= {format_size(need)} each" if need else "")
    usable = [g for g in inventory.gpus if need is None or g.total_memory >= need]
    if len(usable) < n:
        return [f"needs {what}; {_gpu_list(inventory.gpus)}"]
    return []


def bitsandbytes_reasons(inventory: Inventory) -> list[str]:
    if inventory.bitsandbytes_works:
        return []
    if inventory.bitsandbytes_version is None:
        return ["needs bitsandbytes; it is not installed"]
    return [f"needs a working bitsandbytes backend; bitsandbytes {inventory.bitsandbytes_version} "
            f"failed here: {inventory.bitsandbytes_error}"]


def map_gpu_indices(device_map) -> set[int]:
    """The GPU indices a device map names (``0``, ``"cuda:1"``, bare ``"cuda"`` = 0)."""
    if not isinstance(device_map, dict):
        return set()
    indices = set()
    for device in device_map.values():
        if isinstance(device, int):
            indices.add(device)
        elif isinstance(device, str) and device.startswith("cuda"):
            indices.add(int(device.split(":")[1]) if ":" in device else 0)
    return indices


def cell_reasons(spec: LLMSpec, inventory: Inventory) -> list[str]:
    """Why a matrix cell cannot run on this hardware (empty when it can).

    Strategies (auto, balanced, ...) and ``process`` are legitimate CPU loads without GPUs.
    """
    reasons = []
    indices = map_gpu_indices(spec.device_map)
    budgeted = sorted(d for d in (spec.max_memory_dict or {}) if isinstance(d, int))
    if budgeted and budgeted[-1] >= inventory.count:
        devices = ", ".join(f"cuda:{i}" for i in budgeted)
        reasons.append(f"max memory names {devices}; {_gpu_list(inventory.gpus)}")
    if indices:
        highest = max(indices)
        if highest >= inventory.count:
            devices = ", ".join(f"cuda:{i}" for i in sorted(indices))
            reasons.append(f"device map {spec.device_map_spec.label} needs {devices}; {_gpu_list(inventory.gpus)}")
    on_gpus = indices or (inventory.gpus and spec.device_map_spec.kind in ("strategy", "process", "tp"))
    if spec.precision == "bf16" and on_gpus:
        used = [g for g in inventory.gpus if not indices or g.index in indices]
        lacking = [g for g in used if not g.supports_bf16]
        if lacking:
            cap = ".".join(map(str, lacking[0].capability or ()))
            reasons.append(f"bf16 needs compute capability >= 8.0; {lacking[0].name} has {cap}")
    if spec.precision in QUANTIZED_PRECISIONS:
        reasons.extend(bitsandbytes_reasons(inventory))
    return reasons


# -- pytest-xdist: GPUs per worker ---------------------------------------------------------------


def worker_index(worker_id: str | None) -> int | None:
    """``"gw3"`` -> 3; None outside an xdist worker."""
    if not worker_id or not worker_id.startswith("gw") or not is_whole_number(worker_id[2:]):
        return None
    return int(worker_id[2:])


def worker_gpus(index: int, per_worker: int, visible: list[str]) -> list[str]:
    """The disjoint slice of ``visible`` GPU ids that worker ``index`` gets with ``per_worker`` each."""
    if per_worker < 1:
        raise LLMLoadUsageError(f"invalid --llm-gpus-per-worker value {per_worker!r}: expected a whole number >= 1")
    return visible[index * per_worker:(index + 1) * per_worker]


def outer_visible_gpus() -> list[str]:
    """The GPU ids this process may hand out: ``CUDA_VISIBLE_DEVICES`` if set, else every GPU's index.

    Counted without creating a CUDA context (NVML, nvidia-smi, or torch in a child process), since
    the caller is about to set ``CUDA_VISIBLE_DEVICES`` for this process.
    """
    visible = visible_device_ids()
    if visible is not None:
        return visible
    gpus = _probe_nvml()
    if gpus is None:
        gpus = _probe_nvidia_smi()
    if gpus is not None and (gpus or not _torch_sees_cuda_hint()):
        return [str(i) for i in range(len(gpus))]
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                         capture_output=True, text=True, timeout=120)
    count = int(out.stdout.strip() or 0) if out.returncode == 0 else 0
    return [str(i) for i in range(count)]


def assign_worker_gpus(worker_id: str | None, per_worker: int, *, virtual_cards: int | None = None) -> str | None:
    """Set ``CUDA_VISIBLE_DEVICES`` of this xdist worker to its own slice; return a note for skip reasons.

    ``virtual_cards``: the session runs on a virtual fleet of that many cards (they are what is sliced)."""
    index = worker_index(worker_id)
    if index is None:
        return None
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        raise LLMLoadUsageError(
            "--llm-gpus-per-worker: CUDA was initialised in this worker before the plugin could assign its GPUs "
            "(something in conftest.py touched a GPU at import time)"
        )
    if virtual_cards is not None:
        visible = visible_device_ids() or [str(i) for i in range(virtual_cards)]
    else:
        visible = outer_visible_gpus()
    mine = worker_gpus(index, per_worker, visible)
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(mine)
    return (f"--llm-gpus-per-worker={per_worker} gives worker {worker_id} "
            f"{len(mine)} of {len(visible)} visible GPU{'s' if len(visible) != 1 else ''}")
