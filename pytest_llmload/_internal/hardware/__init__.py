"""What hardware this process can use, probed lazily once, and the reasons a test cannot run on it.

- :mod:`.inventory`: ``GPU`` and ``Inventory`` (plain data) and their header words;
- :mod:`.sources`: the GPU sources (virtual fleet, NVML, nvidia-smi, amdsmi/rocm-smi, torch) in one
  registry, ``SOURCES``, tried in one order by ``probe_gpus()``; ``--llm-emulate-gpu``; ROCm detection;
- :mod:`.bnb`: bitsandbytes imported quietly and its backend tried once per device (cached);
- :mod:`.reasons`: why a test or cell cannot run on an inventory (pure functions, testable anywhere);
- :mod:`.xdist`: each pytest-xdist worker's slice of the GPUs.
"""

from __future__ import annotations

from pytest_llmload._internal.hardware.bnb import (
    BitsandbytesStatus,
    bitsandbytes_status,
    import_bitsandbytes,
    probe_bitsandbytes,
)
from pytest_llmload._internal.hardware.inventory import GPU, Inventory, describe_gpus
from pytest_llmload._internal.hardware.reasons import bitsandbytes_reasons, cell_reasons, gpu_reasons, map_gpu_indices
from pytest_llmload._internal.hardware.sources import (
    SOURCES,
    GpuProbe,
    emulated_memory,
    header_line,
    is_rocm,
    probe_gpus,
    probe_inventory,
    set_emulated_memory,
    virtual_gpus_now,
    visibility_variable,
    visible_device_ids,
    visible_gpu_count,
)
from pytest_llmload._internal.hardware.xdist import (
    assign_worker_gpus,
    outer_visible_gpus,
    set_visible,
    worker_gpus,
    worker_index,
)

__all__ = [
    "GPU", "Inventory", "describe_gpus", "BitsandbytesStatus", "bitsandbytes_status", "import_bitsandbytes",
    "probe_bitsandbytes", "bitsandbytes_reasons", "cell_reasons", "gpu_reasons", "map_gpu_indices", "SOURCES",
    "GpuProbe", "emulated_memory", "header_line", "is_rocm", "probe_gpus", "probe_inventory",
    "set_emulated_memory", "virtual_gpus_now", "visibility_variable", "visible_device_ids", "visible_gpu_count",
    "assign_worker_gpus", "outer_visible_gpus", "set_visible", "worker_gpus", "worker_index",
]
