"""The fleet in a pytest run: ``--llm-virtual-gpus=SPEC`` for the whole session, and
``@pytest.mark.virtual_gpus(SPEC)`` for one test. torch is imported only when one of them is used."""

from __future__ import annotations

import os

import pytest

from pytest_llmload._internal.config.options import INHERITED_FLEET, VirtualGpus
from pytest_llmload.errors import LLMLoadUsageError

_SESSION_FLEET = pytest.StashKey[object]()
_INHERITED_SPEC = pytest.StashKey[str]()
_TEST_FLEET = pytest.StashKey[object]()


def inherited_note(config: pytest.Config) -> str | None:
    """The header's words when the session runs on a fleet it inherited from its parent process."""
    spec = config.stash.get(_INHERITED_SPEC, None)
    return (f"virtual GPUs {spec} inherited from the parent process ({INHERITED_FLEET}); a child Python that does "
            "not run pytest with this plugin sees the machine's own GPUs") if spec else None


def start_session_fleet(config: pytest.Config, setting: VirtualGpus) -> None:
    """Enter the session's fleet (before the session reads the inventory); ``setting`` was parsed once, by
    :func:`~pytest_llmload._internal.config.options.read_virtual_gpus`."""
    from pytest_llmload._internal.virtual import active_fleet, virtual_gpus

    if setting.inherited and active_fleet() is not None:
        return  # an in-process run (pytester) inside the fleet it would inherit: already on it
    fleet = virtual_gpus.of_cards(setting.text, setting.cards)
    fleet.__enter__()
    config.stash[_SESSION_FLEET] = (fleet, os.environ.get(INHERITED_FLEET))
    if setting.inherited:
        config.stash[_INHERITED_SPEC] = setting.text
    os.environ[INHERITED_FLEET] = setting.text  # child processes that run pytest with the plugin start on it


def stop_session_fleet(config: pytest.Config) -> None:
    started = config.stash.get(_SESSION_FLEET, None)
    if started is not None:
        del config.stash[_SESSION_FLEET]
        fleet, previous = started
        if previous is None:
            os.environ.pop(INHERITED_FLEET, None)
        else:
            os.environ[INHERITED_FLEET] = previous
        fleet.__exit__(None, None, None)


class VirtualGpusMarker:
    """``@pytest.mark.virtual_gpus(spec)``: the fleet spans the test's setup, call and teardown."""

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_setup(self, item: pytest.Item):
        mark = item.get_closest_marker("virtual_gpus")
        if mark is not None:
            from pytest_llmload._internal.virtual import active_fleet, describe_fleet, virtual_gpus

            try:
                fleet = virtual_gpus(*mark.args, **mark.kwargs)
            except (LLMLoadUsageError, TypeError) as exc:
                raise pytest.fail.Exception(f"virtual_gpus marker: {exc}", pytrace=False) from None
            running = active_fleet()
            if running is None:
                fleet.__enter__()
                item.stash[_TEST_FLEET] = fleet
            elif running.specs != fleet.cards:  # fleets do not nest; the session's one serves if it is the same
                from pytest_llmload._internal.session import SESSION_KEY

                reason = (f"needs virtual GPUs {describe_fleet(fleet.cards)}; this session runs on virtual GPUs "
                          f"{describe_fleet(running.specs)} (fleets do not nest)")
                session = item.config.stash.get(SESSION_KEY, None)
                if session is not None:  # skip, or fail under --llm-require-gpus like any hardware skip
                    session.gate.missing_hardware(item.nodeid, [reason])
                raise pytest.skip.Exception(reason, _use_item_location=True)
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
