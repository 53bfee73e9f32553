"""The leak check: planted leaks of each kind are caught and named; clean tests are not flagged.

Each inner run is one pytest session in-process (pytester), on the CPU and on a 2-card virtual fleet
(whose per-card counters are the proof that GPU memory came back). ``--llm-cache-size=1`` with two cells
makes the cache evict the first model while the second test sets up: that is when a loads-check runs.
"""

from __future__ import annotations

import pytest

from pytest_llmload._internal.checks.leaks import gpu_tensors
from pytest_llmload._internal.checks.referrers import referrer_chain

# Each planted leak keeps the first cell's model (or one of its tensors) alive in its own way.
LEAKS = {
    "global": (
        "_KEEP = []\n",
        "_KEEP.append(llm_model)",
        ["global _KEEP of module test_planted", "test_planted.py) (list)", "-> [0] (LlamaForCausalLM)"],
    ),
    "lru_cache": (
        "import functools\n@functools.lru_cache(maxsize=4)\ndef cached(model_id):\n    return _CURRENT[0]\n"
        "_CURRENT = []\n",
        "_CURRENT.append(llm_model); cached(1); _CURRENT.clear()",
        ["global cached of module test_planted", "test_planted.py) (_lru_cache_wrapper)",
         "-> (cached by lru_cache function cached) (LlamaForCausalLM)"],
    ),
    "accelerate_hook": (
        "import torch\nfrom accelerate.hooks import ModelHook, add_hook_to_module\n"
        "class Keep(ModelHook):\n    def __init__(self, model):\n        self.model = model\n"
        "_PROBE = torch.nn.Linear(1, 1)\n",
        "add_hook_to_module(_PROBE, Keep(llm_model))",
        ["global _PROBE of module test_planted", "test_planted.py) (Linear)", "-> ._hf_hook (Keep (an accelerate hook))",
         "-> .model"],
    ),
    "cycle_with_del": (
        "_GRAVE = []\nclass Holder:\n    def __init__(self, model):\n        self.model, self.me = model, self\n"
        "    def __del__(self):\n        _GRAVE.append(self)  # resurrects itself (and the model) when collected\n",
        "Holder(llm_model)",
        # an automatic collection may resurrect the Holder while the cache still holds the model (then the
        # model is "not collected"), or the eviction's own collection does (then "resurrected"): both name this
        ["global _GRAVE of module test_planted", "-> [0] (Holder)", "-> .model (LlamaForCausalLM)"],
    ),
    "closure": (
        "_CALLBACKS = []\n",
        "model = llm_model\n    _CALLBACKS.append(lambda: model.config)",
        ["global _CALLBACKS of module test_planted", "(a closure variable) (LlamaForCausalLM)"],
    ),
    "one_tensor": (
        "_WEIGHTS = []\n",
        "_WEIGHTS.append(llm_model.lm_head.weight)",
        ["model was collected but not all its tensors: 1 tensor(s)", "lm_head.weight: tensor[", "global _WEIGHTS of module test_planted"],
    ),
    "fixture": (
        "import pytest\n@pytest.fixture(scope='module')\ndef kept():\n    return []\n",
        "kept.append(llm_model)",
        ["fixture 'kept' (scope module", "its cached value (list)", "-> [0] (LlamaForCausalLM)"],
    ),
}


def _planted(pytester, leak: str, device_map: str = "cpu") -> None:
    prelude, plant, _ = LEAKS[leak]
    extra = ", kept" if leak == "fixture" else ""
    pytester.makepyfile(test_planted=f"""
import pytest
{prelude}
@pytest.mark.llm(precisions=["fp32", "bf16"])
def test_first(llm_model{extra}, llm_spec):
    if llm_spec.precision == "fp32":
        {plant}

def test_clean_after(llm_model):
    assert llm_model is not None
""")


@pytest.mark.parametrize("fleet", [None, "2x64MiB"], ids=["cpu", "fleet"])
@pytest.mark.parametrize("leak", sorted(LEAKS))
def test_a_planted_leak_is_caught_at_eviction_and_named(pytester, leak, fleet):
    _planted(pytester, leak)
    args = ["--llm-cache-size=1", "-W", "default", "-p", "no:randomly"]
    result = pytester.runpytest(*args, *([f"--llm-virtual-gpus={fleet}"] if fleet else []))
    result.assert_outcomes(passed=3)
    text = result.stdout.str()
    assert "llm leak check: cell tiny-llama-auto-fp32" in text, text
    assert "evicted" in text
    for expected in LEAKS[leak][2]:
        assert expected in text, (expected, text)
    assert text.count("llm leak check: cell") == 1, text  # the bf16 cell was released cleanly
    if fleet:  # the cards' counters: the load's memory did not come back (the model spans both cards)
        assert "still allocated of what its load allocated: " in text, text


