"""What a process has: its GPUs and its bitsandbytes backend, as plain frozen data (no probing here)."""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass

from pytest_llmload._internal.config.numbers import format_size


@dataclass(frozen=True)
class GPU:
    index: int  # index as torch sees it (after CUDA_VISIBLE_DEVICES / HIP_VISIBLE_DEVICES)
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
    emulated: int | None = None  # --llm-emulate-gpu: every card shows (and is capped at) this size

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
        return describe_gpus(list(self.gpus), self.source, self.emulated, rocm=is_rocm())

    def describe(self) -> str:
        if self.bitsandbytes_version is None:
            bnb = "bitsandbytes not installed"
        elif self.bitsandbytes_backend:
            bnb = f"bitsandbytes {self.bitsandbytes_version} ({self.bitsandbytes_backend})"
        else:
            bnb = f"bitsandbytes {self.bitsandbytes_version} (no working backend: {self.bitsandbytes_error})"
        return f"llmload: {self.describe_gpus()}; {bnb}"


ROCM_SOURCES = ("amdsmi", "rocm-smi")


def describe_gpus(gpus: list[GPU], source: str, emulated: int | None = None, rocm: bool = False) -> str:
    """``2 GPUs (NVIDIA H100 80GB x2)``, ``2 virtual GPUs (2x64.0 MiB, on the CPU)``, ... for the header."""
    if not gpus:
        return "no GPU"
    plural = "s" if len(gpus) != 1 else ""
    if source == "virtual":
        sizes = [format_size(g.total_memory) for g in gpus]
        shape = f"{len(sizes)}x{sizes[0]}" if len(set(sizes)) == 1 else ",".join(sizes)
        text = f"{len(gpus)} virtual GPU{plural} ({shape}, on the CPU)"
    else:
        names: dict[str, int] = {}
        for gpu in gpus:
            names[gpu.name] = names.get(gpu.name, 0) + 1
        parts = ", ".join(f"{n} x{c}" if c > 1 else n for n, c in names.items())
        rocm = rocm or source in ROCM_SOURCES
        text = f"{len(gpus)} {'ROCm ' if rocm else ''}GPU{plural} ({parts})"
    if emulated is not None:
        text += f", emulated as {format_size(emulated)} each (--llm-emulate-gpu)"
    return text


_rocm_build: list[bool] = []


def is_rocm() -> bool:
    """Is the installed torch a ROCm build (``torch.version.hip``)? Read without importing torch."""
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "version"):
        return bool(getattr(torch.version, "hip", None))
    if not _rocm_build:
        import importlib.util

        found = False
        try:
            spec = importlib.util.find_spec("torch")
            for folder in (spec.submodule_search_locations or []) if spec else []:
                path = os.path.join(folder, "version.py")
                if os.path.exists(path):
                    with open(path, encoding="utf-8") as handle:
                        found = bool(re.search(r"^hip\b[^=\n]*=\s*['\"]", handle.read(), re.MULTILINE))
                    break
        except (ImportError, ValueError, OSError):
            found = False
        _rocm_build.append(found)
    return _rocm_build[0]
