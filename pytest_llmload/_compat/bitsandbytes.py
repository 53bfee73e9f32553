"""bitsandbytes: imported quietly and hermetically, when pytest-llmload chooses."""

from __future__ import annotations

import contextlib
import importlib.util
import sys


class HubKernelRefused(RuntimeError):
    """What ``kernels.get_kernel`` raises while pytest-llmload keeps a step hermetic."""


@contextlib.contextmanager
def no_hub_kernels():
    """``kernels.get_kernel`` refuses (instead of asking the Hub) for the duration.

    bitsandbytes >= 0.50 asks the Hub for ``kernels-community/quantization-bitsandbytes`` when it is
    imported on a CPU with AVX512-BF16; refused, it uses its own CPU kernels (it says so at warning level).
    """
    if "kernels" not in sys.modules and importlib.util.find_spec("kernels") is None:
        yield
        return
    import kernels

    real = kernels.get_kernel

    def refuse(repo_id, *args, **kwargs):
        raise HubKernelRefused(f"hub kernel {repo_id!r} not fetched: pytest-llmload keeps loads hermetic "
                               "(--llm-hub-kernels asks for hub kernels)")

    kernels.get_kernel = refuse
    try:
        yield
    finally:
        kernels.get_kernel = real


def import_bitsandbytes(*, hub_kernels: bool = False):
    """Import bitsandbytes without the noise its import makes (torch.jit deprecation warnings, the
    kernels-community warning) and, unless ``hub_kernels``, without asking the Hub for a kernel. The
    first import in a process decides: bitsandbytes picks its kernels once."""
    import logging
    import warnings

    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"]
    logger = logging.getLogger("bitsandbytes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), (contextlib.nullcontext() if hub_kernels else no_hub_kernels()):
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            import bitsandbytes
    finally:
        logger.setLevel(level)
    return bitsandbytes
