"""Assertions on loaded models that find the bugs users hit, and say what is wrong in plain words.

A facade over one private module per domain (``pytest_llmload._internal.checks``): placement, footprint,
k-bit training, outputs, and golden outputs (``session/goldens.py``: they need the running test).
Registered for pytest's assertion rewriting by ``pytest_llmload/__init__.py``.
"""

from __future__ import annotations

from pytest_llmload._internal.checks.common import as_batch, default_inputs
from pytest_llmload._internal.checks.footprint import (
    Footprint,
    assert_memory_footprint,
    expected_footprint,
    footprint_message,
    module_footprints,
)
from pytest_llmload._internal.checks.outputs import RELATIVE_TOLERANCE, assert_outputs_close, model_precision
from pytest_llmload._internal.checks.placement import assert_device_map
from pytest_llmload._internal.checks.training import assert_int8_trainable, prepare_model_for_int8_training
from pytest_llmload._internal.planning.devices import device_hops
from pytest_llmload._internal.session.goldens import assert_matches_golden

__all__ = [
    "RELATIVE_TOLERANCE", "Footprint", "as_batch", "assert_device_map",
    "assert_int8_trainable", "assert_matches_golden", "assert_memory_footprint", "assert_outputs_close",
    "default_inputs", "device_hops", "expected_footprint", "footprint_message", "model_precision",
    "module_footprints", "prepare_model_for_int8_training",
]
