"""One parser and one formatter for memory sizes, used everywhere sizes appear."""

from __future__ import annotations

import re

from .errors import LLMLoadUsageError

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")
ACCEPTED = "a number of bytes or a number with a unit, e.g. '24GiB', '500 MB' (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"


def parse_size(value: int | float | str) -> int:
    """Return the number of bytes in ``value``: an int, or a string such as ``"24 GiB"`` or ``"500MB"``.

    Units follow transformers' ``max_memory`` convention: ``GB`` is 10**9 bytes, ``GiB`` is 2**30.
    """
    if isinstance(value, bool):
        raise LLMLoadUsageError(f"invalid size {value!r}: expected {ACCEPTED}")
    if isinstance(value, (int, float)):
        if value < 0 or value != value:
            raise LLMLoadUsageError(f"invalid size {value!r}: a size cannot be negative")
        return int(value)
    if not isinstance(value, str):
        raise LLMLoadUsageError(f"invalid size {value!r}: expected {ACCEPTED}")
    match = _SIZE_RE.match(value)
    if not match or match.group(2).lower() not in _UNITS:
        raise LLMLoadUsageError(f"invalid size {value!r}: expected {ACCEPTED}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_size(num_bytes: int | float) -> str:
    """``format_size(25769803776) == "24.0 GiB"``: binary units, one decimal."""
    size = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
