"""Faults a test plugin meets unattended: damaged or hostile files, an unreachable hub.

Folders this process owns (and leftovers of dead ones) are :mod:`pytest_llmload._internal.loading.ownership`'s.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import stat
import struct
import threading
import time
from itertools import accumulate
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from pytest_llmload.errors import ModelLoadError


MAX_SAFETENSORS_HEADER = 100_000_000  # the limit of the safetensors library itself
MAX_JSON_BYTES = 512 * 2**20  # the largest tokenizer.json files on the hub are tens of MB
MAX_JSON_DEPTH = 64  # real checkpoint and tokenizer files nest a handful of levels


class DamagedFile(ValueError):
    """A file that cannot be what its name says; the message says why, without the file's name."""


# -- reading files that may be damaged or hostile ------------------------------------------------------


def not_regular(path: str | os.PathLike) -> str | None:
    """What ``path`` is if it exists but is no regular file (a dangling symlink, a symlink loop, a directory,
    a FIFO, a device), else None.

    Symlinks to regular files are fine: a Hugging Face cache snapshot is made of them.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            return f"a dangling symlink (to {os.readlink(path)})"
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a symlink loop"
        return None  # unreadable for another reason: opening it says why
    return None if stat.S_ISREG(mode) else _kind(mode)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """Open a regular file for reading, refusing anything else without blocking (a FIFO opens at once
    with O_NONBLOCK and is then refused; a device is refused before it is opened)."""
    kind = not_regular(path)
    if kind is None and not os.path.lexists(path):
        raise DamagedFile("missing")
    if kind is not None:
        raise DamagedFile(f"{kind}, not a regular file")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):  # swapped after the stat above
            raise DamagedFile(f"{_kind(mode)}, not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*(?:"|\\?\Z)', re.S)  # linear: every way out matches
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


def json_depth(data: bytes) -> int:
    """How deep the arrays and objects of JSON text nest (strings ignored), without parsing it."""
    brackets = _JSON_STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    return max(accumulate(_STEP[b] for b in brackets), default=0)


def parse_json(data: bytes, max_depth: int = MAX_JSON_DEPTH, *, parse: bool = True) -> Any:
    """``json.loads`` for untrusted text: nesting is bounded first, so it cannot exhaust the stack."""
    depth = json_depth(data)
    if depth > max_depth:
        raise DamagedFile(f"nested {depth} levels deep (at most {max_depth} accepted)")
    if not parse:
        return None
    try:
        return json.loads(data)
    except ValueError as exc:  # UnicodeDecodeError is one
        raise DamagedFile(f"not valid JSON ({exc})") from None


def read_json(path: str | os.PathLike, max_bytes: int = MAX_JSON_BYTES, *, parse: bool = True) -> Any:
    """A JSON file's content, read only if it is a regular file of at most ``max_bytes`` (with ``parse=False``
    only these bounds are checked and None is returned)."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise DamagedFile(f"{size} bytes, more than the {max_bytes} accepted")
        data = f.read(max_bytes + 1)
    return parse_json(data, parse=parse)


def json_type(value: Any) -> str:
    for kind, name in ((bool, "a boolean"), (str, "a string"), ((int, float), "a number"), (list, "a list"),
                       (dict, "an object")):
        if isinstance(value, kind):
            return name
    return "null"


def require_regular(path: str | os.PathLike, what: str) -> None:
    """Raise :class:`ModelLoadError` if ``path`` exists but is no regular file (never opens it)."""
    kind = not_regular(path)
    if kind is not None:
        raise ModelLoadError(f"{what} {path} is {kind}, not a regular file")


def check_json_file(path: str | os.PathLike, what: str, *, parse: bool = True) -> None:
    """Raise :class:`ModelLoadError` naming ``path`` if it exists and is not sound, bounded JSON
    (with ``parse=False``, only if it is no regular file, too large or nested too deep)."""
    if not os.path.lexists(path):
        return
    require_regular(path, what)
    try:
        read_json(path, parse=parse)
    except DamagedFile as exc:
        raise ModelLoadError(f"{what} {path} is damaged: {exc}") from None
    except OSError as exc:
        raise ModelLoadError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


# -- damaged checkpoints ---------------------------------------------------------------------------

# Files from_pretrained may open (weights, configs, remote code) and files AutoTokenizer may open: any of
# them that is no regular file would hang the loader (a FIFO) or fail it deep inside (a dangling symlink).
_MODEL_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".py", ".json")
_TOKENIZER_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken", ".py")
_TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
_TOKENIZER_ONLY = (*_TOKENIZER_JSON, "vocab.json", "chat_template.json", "preprocessor_config.json")


