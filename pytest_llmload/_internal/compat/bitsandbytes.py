"""bitsandbytes: imported quietly and hermetically, when pytest-llmload chooses."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import threading

_lock = threading.Lock()
# Whether the (first) import of bitsandbytes may ask the Hub for a kernel: the session sets it from
# --llm-hub-kernels before anything imports bitsandbytes (probes, fleets, loads all import it through here).
_allow_hub_kernels = [False]


def allow_hub_kernels(allowed: bool) -> None:
    """The session's ``--llm-hub-kernels``: whether importing bitsandbytes may fetch hub kernels."""
    _allow_hub_kernels[0] = bool(allowed)


class HubKernelRefused(RuntimeError):
    """What ``kernels.get_kernel`` raises while pytest-llmload keeps a step hermetic."""


_refusing: set[int] = set()  # threads in no_hub_kernels()
_real_get_kernel: list = []
_guard = threading.Lock()


def _refuse_in_refusing_threads(repo_id, *args, **kwargs):
    if threading.get_ident() in _refusing:
        raise HubKernelRefused(f"hub kernel {repo_id!r} not fetched: pytest-llmload keeps loads hermetic "
                               "(--llm-hub-kernels asks for hub kernels)")
    return _real_get_kernel[0](repo_id, *args, **kwargs)


@contextlib.contextmanager
def no_hub_kernels():
    """``kernels.get_kernel`` refuses (instead of asking the Hub) in this thread, for the duration.

    bitsandbytes >= 0.50 asks the Hub for ``kernels-community/quantization-bitsandbytes`` when it is
    imported on a CPU with AVX512-BF16; refused, it uses its own CPU kernels (it says so at warning level).
    Other threads keep the real ``get_kernel``; overlapping uses (several threads) restore it when the
    last one ends; a ``kernels`` that cannot be imported is left alone (bitsandbytes treats it as optional).
    """
    try:
        if "kernels" not in sys.modules and importlib.util.find_spec("kernels") is None:
            yield
            return
        import kernels
    except Exception:  # noqa: BLE001 - a broken kernels install: bitsandbytes copes with it itself
        yield
        return
    me = threading.get_ident()
    with _guard:
        if not _refusing:
            _real_get_kernel[:] = [kernels.get_kernel]
            kernels.get_kernel = _refuse_in_refusing_threads
        nested = me in _refusing
        _refusing.add(me)
    try:
        yield
    finally:
        with _guard:
            if not nested:
                _refusing.discard(me)
            if not _refusing:
                kernels.get_kernel = _real_get_kernel[0]


def import_bitsandbytes(*, hub_kernels: bool | None = None):
    """Import bitsandbytes without the noise its import makes (torch.jit deprecation warnings, the
    kernels-community warning) and, unless hub kernels are allowed (``hub_kernels``, else the session's
    ``--llm-hub-kernels``), without asking the Hub for a kernel. The first import in a process decides:
    bitsandbytes picks its kernels once. One thread imports at a time."""
    import logging
    import warnings

    if "bitsandbytes" in sys.modules and _lock.acquire(blocking=False):
        _lock.release()  # not being imported right now: the module is whole
        return sys.modules["bitsandbytes"]
    allowed = _allow_hub_kernels[0] if hub_kernels is None else hub_kernels
    with _lock:
        if "bitsandbytes" in sys.modules:
            return sys.modules["bitsandbytes"]
        logger = logging.getLogger("bitsandbytes")
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings(), (contextlib.nullcontext() if allowed else no_hub_kernels()):
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                warnings.filterwarnings("ignore", category=FutureWarning)
                import bitsandbytes
        finally:
            logger.setLevel(level)
    return bitsandbytes


# the logger of bitsandbytes' int8 matmul, which says "inputs will be cast" on every call from float32 inputs
_MATMUL_LOGGER = "bitsandbytes.autograd._functions"


@contextlib.contextmanager
def quiet_int8_matmul():
    """Our own forward/backward passes (assertions) run int8 layers without one "MatMul8bitLt: inputs will be
    cast" log record per layer per call (160 lines under ``-rA``); the user's own calls keep theirs."""
    import logging

    logger = logging.getLogger(_MATMUL_LOGGER)
    level = logger.level
    logger.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        logger.setLevel(level)
