"""Faults a test plugin meets unattended: damaged checkpoints, dead processes' leftovers, an unreachable hub."""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from .errors import ModelLoadError

SESSION_PREFIX = "llmload-session-"


# -- damaged checkpoints ---------------------------------------------------------------------------


def check_checkpoint_files(directory: str | os.PathLike) -> None:
    """Raise :class:`ModelLoadError` naming the file if a safetensors file or tokenizer.json is damaged.

    Reads only headers (a few KB), so a truncated multi-GB file is found without reading it.
    """
    path = Path(directory)
    for weights in sorted(path.glob("*.safetensors")):
        problem = _safetensors_problem(weights)
        if problem:
            raise ModelLoadError(f"checkpoint file {weights} is damaged: {problem}")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"checkpoint file {index} is damaged: not a weight index ({exc})") from None
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise ModelLoadError(f"checkpoint {path} is incomplete: {index.name} lists {', '.join(missing)}, "
                                 "which are missing")


def check_tokenizer_files(directory: str | os.PathLike) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        file = Path(directory) / name
        if file.is_file():
            try:
                json.loads(file.read_text())
            except (ValueError, UnicodeDecodeError) as exc:
                raise ModelLoadError(f"tokenizer file {file} is damaged: not valid JSON ({exc})") from None


def safetensors_header(file: Path) -> dict:
    """The JSON header of a safetensors file (ValueError if the length it claims is impossible)."""
    size = Path(file).stat().st_size
    with open(file, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8:
            raise ValueError(f"header claims {header_len} bytes, the file has {size}")
        return json.loads(f.read(header_len))


def _safetensors_problem(file: Path) -> str | None:
    size = file.stat().st_size
    if size < 8:
        return f"{size} bytes, too short for a safetensors header"
    with open(file, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8:
            return f"its header claims {header_len} bytes but the file has {size}"
        try:
            header = json.loads(f.read(header_len))
        except ValueError:
            return "its header is not valid JSON"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        return f"truncated: {size} bytes, its header needs {8 + header_len + end}"
    return None


# -- leftovers of dead processes -------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def session_folder() -> str:
    """A temporary folder for this process's offloaded weights, named so a later run can tell if its owner died."""
    return tempfile.mkdtemp(prefix=f"{SESSION_PREFIX}{os.getpid()}-")


def sweep_dead_sessions(parent: str | None = None) -> list[str]:
    """Remove session folders whose process is gone (a crashed xdist worker, a killed run)."""
    parent = parent or tempfile.gettempdir()
    removed = []
    try:
        entries = os.listdir(parent)
    except OSError:
        return removed
    for entry in entries:
        if not entry.startswith(SESSION_PREFIX):
            continue
        pid_text = entry[len(SESSION_PREFIX):].split("-", 1)[0]
        if pid_text.isdigit() and not pid_alive(int(pid_text)):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
            removed.append(entry)
    return removed


def sweep_dead_staging(parent: Path) -> list[str]:
    """Remove built-in checkpoints half-written by processes that died (``.NAME-PID-xxxx``)."""
    removed = []
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        if not entry.name.startswith("."):
            continue
        parts = entry.name[1:].rsplit("-", 2)
        if len(parts) == 3 and parts[1].isdigit() and not pid_alive(int(parts[1])):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    return removed


# -- the hub -----------------------------------------------------------------------------------------

_hub_state: dict[str, tuple[bool, str]] = {}
_hub_lock = threading.Lock()


def hub_reachable(timeout: float = 3.0) -> tuple[bool, str]:
    """Whether the hub endpoint answers a TCP connection, asked once per process.

    huggingface_hub retries an unreachable host five times with backoff (~25 s); one quick probe lets
    the first cell fail fast, and every later cell reuses the answer.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False, "HF_HUB_OFFLINE is set"
    endpoint = constants.ENDPOINT
    with _hub_lock:
        if endpoint not in _hub_state:
            try:
                parts = urlsplit(endpoint)
                port = parts.port or (443 if parts.scheme == "https" else 80)
                if parts.scheme not in ("http", "https") or not parts.hostname:
                    raise ValueError("not an http(s) URL with a host")
            except ValueError as exc:
                raise ModelLoadError(
                    f"invalid HF_ENDPOINT {endpoint!r}: {exc}; expected a URL such as https://huggingface.co"
                ) from None
            start = time.perf_counter()
            try:
                socket.create_connection((parts.hostname, port), timeout=timeout).close()
                _hub_state[endpoint] = (True, "")
            except OSError as exc:
                _hub_state[endpoint] = (False, f"{parts.hostname} unreachable after "
                                               f"{time.perf_counter() - start:.1f} s: {exc.strerror or exc}")
        return _hub_state[endpoint]