def check_checkpoint_files(directory: str | os.PathLike) -> None:
    """Raise :class:`ModelLoadError` naming the file if a checkpoint file is damaged or no regular file.

    Reads only headers (a few KB), so a truncated multi-GB file is found without reading it.
    """
    path = Path(directory)
    entries = _entries(path, "checkpoint")
    for entry in entries:
        if entry.name.endswith(_MODEL_SUFFIXES) and entry.name not in _TOKENIZER_ONLY:
            require_regular(entry, "checkpoint file")
    for weights in (e for e in entries if e.name.endswith(".safetensors")):
        try:
            safetensors_header(weights)
        except DamagedFile as exc:
            raise ModelLoadError(f"checkpoint file {weights} is damaged: {exc}") from None
        except OSError as exc:
            raise ModelLoadError(f"cannot read checkpoint file {weights}: {exc.strerror or exc}") from None
    # Bounded, but parsed by transformers, which loads the model without a generation config it cannot read.
    check_json_file(path / "generation_config.json", "checkpoint file", parse=False)
    index = path / "model.safetensors.index.json"
    if os.path.lexists(index):
        _check_index(path, index)


def _check_index(path: Path, index: Path) -> None:
    try:
        content = read_json(index, max_bytes=64 * 2**20)
    except DamagedFile as exc:
        raise ModelLoadError(f"checkpoint file {index} is damaged: {exc}") from None
    except OSError as exc:
        raise ModelLoadError(f"cannot read checkpoint file {index}: {exc.strerror or exc}") from None
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict):
        found = "no weight_map" if weight_map is None else f"a weight_map that is {json_type(weight_map)}"
        raise ModelLoadError(f"checkpoint file {index} is damaged: {found}, "
                             "expected an object of tensor names to shard files")
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise ModelLoadError(f"checkpoint file {index} is damaged: its weight_map maps {_short(tensor)} to "
                                 f"{json_type(shard)}, not a shard file name")
        normal = os.path.normpath(shard)
        if os.path.isabs(shard) or os.path.splitdrive(shard)[0] or normal == ".." or normal.startswith(
                (".." + os.sep, "../")):
            raise ModelLoadError(f"checkpoint file {index} names shard {_short(shard)}, which is outside the "
                                 f"checkpoint folder {path}; shards must be files inside it")
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        require_regular(path / shard, "checkpoint file")
    missing = [s for s in shards if not (path / s).is_file()]
    if missing:
        raise ModelLoadError(f"checkpoint {path} is incomplete: {index.name} lists {', '.join(missing)}, "
                             "which are missing")


def _entries(path: Path, what: str) -> list[Path]:
    try:
        return sorted(path.iterdir())
    except OSError as exc:
        raise ModelLoadError(f"cannot list {what} {path}: {exc.strerror or exc}") from None


def check_tokenizer_files(directory: str | os.PathLike) -> None:
    path = Path(directory)
    for entry in _entries(path, "tokenizer folder"):
        if entry.name.endswith(_TOKENIZER_SUFFIXES):
            require_regular(entry, "tokenizer file")
    for name in _TOKENIZER_JSON:
        check_json_file(path / name, "tokenizer file")


def safetensors_header(file: str | os.PathLike) -> dict:
    """The JSON header of a safetensors file, checked: :class:`DamagedFile` (a ValueError) says what is wrong.

    Reads only a regular file, at most ``MAX_SAFETENSORS_HEADER`` bytes of header, nested a few levels.
    """
    with open_regular(file) as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise DamagedFile(f"{size} bytes, too short for a safetensors header")
        head = f.read(8)
        if len(head) < 8:  # shrunk since fstat
            raise DamagedFile(f"{len(head)} bytes, too short for a safetensors header")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise DamagedFile(f"its header claims {header_len} bytes but the file has {size}")
        if header_len > MAX_SAFETENSORS_HEADER:
            raise DamagedFile(f"its header claims {header_len} bytes, more than the {MAX_SAFETENSORS_HEADER} "
                              "safetensors accepts")
        raw = f.read(header_len)
        if len(raw) < header_len:
            raise DamagedFile(f"truncated: its header claims {header_len} bytes, {len(raw)} could be read")
    try:
        header = parse_json(raw)
    except DamagedFile as exc:
        raise DamagedFile(f"its header is {exc}") from None
    if not isinstance(header, dict):
        raise DamagedFile(f"its header is {json_type(header)}, not a JSON object")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict):
                raise DamagedFile(f"its __metadata__ is {json_type(entry)}, not an object")
            continue
        problem = _tensor_entry_problem(entry)
        if problem:
            raise DamagedFile(f"its header entry {_short(name)} {problem}")
        end = max(end, entry["data_offsets"][1])
    if 8 + header_len + end > size:
        raise DamagedFile(f"truncated: {size} bytes, its header needs {8 + header_len + end}")
    return header


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _tensor_entry_problem(entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return f"is {json_type(entry)}, not a tensor description"
    if not isinstance(entry.get("dtype"), str):
        return "has no dtype" if "dtype" not in entry else f"has a dtype that is {json_type(entry['dtype'])}"
    shape = entry.get("shape")
    if not (isinstance(shape, list) and all(_count(d) for d in shape)):
        return "has no shape" if shape is None else f"has shape {_short(shape)}, not a list of sizes"
    offsets = entry.get("data_offsets")
    if offsets is None:
        return "lacks data_offsets"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        return f"has data_offsets {_short(offsets)}, not [begin, end]"
    return None


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