def test_strict_mode_fails_where_the_leak_is_found(pytester):
    _planted(pytester, "global")
    result = pytester.runpytest("--llm-cache-size=1", "--llm-require-gpus", "-p", "no:randomly")
    result.assert_outcomes(passed=3, errors=1)  # the teardown of the test whose setup evicted the model
    result.stdout.fnmatch_lines(["*llm leak check: cell tiny-llama-auto-fp32*not collected*",
                                 "*global _KEEP of module test_planted*"])


def test_leak_found_at_the_session_end_is_in_the_summary_and_fails_strict_runs(pytester):
    pytester.makepyfile(test_end="""
_KEEP = []
def test_keeps(llm_model):
    _KEEP.append(llm_model)
""")
    result = pytester.runpytest()
    assert result.ret == 0
    result.stdout.fnmatch_lines(["*llmload: leak check*", "*cell tiny-llama-* was released (at the session's end)*",
                                 "*global _KEEP of module test_end*"])
    strict = pytester.runpytest("--llm-require-gpus")
    assert strict.ret == 1, strict.stdout.str()
    assert "passed" in strict.stdout.str()
    off = pytester.runpytest("--llm-leak-check=off")
    assert off.ret == 0 and "leak check" not in off.stdout.str()


def test_private_model_leak_is_caught_at_its_teardown_and_a_clean_one_is_not(pytester):
    pytester.makepyfile(test_private="""
_KEEP = {}
def test_leaks(llm_private_model):
    _KEEP["model"] = llm_private_model

def test_clean(llm_private_model):
    assert llm_private_model(**{"input_ids": __import__("torch").tensor([[1, 2]])}).logits.shape[0] == 1

def test_fails(llm_private_model):
    assert llm_private_model is None  # its traceback keeps the model: a failed test is not checked
""")
    result = pytester.runpytest("-W", "default", "-p", "no:randomly")
    result.assert_outcomes(passed=2, failed=1)
    text = result.stdout.str()
    assert text.count("llm leak check:") == 1, text
    assert "llm_private_model of test_private.py::test_leaks[tiny-llama-auto-auto], at its teardown" in text
    assert "global _KEEP of module test_private" in text and "-> .model (LlamaForCausalLM)" in text


FLEET_TESTS = """
import pytest, torch
_KEEP = []

@pytest.mark.no_gpu_leak
def test_leaks_a_tensor():
    _KEEP.append(torch.zeros(256, 256, device="cuda:1"))

@pytest.mark.no_gpu_leak
def test_clean():
    x = torch.ones(1024, device="cuda:0") * 2
    assert float(x.sum()) == 2048

@pytest.mark.no_gpu_leak
def test_garbage_in_a_cycle_is_not_a_leak():
    a = [torch.ones(64, device="cuda:0")]
    a.append(a)

@pytest.fixture(scope="module")
def table():
    return torch.ones(128, device="cuda:0")

@pytest.mark.no_gpu_leak
def test_a_module_fixture_is_not_the_test_s(table, llm_model):
    assert table.device.type == "cuda"

def test_unmarked_leak_is_not_checked():
    _KEEP.append(torch.zeros(8, device="cuda:0"))
"""


def test_tests_mode_on_a_fleet_names_the_tensor_and_its_holder(pytester):
    pytester.makepyfile(test_fleet=FLEET_TESTS)
    result = pytester.runpytest("--llm-virtual-gpus=2x1GiB", "-p", "no:randomly")
    result.assert_outcomes(passed=5, errors=1)  # a leak fails the test's teardown
    result.stdout.fnmatch_lines([
        "*test_leaks_a_tensor*left GPU memory allocated after its teardown*256.0 KiB on cuda:1*",
        "*GPU tensors still alive: tensor[[]256, 256[]] float32 on cuda:1, 256.0 KiB*",
        "*global _KEEP of module test_fleet*",
    ])
    every = pytester.runpytest("--llm-virtual-gpus=2x1GiB", "--llm-leak-check=tests", "-p", "no:randomly")
    every.assert_outcomes(passed=5, errors=2)  # now the unmarked test is checked too


