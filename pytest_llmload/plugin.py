"""pytest hooks only: options, ini keys, markers, and the session manager that does the work.

Nothing here imports torch or transformers: a suite that never asks for an llm fixture pays nothing.
"""

from __future__ import annotations

import pytest

from .fixtures import (  # noqa: F401
    gpu_inventory,
    llm_load,
    llm_memory,
    llm_model,
    llm_private_model,
    llm_spec,
    llm_tokenizer,
)
from .session import SESSION_KEY, LLMLoadSession
from .virtual import pytest_support as virtual_support

MARKERS = (
    "llm(models=None, device_maps=None, precisions=None): this test's own matrix of models, "
    "device maps and precisions, instead of the command line's",
    "requires_gpus(n=1, *, memory=None): skip unless n visible GPUs, each with at least `memory` (e.g. '24 GiB')",
    "requires_bitsandbytes: skip unless bitsandbytes is installed and has a working backend here",
    "max_footprint(limit): fail if the llm_model the test used has a larger get_memory_footprint()",
    virtual_support.MARKER,
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("llmload", "language model loading (pytest-llmload)")

    def add(option: str, ini: str, help: str, *, ini_type: str = "string", default=None, **kwargs) -> None:
        group.addoption(option, dest=ini, help=help + f" [ini: {ini}]", **kwargs)
        parser.addini(ini, help, type=ini_type, default=default)

    add("--llm-model", "llm_models", "model: hub id, local directory or builtin:NAME (repeatable; "
        "default builtin:tiny-llama)", ini_type="linelist", action="append", metavar="ID")
    add("--llm-device-map", "llm_device_maps", "device map: auto, balanced, balanced_low_0, sequential, cpu, "
        "cuda, cuda:N, N, disk, process, a JSON object or @file.json (repeatable; default auto)",
        ini_type="linelist", action="append", metavar="MAP")
    add("--llm-precision", "llm_precisions", "precision: auto, fp32, fp16, bf16, int8, nf4, fp4 "
        "(repeatable; default auto = the checkpoint's dtype)", ini_type="linelist", action="append", metavar="P")
    add("--llm-max-memory", "llm_max_memory", "per-device budgets, e.g. 0=20GiB,1=20GiB,cpu=64GiB", metavar="SPEC")
    add("--llm-require-gpus", "llm_require_gpus", "GPU CI mode: a test skipped for missing hardware fails "
        "instead; with a count, the session fails at start-up with fewer visible GPUs",
        nargs="?", const="true", metavar="N")
    add("--llm-trust-remote-code", "llm_trust_remote_code", "allow checkpoints to run their own code "
        "(off by default)", ini_type="bool", default=False, action="store_const", const=True)
    add("--llm-allow-pickle", "llm_allow_pickle", "allow checkpoints that only have pickle weights "
        "(pytorch_model.bin); unpickling can run code", ini_type="bool", default=False,
        action="store_const", const=True)
    add("--llm-cache-size", "llm_cache_size", "how many loaded models the session keeps at once (default 2)",
        metavar="N")
    add("--llm-report", "llm_report", "write the load report as JSON to PATH", metavar="PATH")
    add("--llm-fit-margin", "llm_fit_margin", "share of free memory the fit check keeps spare before a load "
        "(default 0.1); 'off' disables the fit check", metavar="FRACTION")
    add("--llm-cuda-context", "llm_cuda_context", "memory a CUDA context takes per GPU, for the fit check "
        "(default: measured on the first GPU, 500MiB until then)", metavar="SIZE")
    add("--llm-footprint-baseline", "llm_footprint_baseline", "JSON file of each cell's footprint: recorded "
        "when missing, and a later run fails a cell whose footprint grew beyond the tolerance", metavar="PATH")
    add("--llm-footprint-tolerance", "llm_footprint_tolerance", "how much a footprint may grow over its "
        "baseline (default 0.05 = 5%)", metavar="FRACTION")
    add("--llm-gpus-per-worker", "llm_gpus_per_worker", "under pytest-xdist, give each worker its own K GPUs "
        "(disjoint slices of the visible ones)", metavar="K")
    add("--llm-virtual-gpus", "llm_virtual_gpus", "run the session on a virtual GPU fleet: CPU-backed cards "
        "with real values, e.g. 2x24GiB or 24GiB,16GiB@9.0", metavar="SPEC")


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config, parser: pytest.Parser, args: list[str]) -> None:
    """Give an xdist worker its own GPUs before any conftest (or test) can create a CUDA context."""
    value = early_config.known_args_namespace.llm_gpus_per_worker or early_config.getini("llm_gpus_per_worker")
    if not value:
        return
    import os

    from .errors import LLMLoadUsageError
    from .hardware import assign_worker_gpus

    if not str(value).strip().isdigit() or int(value) < 1:
        raise pytest.UsageError(f"invalid --llm-gpus-per-worker value {value!r}: expected a whole number >= 1")
    virtual_cards = virtual_support.spec_card_count(
        early_config.known_args_namespace.llm_virtual_gpus or early_config.getini("llm_virtual_gpus"))
    try:
        note = assign_worker_gpus(os.environ.get("PYTEST_XDIST_WORKER"), int(value), virtual_cards=virtual_cards)
    except LLMLoadUsageError as exc:
        raise pytest.UsageError(str(exc)) from None
    if note:
        os.environ["LLMLOAD_WORKER_GPUS_NOTE"] = note


def pytest_configure(config: pytest.Config) -> None:
    for marker in MARKERS:
        config.addinivalue_line("markers", marker)
    virtual_support.start_session_fleet(config)  # first: the session's inventory is the fleet's
    config.pluginmanager.register(virtual_support.VirtualGpusMarker(), "llmload-virtual-gpus")
    manager = LLMLoadSession.from_config(config)
    config.stash[SESSION_KEY] = manager
    config.pluginmanager.register(manager, "llmload-session")


def pytest_unconfigure(config: pytest.Config) -> None:
    manager = config.stash.get(SESSION_KEY, None)
    if manager is not None:
        manager.close()
        config.pluginmanager.unregister(manager)
        del config.stash[SESSION_KEY]
    virtual_support.stop_session_fleet(config)
