"""One parser and one formatter for memory sizes, used everywhere sizes appear."""

from __future__ import annotations

import math
import re
import reprlib

from pytest_llmload.errors import LLMLoadUsageError

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
_REPR = reprlib.Repr()  # a 400-digit typo is shown as its start, not in full
_REPR.maxstring = _REPR.maxother = 40
# No machine has 8 EiB of memory; larger values (or inf, from a float string with 400 digits) are typos.
MAX_SIZE = 2**63 - 1
ACCEPTED = "a number of bytes or a number with a unit, e.g. '24GiB', '500 MB' (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"


def parse_size(value: int | float | str) -> int:
    """Return the number of bytes in ``value``: an int, or a string such as ``"24 GiB"`` or ``"500MB"``.

    Units follow transformers' ``max_memory`` convention: ``GB`` is 10**9 bytes, ``GiB`` is 2**30.
    """
    if isinstance(value, bool):
        raise LLMLoadUsageError(f"invalid size {_REPR.repr(value)}: expected {ACCEPTED}")
    if isinstance(value, (int, float)):
        return _checked(value, value)
    if not isinstance(value, str):
        raise LLMLoadUsageError(f"invalid size {_REPR.repr(value)}: expected {ACCEPTED}")
    match = _SIZE_RE.match(value)
    if not match or match.group(2).lower() not in _UNITS:
        raise LLMLoadUsageError(f"invalid size {_REPR.repr(value)}: expected {ACCEPTED}")
    return _checked(value, float(match.group(1)) * _UNITS[match.group(2).lower()])


def _checked(value: int | float | str, num_bytes: int | float) -> int:
    """``num_bytes`` as an int, refused (naming ``value``) when negative, nan, infinite or over 8 EiB."""
    if isinstance(num_bytes, float) and math.isnan(num_bytes):
        raise LLMLoadUsageError(f"invalid size {_REPR.repr(value)}: not a number; expected {ACCEPTED}")
    if num_bytes < 0:
        raise LLMLoadUsageError(f"invalid size {_REPR.repr(value)}: a size cannot be negative")
    if num_bytes > MAX_SIZE:
        raise LLMLoadUsageError(f"invalid size {_REPR.repr(value)}: larger than any memory "
                                f"(at most {MAX_SIZE} bytes, 8 EiB); expected {ACCEPTED}")
    return int(num_bytes)


def format_size(num_bytes: int | float) -> str:
    """``format_size(25769803776) == "24.0 GiB"``: binary units, one decimal."""
    size = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
