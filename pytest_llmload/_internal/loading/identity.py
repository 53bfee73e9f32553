"""A local checkpoint's identity wherever it is installed: its name from its config and a hash of its weights
files' headers, read with bounds (the footprint baseline keys checkpoints outside the project by it)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pytest_llmload._internal.config.specs import _HUB_ID_RE  # what a hub id looks like: one definition
from pytest_llmload._internal.loading.safety import DamagedFile, open_regular, parse_json


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_MAX_SAFETENSORS_HEADER = 100 * 2**20  # safetensors' own limit on its JSON header
_MAX_CONFIG = 4 * 2**20
_PREFIX_BYTES = 64 * 2**10  # of a weights file that is not safetensors


def _weights_header(path: Path) -> bytes:
    """What identifies a weights file, read with bounds: a safetensors file's JSON header (names, dtypes,
    shapes, offsets), else its size and first 64 KiB."""
    with open_regular(path) as f:  # never a FIFO or a device: it would block or never end
        size = os.fstat(f.fileno()).st_size
        if path.suffix == ".safetensors":
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else 0
            if 0 < length <= min(_MAX_SAFETENSORS_HEADER, size - 8):
                return f.read(length)
            f.seek(0)
        return str(size).encode() + b"\0" + f.read(_PREFIX_BYTES)


def _checkpoint_name(config: Any, folder: Path) -> str:
    """The config's ``_name_or_path`` when it is a hub id (not a local path), else its architecture, else
    its model type, else the folder's name."""
    if isinstance(config, dict):
        architectures = config.get("architectures")
        for name in (config.get("_name_or_path"),
                     architectures[0] if isinstance(architectures, list) and architectures else None,
                     config.get("model_type")):
            if isinstance(name, str) and _HUB_ID_RE.match(name) and not os.path.isabs(name):
                return name
    return folder.name


def checkpoint_identity(folder: str) -> str:
    """A local checkpoint as it reads wherever it is installed: ``NAME@HASH`` (``GPT2LMHeadModel@3f9a0c1b2d4e``),
    NAME from its config (:func:`_checkpoint_name`), HASH of its weights files' names and headers (the config's
    text when it has none). Read once per folder and process."""
    if folder not in _IDENTITIES:
        import hashlib

        path = Path(folder)
        try:
            raw = b""
            with open_regular(path / "config.json") as f:
                raw = f.read(_MAX_CONFIG)
            config = parse_json(raw)
        except (OSError, DamagedFile):
            config = None
        digest = hashlib.sha256()
        try:
            weights = sorted(p for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file())
        except OSError:
            weights = []
        for weight in weights:
            try:
                header = _weights_header(weight)
            except (OSError, DamagedFile):
                header = b"unreadable"
            digest.update(weight.name.encode() + b"\0" + header + b"\0")
        if not weights:
            digest.update(raw)
        _IDENTITIES[folder] = f"{_checkpoint_name(config, path)}@{digest.hexdigest()[:12]}"
    return _IDENTITIES[folder]


_IDENTITIES: dict[str, str] = {}
