"""What pytest-llmload knows about its dependencies' versions, in one place: one module per dependency.

Every use of a version-specific or private API of torch, transformers, accelerate, bitsandbytes or peft
goes through ``compat.<dependency>``. What is needed is detected (is the internal there, does the
function take that argument), not inferred from a version number; where an internal is missing the
caller gets one line that names it, the version found and the versions CI tested (:data:`TESTED`).

:data:`TESTED` is data, as Lightning keeps its version checks: the range each dependency was proved
on by CI (README "Tested with" shows the same table; a test keeps the two equal). Nothing here
imports torch or transformers at import time.
"""

from __future__ import annotations

import importlib.metadata

from pytest_llmload.errors import LLMLoadUsageError

# dependency -> (oldest, newest) version tested: the floors job and today's resolution (torch: 2.13.0 in both
# jobs; 2.14.1 in a separate run of the fleet suite; 2.11.0 on a GPU machine: the examples, the GPU,
# hardware and fleet tests). README's "Tested with" table shows the same.
TESTED: dict[str, tuple[str, str]] = {
    "torch": ("2.11.0", "2.14.1"),
    "transformers": ("5.17.0", "5.25.0"),
    "accelerate": ("1.15.0", "1.16.0"),
    "bitsandbytes": ("0.50.0", "0.50.2"),
    "peft": ("0.21.0", "0.21.2"),
    "kernels": ("0.19.1", "0.19.1"),
}


class MissingInternalError(LLMLoadUsageError):
    """A dependency lacks an internal pytest-llmload relies on (one line: which, in which version)."""


def installed(dependency: str) -> str | None:
    """The installed version of ``dependency`` (a distribution name), or None."""
    try:
        return importlib.metadata.version(dependency)
    except importlib.metadata.PackageNotFoundError:
        return None


def tested(dependency: str) -> str:
    low, high = TESTED[dependency]
    return low if low == high else f"{low} to {high}"


def missing_internal(feature: str, dependency: str, name: str) -> MissingInternalError:
    """``<who needs> <name>, which <dependency> X lacks (tested: ...)``, e.g. ``virtual GPUs need torch._C.x``."""
    version = installed(dependency) or "(not installed)"
    return MissingInternalError(
        f"{feature} {name}, which {dependency} {version} lacks (tested: {dependency} {tested(dependency)})"
    )


def resolve(dotted: str):
    """The object at ``dotted`` (``package.module.attr.attr``), importing modules as needed; None if absent."""
    found = _lookup(dotted)
    return None if found is _ABSENT else found


def exists(dotted: str) -> bool:
    """Whether ``dotted`` names something (its value may be None)."""
    return _lookup(dotted) is not _ABSENT


def _lookup(dotted: str):
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr, _ABSENT)
            if obj is _ABSENT:
                return _ABSENT
        return obj
    return _ABSENT


_ABSENT = object()
