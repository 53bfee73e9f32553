"""Where the GPU list comes from: one registry of sources, tried in one order by :func:`probe_gpus`.

Order: a running virtual fleet, NVML, ``nvidia-smi``, ROCm's ``amdsmi``/``rocm-smi``, then torch. A
source returns ``list[GPU]`` or None ("cannot tell here"); an empty list is believed unless a driver is
plausibly there (then later sources, torch last, are asked). Only torch creates a CUDA context, so the
callers say how it may be asked: ``"import"`` (in this process), ``"subprocess"`` (a child process, for
the pytest-xdist controller about to set visibility variables) or ``"never"`` (the header).
``--llm-emulate-gpu`` is applied here, so every caller sees the smaller cards.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable

from pytest_llmload._internal.config.numbers import is_whole_number
from pytest_llmload._internal.hardware.inventory import GPU, describe_gpus, is_rocm  # noqa: F401 - is_rocm: a source fact


# -- which variable says what is visible -----------------------------------------------------------------


def visibility_variable() -> str:
    """The variable that numbers the GPUs a process sees (what skip reasons and notes name)."""
    return "HIP_VISIBLE_DEVICES" if is_rocm() else "CUDA_VISIBLE_DEVICES"


def _id_list(value: str | None) -> list[str] | None:
    if value is None:
        return None
    ids = []
    for part in value.split(","):
        part = part.strip()
        if not part or part.startswith("-"):
            break  # CUDA (and HIP) stop at the first invalid entry
        ids.append(part)
    return ids


def visible_device_ids() -> list[str] | None:
    """The entries of ``CUDA_VISIBLE_DEVICES`` (on ROCm ``HIP_VISIBLE_DEVICES`` first), None when unset."""
    if is_rocm() and os.environ.get("HIP_VISIBLE_DEVICES") is not None:
        return _id_list(os.environ["HIP_VISIBLE_DEVICES"])
    return _id_list(os.environ.get("CUDA_VISIBLE_DEVICES"))


def _visible_rows(rows: dict[str, object], *, rocr: bool = False) -> list | None:
    """Rows keyed by physical index, filtered the way the runtime filters them (ROCR first on ROCm)."""
    order = list(rows)
    if rocr and os.environ.get("ROCR_VISIBLE_DEVICES") is not None:
        order = [i for i in _id_list(os.environ["ROCR_VISIBLE_DEVICES"]) or [] if i in rows]
    visible = visible_device_ids()
    if visible is None:
        return [rows[i] for i in order]
    if rocr:
        if not all(is_whole_number(v) for v in visible):
            return None  # UUIDs: let torch tell
        return [rows[order[int(v)]] for v in visible if int(v) < len(order)]
    return [rows[v] for v in visible if v in rows]


# -- the sources ---------------------------------------------------------------------------------------------
def virtual_gpus_now() -> list[GPU] | None:
    """The cards of the virtual GPU fleet running now (they replace the machine's), or None."""
    module = sys.modules.get("pytest_llmload._internal.virtual")
    fleet = module.active_fleet() if module is not None else None
    if fleet is None:
        return None
    return [GPU(i, c.spec.name, c.total_memory, fleet.mem_get_info(i)[0], c.spec.capability)
            for i, c in enumerate(fleet.cards)]


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
            memory, total = _nvml_memory(pynvml, handle)
            try:
                capability = tuple(pynvml.nvmlDeviceGetCudaComputeCapability(handle))
            except Exception:  # noqa: BLE001
                capability = None
            gpus.append(GPU(index, name.decode() if isinstance(name, bytes) else name,
                            total, int(memory.free), capability))
        return gpus
    finally:
        pynvml.nvmlShutdown()


def _nvml_memory(pynvml, handle):
    """``(memory info, usable total)``. NVML's plain total includes what the driver reserves (615 MiB on an
    H200: 143771 MiB where CUDA and torch report 143155 MiB); the v2 info says how much, and CUDA's total is
    the rest."""
    try:
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle, version=pynvml.nvmlMemory_v2)
        return memory, int(memory.total) - int(getattr(memory, "reserved", 0))
    except Exception:  # noqa: BLE001 - an older driver or nvidia-ml-py without v2
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return memory, int(memory.total)


