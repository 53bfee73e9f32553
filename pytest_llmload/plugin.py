"""pytest hooks only: options, ini keys, markers, and the plugin objects that do the work.

Nothing here imports torch or transformers: a suite that never asks for an llm fixture pays nothing.
"""

from __future__ import annotations

import pytest

from pytest_llmload.fixtures import (  # noqa: F401
    SESSION_KEY,
    gpu_inventory,
    llm_dist,
    llm_golden,
    llm_load,
    llm_memory,
    llm_model,
    llm_private_model,
    llm_spec,
    llm_tokenizer,
)


def pytest_addoption(parser: pytest.Parser) -> None:
    from pytest_llmload._internal.config.options import add_options

    add_options(parser)


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config, parser: pytest.Parser, args: list[str]) -> None:
    """Give an xdist worker its own GPUs before any conftest (or test) can create a CUDA context."""
    value = early_config.known_args_namespace.llm_gpus_per_worker or early_config.getini("llm_gpus_per_worker")
    if not value:
        return
    import os

    from pytest_llmload.errors import LLMLoadUsageError
    from pytest_llmload._internal.hardware import assign_worker_gpus
    from pytest_llmload._internal.config.numbers import parse_count
    from pytest_llmload._internal.config.options import WORKER_NOTE, read_virtual_gpus

    try:
        fleet = read_virtual_gpus(early_config, early=True)
        virtual_cards = len(fleet.cards) if fleet is not None else None
        per_worker = parse_count(value, "--llm-gpus-per-worker", minimum=1)
        note = assign_worker_gpus(os.environ.get("PYTEST_XDIST_WORKER"), per_worker, virtual_cards=virtual_cards)
    except LLMLoadUsageError as exc:
        raise pytest.UsageError(str(exc)) from None
    if note:
        early_config.stash[WORKER_NOTE] = note  # the header's line (session/gating.py)


def pytest_configure(config: pytest.Config) -> None:
    import os

    from pytest_llmload._internal.config.marks import help_lines
    from pytest_llmload._internal.session.state import LLMLoadSession

    for line in help_lines():
        config.addinivalue_line("markers", line)
    if config.getoption("llm_hub_kernels", None) or config.getini("llm_hub_kernels"):
        from pytest_llmload._internal.compat.bitsandbytes import allow_hub_kernels

        allow_hub_kernels(True)  # before a fleet or a probe imports bitsandbytes (the first import decides)
    from pytest_llmload._internal.config.options import read_virtual_gpus
    from pytest_llmload.errors import LLMLoadUsageError

    try:
        fleet = read_virtual_gpus(config)
    except LLMLoadUsageError as exc:
        raise pytest.UsageError(str(exc)) from None
    if fleet is not None:
        from pytest_llmload._internal.virtual import pytest_support as virtual_support

        virtual_support.start_session_fleet(config, fleet)  # first: the session's inventory is the fleet's
    from pytest_llmload._internal.virtual.marker import FleetMarker

    config.pluginmanager.register(FleetMarker(), "llmload-virtual-gpus")
    manager = LLMLoadSession.from_config(config)
    config.stash[SESSION_KEY] = manager
    for name, plugin in manager.plugins.items():
        config.pluginmanager.register(plugin, name)
    if os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1"):  # under torchrun / accelerate launch
        manager.need("launched")


def pytest_unconfigure(config: pytest.Config) -> None:
    import sys

    hermetic = sys.modules.get("pytest_llmload._internal.compat.bitsandbytes")
    if hermetic is not None:
        hermetic.allow_hub_kernels(False)
    manager = config.stash.get(SESSION_KEY, None)
    if manager is not None:
        manager.close()
        for plugin in manager.plugins.values():
            config.pluginmanager.unregister(plugin)
        del config.stash[SESSION_KEY]
    marker = config.pluginmanager.get_plugin("llmload-virtual-gpus")
    if marker is not None:
        config.pluginmanager.unregister(marker)
    virtual_support = sys.modules.get("pytest_llmload._internal.virtual.pytest_support")  # imported when a fleet started
    if virtual_support is not None:
        virtual_support.stop_session_fleet(config)