def test_an_unknown_mode_is_one_usage_error_line(pytester):
    pytester.makepyfile("def test_x():\n    pass\n")
    result = pytester.runpytest("--llm-leak-check=everything")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*invalid --llm-leak-check value 'everything': expected one of loads, tests, off"])
    assert "Traceback" not in result.stderr.str()


def test_the_chain_walk_names_a_running_function_local_and_skips_its_own_frames():
    class Thing:
        pass

    thing = Thing()
    chain = referrer_chain(thing)
    assert chain[0].startswith("local thing of running function test_the_chain_walk"), chain


class _Holder:
    def __init__(self, model):
        self.model = model


class _Keeper:
    kept = None


def test_the_chain_names_the_class_of_an_instance_or_class_a_global_holds():
    """A global bound to an instance: the hop through its ``__dict__`` is folded, so the root line names its class
    (the reader would otherwise see only ``.model``); a class attribute reads as ``.kept`` of that class."""
    import sys
    import weakref

    module = sys.modules[__name__]
    module._HOLDER = _Holder(type("TinyModel", (), {})())
    ref = weakref.ref(module._HOLDER.model)  # no local of this running function holds the model itself
    try:
        chain = referrer_chain(ref(), ignore=[sys._getframe()])
        _Keeper.kept = ref()
        del module._HOLDER
        class_chain = referrer_chain(ref(), ignore=[sys._getframe()])
    finally:
        _Keeper.kept = None
        module.__dict__.pop("_HOLDER", None)
    assert chain[0].startswith(f"global _HOLDER of module {__name__}") and chain[0].endswith("(_Holder)"), chain
    assert chain[1:] == ["-> .model (TinyModel)"], chain
    assert class_chain[0].startswith(f"global _Keeper of module {__name__}"), class_chain
    assert class_chain[0].endswith("(class _Keeper)"), class_chain
    assert class_chain[1:] == ["-> .kept (TinyModel)"], class_chain


def test_gpu_tensors_lists_one_entry_per_storage_largest_first():
    from pytest_llmload import virtual_gpus
    import torch

    with virtual_gpus("1x64MiB"):
        big = torch.zeros(1000, device="cuda:0")
        views = [big[:10], big[10:20]]
        small = torch.zeros(10, device="cuda:0")
        found = gpu_tensors()
        mine = [info.nbytes for tensor, info in found
                if tensor.untyped_storage().data_ptr() in (big.untyped_storage().data_ptr(),
                                                           small.untyped_storage().data_ptr())]
        assert mine == [4000, 40], found  # the views share big's storage: listed once
        sizes = [info.nbytes for _, info in found]
        assert sizes == sorted(sizes, reverse=True)
        del big, views, small, found


NO_FALSE_ALARMS = """
import pytest, torch

@pytest.fixture
def wrapped(llm_private_model):  # a user's fixture over the private copy (as a PeftModel wrapper is)
    return {"model": llm_private_model}

@pytest.mark.llm(models="builtin:tiny-llama", device_maps="balanced", precisions="fp32")
def test_wrapper_of_a_private_copy(wrapped):
    assert wrapped["model"] is not None

@pytest.mark.llm(models="builtin:tiny-llama", device_maps="balanced", precisions="fp32")
def test_evicts_the_model_it_holds(llm_model, llm_load):
    other = llm_load("builtin:tiny-gpt2", device_map="balanced", precision="fp32")  # cache size 1: evicts llm_model
    assert llm_model is not other

@pytest.fixture(scope="class")
def class_tensor():
    yield torch.ones(2000, device="cuda:0")

class TestClassFixture:
    def test_a(self, class_tensor):
        pass
    def test_b(self, class_tensor):  # the fixture is finalized in this test's teardown
        pass

@pytest.fixture(scope="session")
def session_tensor():
    return torch.ones(1000, device="cuda:1")

@pytest.mark.xfail(reason="known")
def test_xfail_holding_gpu_memory():
    x = torch.ones(5000, device="cuda:0")
    assert False

def test_last_uses_the_session_fixture(session_tensor):
    pass

@pytest.fixture(scope="module")
def small_model(llm_load):  # evicts the bigger fp32 llama the cache holds: the cache's change, not the fixture's
    return llm_load("builtin:tiny-llama", device_map="balanced", precision="fp16")  # 369 of 738 KiB

@pytest.mark.llm(models="builtin:tiny-llama", device_maps="balanced", precisions="fp32")
def test_loads_the_big_one(llm_model):
    pass

def test_a_module_fixture_evicts_it(small_model):
    pass
"""