def _probe_nvidia_smi() -> list[GPU] | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=index,name,memory.total,memory.free,compute_cap", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    rows = [[c.strip() for c in line.split(",")] for line in out.strip().splitlines() if line.strip()]
    chosen = _visible_rows({r[0]: r for r in rows if len(r) >= 4})
    gpus = []
    for index, row in enumerate(chosen or []):
        try:
            cap = tuple(int(x) for x in row[4].split(".")) if len(row) > 4 and is_whole_number(row[4][:1]) else None
            gpus.append(GPU(index, row[1], int(float(row[2])) * 2**20, int(float(row[3])) * 2**20, cap))
        except ValueError:
            return None  # output this parser does not understand: let torch tell
    return gpus


def _probe_amdsmi() -> list[GPU] | None:
    try:
        import amdsmi
    except ImportError:
        return None
    try:
        amdsmi.amdsmi_init()
    except Exception:  # noqa: BLE001 - no driver
        return None
    try:
        rows = {}
        for i, handle in enumerate(amdsmi.amdsmi_get_processor_handles()):
            name = amdsmi.amdsmi_get_gpu_asic_info(handle).get("market_name") or "AMD GPU"
            total = int(amdsmi.amdsmi_get_gpu_memory_total(handle, amdsmi.AmdSmiMemoryType.VRAM))
            used = int(amdsmi.amdsmi_get_gpu_memory_usage(handle, amdsmi.AmdSmiMemoryType.VRAM))
            rows[str(i)] = (name, total, total - used)
    except Exception:  # noqa: BLE001 - an amdsmi this code does not understand: let others tell
        return None
    finally:
        amdsmi.amdsmi_shut_down()
    chosen = _visible_rows(rows, rocr=True)
    return None if chosen is None else [GPU(i, n, t, f) for i, (n, t, f) in enumerate(chosen)]


def _probe_rocm_smi() -> list[GPU] | None:
    exe = shutil.which("rocm-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--showproductname", "--showmeminfo", "vram", "--json"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
        data = json.loads(out)
        rows = {}
        for key, card in data.items():
            if not key.startswith("card") or not is_whole_number(key[4:]):
                continue
            total = int(card["VRAM Total Memory (B)"])
            used = int(card.get("VRAM Total Used Memory (B)", 0))
            name = card.get("Card Series") or card.get("Card series") or card.get("Card model") or "AMD GPU"
            rows[key[4:]] = (name, total, total - used)
    except (OSError, subprocess.SubprocessError, ValueError, KeyError, TypeError, AttributeError):
        return None
    chosen = _visible_rows(dict(sorted(rows.items(), key=lambda kv: int(kv[0]))), rocr=True)
    return None if chosen is None else [GPU(i, n, t, f) for i, (n, t, f) in enumerate(chosen)]


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


_CHILD = ("import json, torch\n"
          "print(json.dumps([[torch.cuda.get_device_properties(i).name, torch.cuda.get_device_properties(i).total_memory,"
          " torch.cuda.get_device_properties(i).major, torch.cuda.get_device_properties(i).minor]"
          " for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []))")


def _probe_torch_subprocess() -> list[GPU] | None:
    """torch in a child process: this one creates no CUDA context."""
    try:
        out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=120)
        rows = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None
    return None if rows is None else [GPU(i, n, int(t), int(t), (a, b)) for i, (n, t, a, b) in enumerate(rows)]


TORCH_SOURCE = "torch"
# (name, probe): tried in this order; a new source goes before torch. "virtual" replaces the machine's.
SOURCES: list[tuple[str, Callable[[], list[GPU] | None]]] = [
    ("virtual", virtual_gpus_now),
    ("nvml", _probe_nvml),
    ("nvidia-smi", _probe_nvidia_smi),
    ("amdsmi", _probe_amdsmi),
    ("rocm-smi", _probe_rocm_smi),
]


def _driver_hint() -> bool:
    # Without the tools, GPUs can still exist (containers): ask torch only when a driver is plausibly there.
    return any(os.path.exists(p) for p in ("/proc/driver/nvidia", "/dev/nvidia0", "/dev/kfd"))


