"""The fleet in a pytest run: ``--llm-virtual-gpus=SPEC`` for the whole session, and
``@pytest.mark.virtual_gpus(SPEC)`` for one test. torch is imported only when one of them is used."""

from __future__ import annotations

import pytest

from ..errors import LLMLoadUsageError

OPTION = "llm_virtual_gpus"
_SESSION_FLEET = pytest.StashKey[object]()
_TEST_FLEET = pytest.StashKey[object]()


def session_spec(config: pytest.Config) -> str | None:
    value = config.getoption(OPTION, None) or config.getini(OPTION)
    return str(value).strip() or None if value else None


def spec_card_count(value: str | None) -> int | None:
    """How many cards a spec names (for xdist GPU slices before the fleet starts); None without a spec."""
    if not value:
        return None
    from .fleet import parse_virtual_spec

    try:
        return len(parse_virtual_spec(value))
    except LLMLoadUsageError as exc:
        raise pytest.UsageError(f"--llm-virtual-gpus: {exc}") from None


def start_session_fleet(config: pytest.Config) -> None:
    """Enter the session's fleet (before the session reads the inventory); a bad spec is a UsageError."""
    spec = session_spec(config)
    if spec is None:
        return
    from . import virtual_gpus

    try:
        fleet = virtual_gpus(spec)
        fleet.__enter__()
    except LLMLoadUsageError as exc:
        raise pytest.UsageError(f"--llm-virtual-gpus: {exc}") from None
    config.stash[_SESSION_FLEET] = fleet


def stop_session_fleet(config: pytest.Config) -> None:
    fleet = config.stash.get(_SESSION_FLEET, None)
    if fleet is not None:
        del config.stash[_SESSION_FLEET]
        fleet.__exit__(None, None, None)


class VirtualGpusMarker:
    """``@pytest.mark.virtual_gpus(spec)``: the fleet spans the test's setup, call and teardown."""

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_setup(self, item: pytest.Item):
        mark = item.get_closest_marker("virtual_gpus")
        if mark is not None:
            from . import active_fleet, describe_fleet, virtual_gpus

            try:
                fleet = virtual_gpus(*mark.args, **mark.kwargs)
            except (LLMLoadUsageError, TypeError) as exc:
                raise pytest.fail.Exception(f"virtual_gpus marker: {exc}", pytrace=False) from None
            running = active_fleet()
            if running is None:
                fleet.__enter__()
                item.stash[_TEST_FLEET] = fleet
            elif running.specs != fleet.cards:  # fleets do not nest; the session's one serves if it is the same
                raise pytest.skip.Exception(
                    f"needs virtual GPUs {describe_fleet(fleet.cards)}; this session runs on virtual GPUs "
                    f"{describe_fleet(running.specs)} (fleets do not nest)", _use_item_location=True)
        return (yield)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_teardown(self, item: pytest.Item, nextitem):
        try:
            return (yield)
        finally:
            fleet = item.stash.get(_TEST_FLEET, None)
            if fleet is not None:
                del item.stash[_TEST_FLEET]
                fleet.__exit__(None, None, None)