def test_no_false_alarm_for_what_pytest_or_wider_fixtures_hold(pytester):
    pytester.makepyfile(test_quiet=NO_FALSE_ALARMS)
    result = pytester.runpytest("--llm-virtual-gpus=2x64MiB", "--llm-leak-check=tests", "--llm-cache-size=1",
                                "-W", "error::pytest_llmload.errors.LLMLoadLeakWarning", "-p", "no:randomly")
    result.assert_outcomes(passed=7, xfailed=1)
    assert "leak check" not in result.stdout.str()


def test_a_model_loaded_in_another_test_s_fleet_is_not_this_test_s(pytester):
    """Each virtual_gpus test runs on its own fleet; a model cached from the first is evicted in the second,
    whose counters never held it."""
    pytester.makepyfile(test_fleets="""
import pytest

@pytest.mark.virtual_gpus("2x64MiB")
@pytest.mark.llm(models="builtin:tiny-llama", device_maps="balanced", precisions="fp32")
def test_one(llm_model):
    pass

@pytest.mark.virtual_gpus("2x64MiB")
@pytest.mark.no_gpu_leak
@pytest.mark.llm(models="builtin:tiny-gpt2", device_maps="balanced", precisions="fp32")
def test_two(llm_model):
    pass
""")
    result = pytester.runpytest("--llm-cache-size=1", "-W", "error::pytest_llmload.errors.LLMLoadLeakWarning",
                                "-p", "no:randomly")
    result.assert_outcomes(passed=2)
    assert "leak check" not in result.stdout.str()


BLAME = """
import pytest, torch

TINY = pytest.mark.llm(models="builtin:tiny-llama", device_maps="balanced", precisions="fp32")

class Unreadable:
    __slots__ = ("x",)
    def __init__(self, t):
        self.x = t
    def __getattribute__(self, name):
        if name == "x":
            raise KeyError("nope")
        return object.__getattribute__(self, name)

HOLD = []

@TINY
@pytest.mark.no_gpu_leak
def test_first_leaks_through_an_unreadable_object(llm_model):
    HOLD.append(Unreadable(torch.ones(256, 256, device="cuda:1")))

@TINY
@pytest.mark.no_gpu_leak
def test_second_leaves_gradients_on_the_cached_model(llm_model):
    ids = torch.tensor([[1, 2, 3, 4]], device="cuda:0")
    llm_model.lm_head.weight.requires_grad_(True)
    llm_model(input_ids=ids, labels=ids).loss.backward()
"""


def test_each_report_names_its_own_test_s_tensors(pytester):
    pytester.makepyfile(test_blame=BLAME)
    result = pytester.runpytest("--llm-virtual-gpus=2x64MiB", "-p", "no:randomly")
    result.assert_outcomes(passed=2, errors=2)
    text = result.stdout.str()
    # the short summary repeats every error's message in full where pytest sees a CI (the CI variable set): it is
    # not part of the second test's own report
    reports = text.split("short test summary info")[0]
    first, second = reports.split("ERROR at teardown of test_second")
    assert "-> [0] (Unreadable)\n  -> .x (Tensor)" in first, first  # read through its slot's descriptor
    assert "global HOLD of module test_blame" in first and "256.0 KiB on cuda:1" in first, first
    assert "tensor[256, 256]" not in second, second  # the first test's leak is not blamed again
    assert "the gradient of lm_head.weight of cell tiny-llama-balanced-fp32" in second, second


def test_a_model_resurrected_by_a_del_is_caught_though_its_weak_reference_died():
    """The collector clears weak references to what it finds unreachable before finalizers run; a __del__
    that resurrects the model leaves a dead weakref and live weights. The storages' C++ weak pointers see it."""
    import gc
    from types import SimpleNamespace

    import torch

    from pytest_llmload._internal.session.leaks import LeakCheck

    check = LeakCheck(SimpleNamespace(leak_check="loads", require_gpus=False))
    grave = []

    class Holder:
        def __init__(self, model):
            self.model, self.me = model, self

        def __del__(self):
            grave.append(self)

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    watch = check.loaded(check.before_load(), SimpleNamespace(id="cell-x"), model, cached=True)
    check.releasing(watch, "evicted")
    Holder(model)
    del model
    enabled = gc.isenabled()
    gc.disable()  # the collection below is the one that finds the cycle: deterministic
    try:
        gc.collect()
    finally:
        if enabled:
            gc.enable()
    assert watch.model() is None and grave  # the weak reference died, the model lives on in grave
    message = check.verify(watch)
    assert "resurrected by a __del__" in message and "0.weight" in message, message
    grave.clear()
