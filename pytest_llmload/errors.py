"""Errors a user can cause. Each carries one line that names the bad value and what is accepted."""

from __future__ import annotations


class LLMLoadError(Exception):
    """Base class of every error pytest-llmload raises on purpose."""


class LLMLoadUsageError(LLMLoadError, ValueError):
    """A value given by the user (an option, a marker argument, a function argument) is malformed."""


class ModelLoadError(LLMLoadError, RuntimeError):
    """A model or tokenizer could not be loaded; the message says which file or id and why."""


class LLMLoadLeakWarning(UserWarning):
    """A model the plugin loaded was not collected, or did not give its GPU memory back, when released
    (``--llm-leak-check``; under ``--llm-require-gpus`` it is a failure instead)."""


class GoldenDeviceClassWarning(UserWarning):
    """A golden output was compared with the one recorded for another device class, since none was recorded
    for this run's (``assert_matches_golden``, ``llm_golden``); the message names both classes."""
