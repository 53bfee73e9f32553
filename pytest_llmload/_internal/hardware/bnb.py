"""bitsandbytes: imported quietly, and its backend tried once per device per process (cached here)."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass

from pytest_llmload._internal.compat.bitsandbytes import (  # noqa: F401 - re-exported for the hardware package
    import_bitsandbytes,
)


@dataclass(frozen=True)
class BitsandbytesStatus:
    version: str | None  # None: not installed
    backend: str | None  # "cuda", "cpu", ...; None: no working backend
    error: str | None


def installed_version() -> str | None:
    try:
        return importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        return None


def probe_bitsandbytes(device: str = "cpu") -> tuple[str | None, str | None, str | None]:
    """(version, working backend, error): a tiny int8 layer really runs on ``device``, or the error says why."""
    version = installed_version()
    if version is None:
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


_status: dict[str, BitsandbytesStatus] = {}


def bitsandbytes_status(device: str) -> BitsandbytesStatus:
    """:func:`probe_bitsandbytes` on ``device``, tried once per process and device (it costs seconds)."""
    if device not in _status:
        _status[device] = BitsandbytesStatus(*probe_bitsandbytes(device))
    return _status[device]
