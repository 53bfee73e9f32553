"""The numbers users write, parsed in one place: whole numbers (counts, indices), memory sizes, and card
specs (``NxSIZE[@MAJOR.MINOR]``, the one grammar of ``--llm-virtual-gpus``, ``--llm-coverage`` and
``llmload plan --gpus``). Digits are ASCII only: ``'٣'`` and ``'²'`` (which ``str.isdigit`` and ``\\d``
accept) are refused everywhere."""

from __future__ import annotations

import math
import re
import reprlib
from dataclasses import dataclass
from typing import Any

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
_SIZE_RE = re.compile(r"^[ \t]*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)[ \t]*([a-zA-Z]*)[ \t]*$")
_REPR = reprlib.Repr()  # a 400-digit typo is shown as its start, not in full
_REPR.maxstring = _REPR.maxother = 40
# No machine has 8 EiB of memory; larger values (or inf, from a float string with 400 digits) are typos.
MAX_SIZE = 2**63 - 1
ACCEPTED = "a number of bytes or a number with a unit, e.g. '24GiB', '500 MB' (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"


def is_whole_number(text: Any) -> bool:
    """ASCII digits only: ``"2"`` yes; ``"²"`` and ``"٣"`` (which ``str.isdigit`` accepts) no."""
    return isinstance(text, str) and re.fullmatch(r"[0-9]+", text) is not None


def parse_count(value: Any, option: str, *, minimum: int = 0, maximum: int | None = None,
                accepted: str | None = None) -> int:
    """The one parser of whole numbers users write (counts, indices): ASCII digits, within the bounds."""
    if accepted is None:
        accepted = f"a whole number >= {minimum}" if maximum is None else f"a whole number from {minimum} to {maximum}"
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and is_whole_number(value.strip()) and len(value.strip()) <= 30:
        number = int(value.strip())
    else:
        raise LLMLoadUsageError(f"invalid {option} value {_REPR.repr(value)}: expected {accepted}")
    if number < minimum or (maximum is not None and number > maximum):
        raise LLMLoadUsageError(f"invalid {option} value {_REPR.repr(value)}: expected {accepted}")
    return number


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


# -- card specs ------------------------------------------------------------------------------------------
# More cards than any node or test fleet has; every card list is bounded here before it is built.
MAX_CARDS = 4096
# A card larger than this is a typo (the largest GPUs hold well under 1 TiB).
MAX_CARD_SIZE = 2**50
CARDS_ACCEPTED = ("NxSIZE[@MAJOR.MINOR] such as '2x24GiB' or '2x80GiB@9.0', or sizes of unequal cards such as "
                  "'24GiB,16GiB' (ASCII digits; at most 4096 cards)")
_ITEM_RE = re.compile(r"^[ \t]*(?:(?P<count>[^xX@]*?)[ \t]*[xX](?![a-zA-Z]))?[ \t]*(?P<size>[^@]*?)[ \t]*"
                      r"(?:@(?P<capability>[^@]*))?$")
_CAPABILITY_RE = re.compile(r"[ \t]*([0-9]{1,2})\.([0-9])[ \t]*")


@dataclass(frozen=True)
class CardGroup:
    """``count`` cards of ``size`` bytes, with the compute capability written after ``@`` (or None)."""

    count: int
    size: int
    capability: tuple[int, int] | None = None


def parse_cards(text: Any, what: str, *, max_cards: int = MAX_CARDS, accepted: str = CARDS_ACCEPTED) -> list[CardGroup]:
    """``"2x24GiB"``, ``"24GiB,16GiB"``, ``"2x80GiB@9.0"`` -> one :class:`CardGroup` per comma-separated item.

    The one card-spec parser: ``what`` names the value in errors (``"--llm-virtual-gpus value"``). The
    total count is checked against ``max_cards`` before anything is built.
    """
    if not isinstance(text, str) or not text.strip():
        raise LLMLoadUsageError(f"invalid {what} {_REPR.repr(text)}: expected {accepted}")
    groups: list[CardGroup] = []
    total = 0
    for item in text.split(","):
        match = _ITEM_RE.match(item)
        if not item.strip() or match is None or not match.group("size"):
            which = "" if item.strip() == text.strip() else f"{_REPR.repr(item.strip())} is not "
            raise LLMLoadUsageError(f"invalid {what} {_REPR.repr(text)}: {which or 'expected '}{accepted}")
        count_text = match.group("count")
        if count_text is None:
            count = 1
        elif is_whole_number(count_text) and len(count_text) <= 30 and int(count_text) >= 1:
            count = int(count_text)
        else:
            raise LLMLoadUsageError(f"invalid {what} {_REPR.repr(text)}: card count {_REPR.repr(count_text)} is not "
                                    f"a whole number from 1 to {max_cards}")
        total += count
        if total > max_cards:
            raise LLMLoadUsageError(f"invalid {what} {_REPR.repr(text)}: {_REPR.repr(total)} cards; a fleet has at "
                                    f"most {max_cards}")
        try:
            size = parse_size(match.group("size"))
        except LLMLoadUsageError as exc:
            reason = str(exc).split(": ", 1)[1] if "larger than any memory" in str(exc) else f"expected {ACCEPTED}"
            raise LLMLoadUsageError(f"invalid {what} {_REPR.repr(text)}: card size "
                                    f"{_REPR.repr(match.group('size'))}: {reason}") from None
        if size < 1:
            raise LLMLoadUsageError(f"invalid {what} {_REPR.repr(text)}: a card needs more than 0 bytes")
        if size > MAX_CARD_SIZE:
            raise LLMLoadUsageError(f"invalid {what} {_REPR.repr(text)}: card size {_REPR.repr(match.group('size'))} "
                                    f"is larger than any GPU's memory (at most {format_size(MAX_CARD_SIZE)})")
        capability = None
        if match.group("capability") is not None:
            cap = _CAPABILITY_RE.fullmatch(match.group("capability"))
            if cap is None:
                raise LLMLoadUsageError(
                    f"invalid compute capability {_REPR.repr(match.group('capability'))} in {what} "
                    f"{_REPR.repr(text)}: expected MAJOR.MINOR such as '8.0' or '9.0'")
            capability = (int(cap.group(1)), int(cap.group(2)))
        groups.append(CardGroup(count, size, capability))
    return groups


def card_sizes(groups: list[CardGroup]) -> list[int]:
    """One size per card."""
    return [group.size for group in groups for _ in range(group.count)]
