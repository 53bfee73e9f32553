"""The ``virtual_gpus`` marker's hooks, registered in every run: the fleet code is imported only for a
test that has the marker (or a session on ``--llm-virtual-gpus``), so other runs pay nothing for it."""

from __future__ import annotations

import pytest


class FleetMarker:
    """Forwards to :class:`pytest_llmload._internal.virtual.pytest_support.VirtualGpusMarker` where it is needed."""

    def __init__(self) -> None:
        self._real = None

    def _marker(self, item: pytest.Item):
        if self._real is None and item.get_closest_marker("virtual_gpus") is not None:
            from pytest_llmload._internal.virtual.pytest_support import VirtualGpusMarker

            self._real = VirtualGpusMarker()
        return self._real

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_setup(self, item: pytest.Item):
        real = self._marker(item)
        if real is None:
            return (yield)
        return (yield from real.pytest_runtest_setup(item))

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_teardown(self, item: pytest.Item, nextitem):
        if self._real is None:
            return (yield)
        return (yield from self._real.pytest_runtest_teardown(item, nextitem))
