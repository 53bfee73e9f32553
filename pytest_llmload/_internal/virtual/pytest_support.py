"""The fleet in a pytest run: ``--llm-virtual-gpus=SPEC`` for the whole session, and
``@pytest.mark.virtual_gpus(SPEC)`` for one test. torch is imported only when one of them is used."""

from __future__ import annotations

import os

import pytest

from pytest_llmload.errors import LLMLoadUsageError

OPTION = "llm_virtual_gpus"
INHERITED = "LLMLOAD_VIRTUAL_GPUS"  # the session's fleet, for child processes that run pytest with the plugin
_SESSION_FLEET = pytest.StashKey[object]()
_INHERITED_SPEC = pytest.StashKey[str]()
_TEST_FLEET = pytest.StashKey[object]()


def session_spec(config: pytest.Config) -> str | None:
    """The session's fleet: ``--llm-virtual-gpus``, else ``llm_virtual_gpus``, else the parent process's."""
    value = config.getoption(OPTION, None) or config.getini(OPTION)
    if not value:
        value = os.environ.get(INHERITED)
    return str(value).strip() or None if value else None


def inherited_note(config: pytest.Config) -> str | None:
    """The header's words when the session runs on a fleet it inherited from its parent process."""
    spec = config.stash.get(_INHERITED_SPEC, None)
    return (f"virtual GPUs {spec} inherited from the parent process ({INHERITED}); a child Python that does not "
            "run pytest with this plugin sees the machine's own GPUs") if spec else None


def spec_card_count(value: str | None) -> int | None:
    """How many cards a spec names (for xdist GPU slices before the fleet starts); None without a spec."""
    if not value:
        return None
    from pytest_llmload._internal.virtual.fleet import parse_virtual_spec

    try:
        return len(parse_virtual_spec(value))
    except LLMLoadUsageError as exc:
        raise pytest.UsageError(f"--llm-virtual-gpus: {exc}") from None


def start_session_fleet(config: pytest.Config) -> None:
    """Enter the session's fleet (before the session reads the inventory); a bad spec is a UsageError."""
    spec = session_spec(config)
    if spec is None:
        return
    from pytest_llmload._internal.virtual import active_fleet, virtual_gpus

    inherited = not (config.getoption(OPTION, None) or config.getini(OPTION))
    if inherited and active_fleet() is not None:
        return  # an in-process run (pytester) inside the fleet it would inherit: already on it
    try:
        fleet = virtual_gpus(spec)
        fleet.__enter__()
    except LLMLoadUsageError as exc:
        source = INHERITED if inherited else "--llm-virtual-gpus"
        raise pytest.UsageError(f"{source}: {exc}") from None
    config.stash[_SESSION_FLEET] = (fleet, os.environ.get(INHERITED))
    if inherited:
        config.stash[_INHERITED_SPEC] = spec
    os.environ[INHERITED] = spec  # child processes that run pytest with the plugin start on the same fleet


def stop_session_fleet(config: pytest.Config) -> None:
    started = config.stash.get(_SESSION_FLEET, None)
    if started is not None:
        del config.stash[_SESSION_FLEET]
        fleet, previous = started
        if previous is None:
            os.environ.pop(INHERITED, None)
        else:
            os.environ[INHERITED] = previous
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
