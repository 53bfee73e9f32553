from __future__ import annotations

import warnings

import pytest

# pytester's in-process runs restore sys.modules afterwards, and torch cannot be imported twice in
# one process: import the heavy stack once, here, so every in-process run shares it.
import torch  # noqa: E402,F401

from pytest_llmload._internal.hardware import import_bitsandbytes  # noqa: E402

import_bitsandbytes()  # quietly: its import warns about torch.jit and kernels-community
import transformers  # noqa: E402,F401

from hypothesis import HealthCheck, settings  # noqa: E402

pytest_plugins = ["pytester"]

# Property tests run with a fixed example count, derandomized, so CI time is bounded and repeatable.
settings.register_profile("llmload", max_examples=30, derandomize=True, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("llmload")


_OUTER_ENVIRONMENT = {k for k in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES")
                      if k in __import__("os").environ}


@pytest.fixture(autouse=True)
def _not_an_xdist_worker_for_nested_runs(monkeypatch):
    """When this suite runs under pytest-xdist, a pytest started by a test (pytester) must not inherit the
    outer worker's identity: it would take itself for worker gw0 and slice its GPUs as one."""
    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
        monkeypatch.delenv(name, raising=False)
    # Code under test sets the GPU visibility variables itself (a worker's slice): whatever a test leaves
    # there is undone, also where the variable was unset (monkeypatch.delenv records nothing then).
    import os

    for name in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"):
        monkeypatch.setenv(name, os.environ.get(name, ""))
        if os.environ[name] == "" and name not in _OUTER_ENVIRONMENT:
            monkeypatch.delenv(name)


@pytest.fixture
def offline_hub(monkeypatch):
    """The hub's offline mode, set in-process, so a hub id fails fast instead of retrying for ~25 s."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def isolated_tmp(monkeypatch, tmp_path):
    """Route tempfile's folders to a fresh directory, so a test can check that nothing is left behind."""
    import tempfile

    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def pytest_configure(config):
    warnings.filterwarnings("ignore", message="MatMul8bitLt", category=UserWarning)


def pytest_sessionstart(session):
    """Warm up: build the built-in checkpoints and import every lazily imported module once.

    transformers imports model and quantizer modules on first use; a pytester in-process run would
    drop them from sys.modules afterwards and the next run would see a second copy of their classes.
    """
    import importlib

    import peft  # noqa: F401
    from transformers.utils import logging as hf_logging

    # The plugin imports these on first need; imported first inside an in-process pytester run, they
    # would be dropped afterwards, and the next run would hold a second copy (a running fleet's state,
    # stash keys) beside the first.
    for module in ("session.affinity", "session.runners", "session.limits", "virtual.marker", "virtual",
                   "virtual.pytest_support", "distributed", "distributed.plugin", "planning.fit_check",
                   "session.baseline", "planning.validation", "planning.planner", "planning.reasons", "tables",
                   "loading.ownership", "loading.cache", "loading.call", "loading.files", "loading.placement", "loading.precision", "loading.quiet_logs",
                   "hardware"):
        importlib.import_module(f"pytest_llmload._internal.{module}")

    from pytest_llmload import load_model, load_tokenizer
    from pytest_llmload import BUILTIN_MODELS

    import warnings

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message="transformers: .*LOAD REPORT", category=UserWarning)
    for name in BUILTIN_MODELS:
        load_model(f"builtin:{name}", device_map="cpu")
        load_tokenizer(f"builtin:{name}")
    for precision in ("int8", "nf4"):
        load_model("builtin:tiny-llama", device_map="cpu", precision=precision)
    load_model("builtin:tiny-bert", model_class="AutoModelForSequenceClassification")
    hf_logging.enable_progress_bar()


@pytest.fixture
def no_gpus(monkeypatch):
    """This process (and its children) sees no GPU, whatever the machine has: ``CUDA_VISIBLE_DEVICES=""``."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
