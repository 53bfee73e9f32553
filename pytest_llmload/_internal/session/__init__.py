"""The pytest session's objects: matrix, gating, runners, report, baseline, limits."""

from __future__ import annotations

import pytest

SESSION_KEY = pytest.StashKey["object"]()  # the LLMLoadSession (state.py), set in pytest_configure; its one owner
