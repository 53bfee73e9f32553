"""Loads that make no noise that is not the user's: no progress bars, no import warnings of
bitsandbytes, and transformers' load report as a warning of the test instead of raw stderr."""

from __future__ import annotations

import warnings
from contextlib import contextmanager


@contextmanager
def quiet_loading():
    """No "Loading weights" progress bars in every captured stderr, and no deprecation noise from
    importing bitsandbytes (pytest-llmload chooses when that import happens, so it keeps it quiet)."""
    import logging

    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    catcher = _LoadReportCatcher()
    handlers = logging.getLogger("transformers").handlers
    for handler in handlers:
        handler.addFilter(catcher)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.script_method.*", category=DeprecationWarning)
            yield
    finally:
        for handler in handlers:
            handler.removeFilter(catcher)
        if bars:
            hf_logging.enable_progress_bar()
    for report in catcher.reports:  # in the test's warnings, not on a worker's raw stderr after the summary
        warnings.warn(report, UserWarning, stacklevel=3)


class _LoadReportCatcher:
    """A logging filter that takes transformers' LOAD REPORT (missing/unexpected keys) off the stream."""

    def __init__(self) -> None:
        self.reports: list[str] = []

    def filter(self, record) -> bool:
        message = record.getMessage()
        if "LOAD REPORT" not in message:
            return True
        import re

        self.reports.append("transformers: " + re.sub(r"\x1b\[[0-9;]*m", "", message).strip())
        return False
