"""pytest-llmload: load Hugging Face models under device maps and precisions in your test suite.

The public API is re-exported here lazily: importing ``pytest_llmload`` (as pytest does for the
plugin) imports neither torch nor transformers; they load when a function that needs them is used.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

# Assertion rewriting matters only under pytest (which imports this package as a plugin, so pytest is
# already there); a script that only calls load_model does not pay for importing pytest.
if "pytest" in sys.modules:
    sys.modules["pytest"].register_assert_rewrite("pytest_llmload.assertions", "pytest_llmload._internal.checks")

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "_internal.loading.call",
    "prepare_load": "_internal.loading.call",
    "LoadCall": "_internal.loading.call",
    "load_tokenizer": "_internal.loading.files",
    "load_config": "_internal.loading.files",
    "effective_device_map": "_internal.loading.placement",
    "input_device": "_internal.planning.devices",
    "parse_size": "_internal.config.numbers",
    "format_size": "_internal.config.numbers",
    "LLMSpec": "_internal.config.specs",
    "make_spec": "_internal.config.specs",
    "PRECISIONS": "_internal.config.specs",
    "DEVICE_MAP_STRATEGIES": "_internal.config.specs",
    "STRATEGIES": "_internal.config.specs",  # the same tuple, by its older name
    "BUILTIN_MODELS": "_internal.loading.builtins",
    "builtin_path": "_internal.loading.builtins",
    "ModelCache": "_internal.loading.cache",
    "Inventory": "_internal.hardware",
    "GPU": "_internal.hardware",
    "probe_inventory": "_internal.hardware",
    "gpu_reasons": "_internal.hardware",
    "cell_reasons": "_internal.hardware",
    "validate_device_map": "_internal.planning.validation",
    "assert_device_map": "assertions",
    "device_hops": "_internal.planning.devices",
    "assert_memory_footprint": "assertions",
    "expected_footprint": "assertions",
    "Footprint": "assertions",
    "module_footprints": "assertions",
    "assert_int8_trainable": "assertions",
    "assert_outputs_close": "assertions",
    "assert_matches_golden": "assertions",
    "default_inputs": "assertions",
    "prepare_model_for_int8_training": "assertions",
    "plan_device_map": "_internal.planning.planner",
    "estimate_training_memory": "_internal.planning.training_memory",
    "track_memory": "_internal.planning.measure",
    "DevicePlan": "_internal.planning.planner",
    "parse_fleet": "_internal.planning.planner",
    "LLMLoadError": "errors",
    "LLMLoadUsageError": "errors",
    "LLMLoadLeakWarning": "errors",
    "GoldenDeviceClassWarning": "errors",
    "ModelLoadError": "errors",
    "virtual_gpus": "_internal.virtual",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pytest_llmload' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
