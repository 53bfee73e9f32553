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
    sys.modules["pytest"].register_assert_rewrite("pytest_llmload.assertions", "pytest_llmload._checks")

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "loading",
    "prepare_load": "loading",
    "LoadCall": "loading",
    "load_tokenizer": "loading",
    "load_config": "loading",
    "effective_device_map": "loading",
    "input_device": "devices",
    "parse_size": "sizes",
    "format_size": "sizes",
    "LLMSpec": "specs",
    "make_spec": "specs",
    "PRECISIONS": "specs",
    "STRATEGIES": "specs",
    "BUILTIN_MODELS": "builtin",
    "builtin_path": "builtin",
    "ModelCache": "cache",
    "Inventory": "hardware",
    "GPU": "hardware",
    "probe_inventory": "hardware",
    "gpu_reasons": "hardware",
    "cell_reasons": "hardware",
    "validate_device_map": "validation",
    "assert_device_map": "assertions",
    "device_hops": "devices",
    "assert_memory_footprint": "assertions",
    "expected_footprint": "assertions",
    "Footprint": "assertions",
    "module_footprints": "assertions",
    "assert_int8_trainable": "assertions",
    "assert_outputs_close": "assertions",
    "default_inputs": "assertions",
    "prepare_model_for_int8_training": "assertions",
    "plan_device_map": "planning",
    "estimate_training_memory": "estimate",
    "track_memory": "memory",
    "DevicePlan": "planning",
    "parse_fleet": "planning",
    "LLMLoadError": "errors",
    "LLMLoadUsageError": "errors",
    "ModelLoadError": "errors",
    "virtual_gpus": "virtual",
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