# -- --llm-emulate-gpu -----------------------------------------------------------------------------------
_emulated: list[int] = []  # the one owner of the emulated size (real cards and virtual ones read it here)
_emulation_listeners: list = []  # called after a change (a running virtual fleet re-reads its cards' limits)


def set_emulated_memory(size: int | None) -> None:
    """Make every card look (to every caller of :func:`probe_gpus`, and every virtual card) ``size`` bytes
    big; None ends it."""
    _emulated.clear()
    if size is not None:
        _emulated.append(int(size))
    for listener in list(_emulation_listeners):
        listener()


def emulated_memory() -> int | None:
    return _emulated[0] if _emulated else None


def _emulate(gpus: list[GPU]) -> list[GPU]:
    size = emulated_memory()
    if size is None:
        return gpus
    out = []
    for g in gpus:
        used = g.total_memory - g.free_memory
        total = min(g.total_memory, size)
        out.append(GPU(g.index, g.name, total, max(min(g.free_memory, total - used), 0), g.capability))
    return out


# -- the one probe ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GpuProbe:
    gpus: list[GPU] | None  # None: unknown (torch was not to be asked)
    source: str


def probe_gpus(torch: str = "import") -> GpuProbe:
    """This process's GPUs from the first source that can tell (see the module docstring)."""
    if torch not in ("import", "subprocess", "never"):
        raise ValueError(f"torch={torch!r}: expected 'import', 'subprocess' or 'never'")
    hint = None
    for name, source in SOURCES:
        if name != "virtual" and visible_device_ids() == []:
            return GpuProbe([], "CUDA_VISIBLE_DEVICES")  # set and empty: no GPU is visible to this process
        gpus = source()
        if gpus is None:
            continue
        if gpus or name == "virtual":
            return GpuProbe(_emulate(gpus), name)
        if hint is None:
            hint = _driver_hint()
        if not hint:
            return GpuProbe([], name)
    if hint is None and not _driver_hint():
        return GpuProbe([], "none")
    if torch == "never":
        return GpuProbe(None, "unknown")
    gpus = _probe_torch() if torch == "import" else _probe_torch_subprocess()
    return GpuProbe(_emulate(gpus or []), TORCH_SOURCE)


def visible_gpu_count() -> int:
    """How many GPUs this process sees, without creating a CUDA context in it."""
    return len(probe_gpus(torch="subprocess").gpus or [])


def header_line() -> str:
    """The pytest header line, from sources that create no CUDA context and import no torch.

    bitsandbytes is only named here; its backend is tried when a test first needs it.
    """
    from pytest_llmload._internal.hardware.bnb import installed_version

    probe = probe_gpus(torch="never")
    version = installed_version()
    bnb = f"bitsandbytes {version} (backend tried on first use)" if version else "bitsandbytes not installed"
    if probe.gpus is None:
        return f"llmload: GPUs unknown until first use (no NVML){'; ROCm build' if is_rocm() else ''}; {bnb}"
    gpus = describe_gpus(probe.gpus, probe.source, emulated_memory(), rocm=is_rocm())
    return f"llmload: {gpus}; {bnb}"


def probe_inventory(*, bitsandbytes: bool = True):
    """Probe this process's GPUs (:func:`probe_gpus`) and, if asked, bitsandbytes (cached per process)."""
    from pytest_llmload._internal.hardware.bnb import bitsandbytes_status
    from pytest_llmload._internal.hardware.inventory import Inventory

    probe = probe_gpus(torch="import")
    gpus = probe.gpus or []
    version = backend = error = None  # not tried: the Gate tries it when a cell needs it
    if bitsandbytes:
        # A virtual card is CPU memory: bitsandbytes runs through its CPU backend, with cpu maps
        device = "cuda:0" if gpus and probe.source != "virtual" else "cpu"
        status = bitsandbytes_status(device)
        version, backend, error = status.version, status.backend, status.error
    return Inventory(tuple(gpus), version, backend, error, probe.source, emulated_memory())
