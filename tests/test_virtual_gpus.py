"""The virtual GPU fleet: torch.cuda answered by it, real values on virtual cards, CUDA's errors, and
real transformers loads split over virtual cards computing exactly what a CPU load computes."""

from __future__ import annotations

import concurrent.futures
import gc
import subprocess
import sys
import time
import warnings

import pytest
import torch

import pytest_llmload
from pytest_llmload import virtual_gpus
from pytest_llmload.errors import LLMLoadUsageError
from pytest_llmload._internal.virtual.fleet import parse_virtual_spec
from pytest_llmload._internal.virtual.tensor import NotSimulatedError, VirtualTensor

MiB = 2**20
GiB = 2**30
IDS = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])

MACHINE_CUDA = torch.cuda.is_available()  # what the machine has, outside any fleet
MACHINE_GPUS = torch.cuda.device_count()


# ---------------------------------------------------------------- spec


@pytest.mark.parametrize(
    ("spec", "sizes", "capability"),
    [
        ("2x24GiB", [24 * GiB, 24 * GiB], (8, 0)),
        ("24GiB,16GiB", [24 * GiB, 16 * GiB], (8, 0)),
        ("2x80GiB@9.0", [80 * GiB, 80 * GiB], (9, 0)),
        ("64MiB", [64 * MiB], (8, 0)),
        ("2x64MiB,1GiB@8.6", [64 * MiB, 64 * MiB, GiB], (8, 6)),
    ],
)
def test_spec_forms(spec, sizes, capability):
    cards = parse_virtual_spec(spec)
    assert [c.total_memory for c in cards] == sizes
    assert {c.capability for c in cards} == {capability}


@pytest.mark.parametrize("spec", ["", "2x", "lots", "2x24XB", "0x1GiB", "2x24GiB@nine", "24GiB,,16GiB", 2])
def test_bad_spec_is_one_line_naming_the_value(spec):
    with pytest.raises(LLMLoadUsageError) as info:
        virtual_gpus(spec)
    message = str(info.value)
    assert "\n" not in message
    assert repr(spec) in message or repr(str(spec).partition("@")[2]) in message


def test_importing_and_parsing_do_not_import_torch():
    code = (
        "import sys, pytest_llmload; f = pytest_llmload.virtual_gpus('2x24GiB'); "
        "print('torch' in sys.modules, len(f.cards))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "2"]


# ---------------------------------------------------------------- torch.cuda answers


def test_torch_cuda_answers_from_the_fleet():
    assert torch.cuda.is_available() == MACHINE_CUDA
    with virtual_gpus("24GiB,16GiB@9.0", name="Virtual H100") as fleet:
        assert torch.cuda.is_available() and torch.cuda.device_count() == 2
        assert torch.cuda.current_device() == 0
        torch.cuda.set_device(1)
        assert torch.cuda.current_device() == 1
        with torch.cuda.device(0):
            assert torch.cuda.current_device() == 0
            assert torch.zeros(1, device="cuda").device == torch.device("cuda", 0)
        assert torch.cuda.current_device() == 1
        assert torch.zeros(1, device="cuda").device == torch.device("cuda", 1)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        assert torch.cuda.mem_get_info(1) == (16 * GiB, 16 * GiB)
        props = torch.cuda.get_device_properties(0)
        assert (props.name, props.total_memory, props.major, props.minor) == ("Virtual H100", 24 * GiB, 9, 0)
        assert torch.cuda.get_device_name("cuda:1") == "Virtual H100"
        assert torch.cuda.get_device_capability(torch.device("cuda", 1)) == (9, 0)
        assert torch.cuda.is_bf16_supported()
        assert len(fleet.cards) == 2
        with pytest.raises(RuntimeError, match="invalid device ordinal"):
            torch.zeros(1, device="cuda:2")
    assert torch.cuda.is_available() == MACHINE_CUDA and torch.cuda.device_count() == MACHINE_GPUS


def test_memory_counters_and_peaks():
    with virtual_gpus("2x64MiB"):
        a = torch.empty(MiB, dtype=torch.uint8, device="cuda:1")
        view = a[10:]
        assert torch.cuda.memory_allocated(1) == MiB and torch.cuda.memory_allocated(0) == 0
        b = torch.empty(3 * MiB, dtype=torch.uint8, device="cuda:1")
        assert torch.cuda.memory_allocated(1) == 4 * MiB
        del b
        assert torch.cuda.memory_allocated(1) == MiB
        assert torch.cuda.max_memory_allocated(1) == 4 * MiB
        assert torch.cuda.memory_reserved(1) == 4 * MiB and torch.cuda.max_memory_reserved(1) == 4 * MiB
        assert torch.cuda.mem_get_info(1) == (60 * MiB, 64 * MiB)
        torch.cuda.empty_cache()
        assert torch.cuda.memory_reserved(1) == MiB
        torch.cuda.reset_peak_memory_stats(1)
        assert torch.cuda.max_memory_allocated(1) == MiB
        del a
        assert torch.cuda.memory_allocated(1) == MiB  # the view keeps the storage alive
        del view
        assert torch.cuda.memory_allocated(1) == 0
        torch.empty(100, dtype=torch.uint8, device="cuda:0")
        assert torch.cuda.max_memory_allocated(0) == 512  # CUDA's allocator rounds to 512 bytes


def test_cuda_visible_devices_is_honoured(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    with virtual_gpus("24GiB,16GiB"):
        assert torch.cuda.device_count() == 1
        assert torch.cuda.get_device_properties(0).total_memory == 16 * GiB
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with virtual_gpus("24GiB,16GiB"):
        assert not torch.cuda.is_available()


@pytest.mark.parametrize("value, sizes", [("1,0", [16, 24]), ("0,\u00b2", [24]), ("\u0663", []), (" 1 , x,0", [16])])
def test_cuda_visible_devices_ends_at_the_first_entry_that_is_no_card_number(monkeypatch, value, sizes):
    # "²" and "٣" pass str.isdigit(); int("²") raised ValueError out of the fleet's start, "٣" was read as 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    with virtual_gpus("24GiB,16GiB,8GiB,4GiB"):
        assert [torch.cuda.get_device_properties(i).total_memory // GiB
                for i in range(torch.cuda.device_count())] == sizes


# ---------------------------------------------------------------- values and devices


def test_tensors_on_virtual_cards_compute_cpu_values():
    torch.manual_seed(0)
    x, w = torch.randn(8, 16), torch.randn(16, 4)
    expected = torch.softmax(x @ w, dim=-1).sum(0)
    with virtual_gpus("2x64MiB"):
        xv, wv = x.cuda(), w.to("cuda:0")
        out = torch.softmax(xv @ wv, dim=-1).sum(0)
        assert isinstance(out, VirtualTensor)
        assert out.device == torch.device("cuda", 0) and out.is_cuda and out.get_device() == 0
        assert "device='cuda:0'" in repr(out)
        assert torch.equal(out.cpu(), expected)
        assert out.tolist() == expected.tolist()
        assert not out.is_pinned()
        with pytest.raises(TypeError, match="can't convert cuda:0 device type tensor to numpy"):
            out.numpy()
        moved = out.to(1)
        assert moved.device == torch.device("cuda", 1) and torch.equal(moved.cpu(), expected)
        xv.add_(1)  # in place: the same tensor, still on its card
        assert isinstance(xv, VirtualTensor) and torch.equal(xv.cpu(), x + 1)
        xv.unsqueeze_(0)
        assert xv.shape == (1, 8, 16) and xv.cpu().shape == (1, 8, 16)


def test_mixing_devices_raises_cudas_error():
    with virtual_gpus("2x64MiB"):
        a, b = torch.ones(3, device="cuda:0"), torch.ones(3, device="cuda:1")
        with pytest.raises(RuntimeError) as info:
            a + b
        assert str(info.value) == (
            "Expected all tensors to be on the same device, but found at least two devices, cuda:0 and cuda:1!"
        )
        with pytest.raises(RuntimeError, match="found at least two devices, cuda:0 and cpu!"):
            a * torch.ones(3)
        # CUDA's exceptions: 0-dim CPU tensors and CPU index tensors
        assert torch.equal((a * torch.tensor(2.0)).cpu(), torch.full((3,), 2.0))
        assert torch.equal(a[torch.tensor([0, 2])].cpu(), torch.ones(2))
        a.copy_(torch.arange(3.0))  # copies across devices are allowed
        assert torch.equal(a.cpu(), torch.arange(3.0))


def test_past_capacity_is_cudas_out_of_memory():
    with virtual_gpus("2x64MiB"):
        keep = torch.empty(40 * MiB, dtype=torch.uint8, device="cuda:1")
        with pytest.raises(torch.OutOfMemoryError) as info:
            torch.empty(30 * MiB, dtype=torch.uint8, device="cuda:1")
        message = str(info.value)
        assert message.startswith("CUDA out of memory. Tried to allocate 30.00 MiB. GPU 1 has a total capacity of 64.00 MiB")
        assert "40.00 MiB is allocated by PyTorch" in message
        assert torch.cuda.memory_allocated(1) == 40 * MiB
        torch.empty(30 * MiB, dtype=torch.uint8, device="cuda:0")  # the other card has room
        with pytest.raises(torch.OutOfMemoryError):
            keep.to(torch.float32)  # an op output past capacity too
        del keep


def test_autograd_flows_across_cards():
    x = torch.randn(5, requires_grad=True)
    with virtual_gpus("2x64MiB"):
        y = (x.cuda(0) * 2).to("cuda:1").exp().sum()
        y.backward()
    assert torch.equal(x.grad, (x.detach() * 2).exp() * 2)


# ---------------------------------------------------------------- lifecycle


def _patched_objects():
    return (
        torch.cuda.is_available, torch.cuda.device_count, torch.compile,
        concurrent.futures.ThreadPoolExecutor.submit, torch.amp.autocast_mode.autocast.__init__,
        torch.accelerator.is_available,
    )


def test_everything_restored_on_exit_also_after_an_exception():
    before = _patched_objects()
    with pytest.raises(ZeroDivisionError):
        with virtual_gpus("2x64MiB"):
            assert _patched_objects() != before
            1 / 0
    assert _patched_objects() == before
    assert torch.device("cpu") == torch.zeros(1).to("cpu").device
    if not torch.backends.cuda.is_built():
        with pytest.raises(RuntimeError):
            torch.device(0)  # a CPU build again


def test_nesting_or_a_second_fleet_is_an_error():
    with virtual_gpus("2x64MiB"):
        with pytest.raises(LLMLoadUsageError, match="already active"):
            with virtual_gpus("1x64MiB"):
                pass
        assert torch.cuda.device_count() == 2
    with virtual_gpus("1x64MiB"):  # after exit a new fleet starts
        assert torch.cuda.device_count() == 1


def test_decorator_form():
    @virtual_gpus("3x64MiB")
    def count():
        return torch.cuda.device_count()

    assert count() == 3 and count() == 3
    assert torch.cuda.device_count() == MACHINE_GPUS


@pytest.mark.parametrize(
    "action",
    [
        lambda: torch.cuda.Stream(),
        lambda: torch.cuda.Event(),
        lambda: torch.cuda.graph(None),
        lambda: torch.cuda.CUDAGraph(),
        lambda: torch.cuda.current_stream().wait_stream(None),
    ],
    ids=["Stream", "Event", "graph", "CUDAGraph", "wait_stream"],
)
def test_not_simulated_features_raise_a_clear_error(action):
    with virtual_gpus("2x64MiB"):
        with pytest.raises(NotSimulatedError, match="is not simulated on virtual GPUs"):
            action()


def test_autocast_cuda_disabled_is_a_no_op_and_the_default_stream_is_idle():
    with virtual_gpus("1x64MiB"):
        with torch.autocast("cuda", enabled=False):
            assert torch.ones(2, device="cuda").sum().item() == 2.0
        assert torch.cuda.current_stream().query() and not torch.cuda.current_stream().is_capturing()


# ---------------------------------------------------------------- the known traps, one test each


def test_trap_caching_allocator_warmup_is_skipped_on_small_cards():
    import transformers.modeling_utils as modeling_utils

    original = modeling_utils.caching_allocator_warmup
    model = pytest_llmload.load_model("builtin:tiny-llama", precision="fp32")
    with virtual_gpus("1x64MiB"):
        assert modeling_utils.caching_allocator_warmup is not original
        with pytest.raises(RuntimeError, match="negative"):  # what transformers' own warmup does here
            original(model, {"lm_head.weight": "cuda:0"}, None)
        loaded = pytest_llmload.load_model("builtin:tiny-llama", device_map={"": "cuda:0"}, precision="fp32")
        assert loaded.lm_head.weight.device == torch.device("cuda", 0)
    assert modeling_utils.caching_allocator_warmup is original


def test_trap_integer_histc_runs_as_on_cuda():
    values = torch.tensor([0, 1, 1, 3, 3, 3], dtype=torch.int32)
    with virtual_gpus("1x64MiB"):
        out = torch.histc(values.cuda(), bins=4, min=0, max=4)
        assert out.dtype == torch.int32 and out.device.type == "cuda"
        assert out.cpu().tolist() == [1, 2, 0, 3]


def test_trap_model_cpu_rebuilds_parameters_instead_of_swapping_data():
    lin = torch.nn.Linear(3, 3)
    weight = lin.weight.detach().clone()
    with virtual_gpus("1x64MiB"):
        lin.cuda()
        lin.cpu()
        assert type(lin.weight) is torch.nn.Parameter and lin.weight.device.type == "cpu"
        assert torch.equal(lin.weight, weight)
        assert torch.cuda.memory_allocated(0) == 0


def test_trap_module_apply_swaps_the_parameter_object():
    lin = torch.nn.Linear(3, 3)
    param = lin.weight
    with virtual_gpus("2x64MiB"):
        lin.to("cuda:1")
        assert lin.weight is param and isinstance(param, torch.nn.Parameter)
        assert param.device == torch.device("cuda", 1) and param.requires_grad
        lin.to(torch.float64)
        assert lin.weight.dtype == torch.float64 and lin.weight.device == torch.device("cuda", 1)


def test_trap_dynamo_is_imported_first_and_compile_runs_eagerly():
    original = torch.compile
    with virtual_gpus("1x64MiB"):
        assert "torch._dynamo" in sys.modules
        fn = lambda t: t * 2  # noqa: E731
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            compiled = torch.compile(fn)
        assert compiled is fn
        assert torch.compile(mode="reduce-overhead")(fn) is fn
    assert torch.compile is original


def test_trap_thread_pools_started_in_the_fleet_run_in_it():
    with virtual_gpus("2x64MiB"):
        torch.cuda.set_device(1)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            made = pool.submit(lambda: torch.zeros(2, device="cuda")).result()
            seen = pool.submit(torch.cuda.current_device).result()
        assert isinstance(made, VirtualTensor) and made.device == torch.device("cuda", 1) and seen == 1


# ---------------------------------------------------------------- real loads


def _two_card_map(model) -> dict[str, str]:
    """Explicit ``{module: "cuda:i"}``: first half of the layers on card 0, the rest on card 1."""
    if hasattr(model, "transformer"):  # GPT-2: the lm_head is tied to wte and stays with it
        n = model.config.n_layer
        layers = {f"transformer.h.{i}": f"cuda:{int(i >= n // 2)}" for i in range(n)}
        return {"transformer.wte": "cuda:0", "transformer.wpe": "cuda:0", "transformer.drop": "cuda:0",
                **layers, "transformer.ln_f": "cuda:1", "lm_head": "cuda:0"}
    n = model.config.num_hidden_layers
    layers = {f"model.layers.{i}": f"cuda:{int(i >= n // 2)}" for i in range(n)}
    return {"model.embed_tokens": "cuda:0", **layers, "model.norm": "cuda:1", "model.rotary_emb": "cuda:1",
            "lm_head": "cuda:1"}


def _devices(model) -> set[str]:
    return {str(p.device) for p in model.parameters()}


def test_balanced_load_spreads_over_both_cards_with_exact_logits():
    reference = pytest_llmload.load_model("builtin:tiny-llama", precision="fp32")(IDS).logits
    with virtual_gpus("2x64MiB"):
        model = pytest_llmload.load_model(
            "builtin:tiny-llama", device_map="balanced", max_memory={0: "400KiB", 1: "400KiB"}, precision="fp32"
        )
        assert {"cuda:0", "cuda:1"} <= _devices(model)
        assert torch.cuda.memory_allocated(0) > 0 and torch.cuda.memory_allocated(1) > 0
        logits = model(IDS.to("cuda:0")).logits
        assert (logits.cpu() - reference).abs().max().item() == 0.0


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-mixtral"])
def test_explicit_map_forward_generate_backward_and_adamw_equal_cpu(name):
    cpu = pytest_llmload.load_model(f"builtin:{name}", precision="fp32")
    device_map = _two_card_map(cpu)
    with virtual_gpus("2x64MiB"):
        model = pytest_llmload.load_model(f"builtin:{name}", device_map=device_map, precision="fp32")
        assert _devices(model) == {"cuda:0", "cuda:1"}
        for module, device in device_map.items():
            for param in model.get_submodule(module).parameters():
                assert str(param.device) == device, module
        assert (model(IDS.cuda()).logits.cpu() - cpu(IDS).logits).abs().max().item() == 0.0
        generated = model.generate(IDS.cuda(), max_new_tokens=4, do_sample=False)
        assert generated.cpu().tolist() == cpu.generate(IDS, max_new_tokens=4, do_sample=False).tolist()

        for m, ids in ((cpu, IDS), (model, IDS.cuda())):
            m.train()
            optimizer = torch.optim.AdamW(m.parameters(), lr=1e-2)
            torch.manual_seed(0)  # dropout draws from the CPU generator on both
            m(ids, labels=ids).loss.backward()
            optimizer.step()
        trained = dict(model.named_parameters())
        for key, param in cpu.named_parameters():
            assert trained[key].device.type == "cuda"
            assert torch.equal(trained[key].detach().cpu(), param.detach()), key


@pytest.mark.parametrize("offload", ["cpu", "disk"])
def test_gpu_plus_offload_equals_cpu(offload):
    cpu = pytest_llmload.load_model("builtin:tiny-gpt2", precision="fp32")
    device_map = {**_two_card_map(cpu), "transformer.h.1": offload, "transformer.ln_f": offload}
    with virtual_gpus("2x64MiB"):
        model = pytest_llmload.load_model("builtin:tiny-gpt2", device_map=device_map, precision="fp32")
        logits = model(IDS.cuda()).logits
        assert (logits.cpu() - cpu(IDS).logits).abs().max().item() == 0.0
        assert torch.cuda.memory_allocated(0) > 0 and torch.cuda.memory_allocated(1) > 0


def test_loading_pool_threads_load_onto_the_cards(monkeypatch):
    monkeypatch.delenv("HF_DEACTIVATE_ASYNC_LOAD", raising=False)
    seen = []
    real_submit = concurrent.futures.ThreadPoolExecutor.submit
    with virtual_gpus("2x64MiB"):
        guarded = concurrent.futures.ThreadPoolExecutor.submit
        monkeypatch.setattr(concurrent.futures.ThreadPoolExecutor, "submit",
                            lambda self, fn, *a, **k: (seen.append(fn), guarded(self, fn, *a, **k))[1])
        model = pytest_llmload.load_model("builtin:tiny-llama", device_map={"": "cuda:1"}, precision="fp32")
        monkeypatch.setattr(concurrent.futures.ThreadPoolExecutor, "submit", guarded)
        assert seen, "transformers did not load through its thread pool"
        assert _devices(model) == {"cuda:1"}
        assert all(isinstance(p, VirtualTensor) for p in model.parameters())
    assert concurrent.futures.ThreadPoolExecutor.submit is real_submit


def test_quantized_loads_onto_virtual_cards_are_one_clear_error():
    with virtual_gpus("1x64MiB"):
        with pytest.raises(LLMLoadUsageError, match="int8 does not run on virtual GPUs"):
            pytest_llmload.load_model("builtin:tiny-llama", precision="int8", device_map={"": "cuda:0"})


def test_a_load_past_a_cards_capacity_is_cudas_out_of_memory():
    with virtual_gpus("2x1MiB"):
        with pytest.raises(pytest_llmload.ModelLoadError, match="OutOfMemoryError: CUDA out of memory. Tried to allocate"):
            pytest_llmload.load_model("builtin:tiny-mixtral", device_map={"": "cuda:0"}, precision="fp32")
        # the failed load's frames sit in a reference cycle, as they would on CUDA; and transformers shuts its
        # loading pool down with wait=False, so a job already running when the OOM came may finish (and free
        # what it made) a moment later: poll, bounded
        deadline = time.monotonic() + 30
        while True:
            gc.collect()
            if torch.cuda.memory_allocated(0) == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert torch.cuda.memory_allocated(0) == 0  # what was loaded before the OOM is released


def test_checkpoint_tensors_become_card_tensors_without_a_second_copy():
    import transformers.core_model_loading as loading

    fresh = torch.arange(6.0)

    class CheckpointSlice:  # what transformers 5 materializes: reading it makes a fresh tensor
        def __getitem__(self, key):
            return fresh

    given = torch.arange(6.0)  # a tensor the caller still holds (a state_dict) is copied, as CUDA would
    with virtual_gpus("1x64MiB"):
        on_card = loading._materialize_copy(CheckpointSlice(), device=torch.device("cuda", 0))
        assert on_card.device == torch.device("cuda", 0) and on_card.untyped_storage().data_ptr() == fresh.data_ptr()
        copied = loading._materialize_copy(given, device="cuda:0", dtype=torch.float64)
        assert copied.dtype == torch.float64 and copied.untyped_storage().data_ptr() != given.data_ptr()
        copied.add_(1)
        assert torch.equal(given, torch.arange(6.0))


@pytest.mark.filterwarnings("ignore:To copy construct from a tensor")  # torch's own advice about new_tensor
def test_every_way_to_put_a_tensor_on_a_card():
    base = torch.arange(4.0)
    with virtual_gpus("2x64MiB"):
        on1 = base.to("cuda:1")
        made = {
            "to(int)": base.to(1),
            "cuda(1)": base.cuda(1),
            "device(int)": torch.zeros(2, device=torch.device(1)),
            "tensor(device=)": torch.tensor([1.0, 2.0], device="cuda:1"),
            "zeros_like": torch.zeros_like(on1),
            "ones_like(device=)": torch.ones_like(base, device="cuda:1"),
            "new_zeros": on1.new_zeros(3),
            "new_tensor": on1.new_tensor([1.0, 2.0]),
            "new_tensor(cpu data)": on1.new_tensor(base),
            "new": on1.new(2),
            "new_full(device=)": base.new_full((2,), 7.0, device="cuda:1"),
            "type_as": base.type_as(on1),
            "arange(device=)": torch.arange(3, device="cuda:1"),
            "randn(device=)": torch.randn(2, device="cuda:1"),
            "module.to(1)": torch.nn.Linear(2, 2).to(1).weight,
        }
        for how, tensor in made.items():
            assert isinstance(tensor, VirtualTensor) and tensor.device == torch.device("cuda", 1), how
        assert torch.zeros_like(on1, device="cpu").device.type == "cpu"
        as_double = base.type("torch.cuda.DoubleTensor")  # the current card, like .cuda()
        assert as_double.device == torch.device("cuda", 0) and as_double.dtype == torch.float64
        assert on1.type() == "torch.cuda.FloatTensor"
        assert on1.type("torch.HalfTensor").device.type == "cpu"
        assert torch.equal(made["to(int)"].cpu(), base) and torch.equal(made["type_as"].cpu(), base)


def test_foreach_ops_keep_each_position_on_its_card():
    with virtual_gpus("2x64MiB"):
        params = [torch.ones(2, device="cuda:0"), torch.ones(3, device="cuda:1")]
        steps = [torch.full((2,), 2.0, device="cuda:0"), torch.full((3,), 3.0, device="cuda:1")]
        torch._foreach_add_(params, steps)
        assert [p.device.index for p in params] == [0, 1]
        assert params[0].cpu().tolist() == [3.0, 3.0] and params[1].cpu().tolist() == [4.0, 4.0, 4.0]
        summed = torch._foreach_mul(params, 2.0)
        assert [s.device.index for s in summed] == [0, 1]
        with pytest.raises(RuntimeError, match="found at least two devices, cuda:0 and cuda:1!"):
            torch._foreach_add_(params, [torch.ones(2, device="cuda:1"), torch.ones(3, device="cuda:0")])


# ---------------------------------------------------------------- backward, copies and the card-tensor design


def test_activation_checkpointing_backward_equals_cpu_and_grads_are_on_their_cards():
    """Before: the backward ran outside the fleet (a __torch_function__ handler runs with its mode off), so
    checkpointing's recomputation asked the CPU build for CUDA: 'Cannot access accelerator device'."""
    cpu = pytest_llmload.load_model("builtin:tiny-llama", precision="fp32")
    from pytest_llmload._internal.compat.transformers import enable_activation_checkpointing

    enable_activation_checkpointing(cpu)
    cpu.train()
    cpu(IDS, labels=IDS).loss.backward()
    device_map = _two_card_map(cpu)
    with virtual_gpus("2x64MiB"):
        model = pytest_llmload.load_model("builtin:tiny-llama", device_map=device_map, precision="fp32")
        enable_activation_checkpointing(model)
        model.train()
        ids = IDS.cuda()
        loss = model(ids, labels=ids).loss
        after_forward = torch.cuda.max_memory_allocated(0) + torch.cuda.max_memory_allocated(1)
        loss.backward()
        after_backward = torch.cuda.max_memory_allocated(0) + torch.cuda.max_memory_allocated(1)
        grads = {name: p.grad for name, p in model.named_parameters()}
        for name, param in cpu.named_parameters():
            assert grads[name].device == model.get_parameter(name).device, name
            assert torch.equal(grads[name].cpu(), param.grad), name
        # what backward computes on the cards (gradients, recomputed activations) is charged to them
        grad_bytes = sum(g.numel() * g.element_size() for g in grads.values())
        assert after_backward >= after_forward + grad_bytes // 2


def test_autograd_grad_returns_gradients_on_their_inputs_cards():
    with virtual_gpus("2x64MiB"):
        a = torch.ones(3, device="cuda:0", requires_grad=True)
        b = torch.full((3,), 2.0, device="cuda:1", requires_grad=True)
        out = (a * 3).sum() + (b * b).to("cuda:0").sum()
        ga, gb = torch.autograd.grad(out, [a, b])
        assert ga.device == torch.device("cuda", 0) and gb.device == torch.device("cuda", 1)
        assert ga.cpu().tolist() == [3.0] * 3 and gb.cpu().tolist() == [4.0] * 3


def test_autograd_grad_materializes_unused_gradients_as_zeros_on_their_cards():
    with virtual_gpus("2x64MiB"):
        a = torch.ones(3, device="cuda:0", requires_grad=True)
        unused = torch.ones(2, device="cuda:1", requires_grad=True)
        ga, gu = torch.autograd.grad((a * 3).sum(), (a, unused), materialize_grads=True)
        assert gu.device == torch.device("cuda", 1) and gu.cpu().tolist() == [0.0, 0.0]
        assert ga.device == torch.device("cuda", 0) and ga.cpu().tolist() == [3.0] * 3
        [only] = torch.autograd.grad((a * a).sum(), a)  # one tensor, not a sequence
        assert only.device == torch.device("cuda", 0) and only.cpu().tolist() == [2.0] * 3


def test_deepcopy_keeps_tensors_on_their_cards_and_save_writes_cpu_tensors(tmp_path):
    import copy

    with virtual_gpus("2x64MiB"):
        lin = torch.nn.Linear(4, 4).to("cuda:1")
        twin = copy.deepcopy(lin)
        assert twin.weight.device == torch.device("cuda", 1) and isinstance(twin.weight, torch.nn.Parameter)
        assert twin.weight is not lin.weight and torch.equal(twin.weight.cpu(), lin.weight.cpu())
        torch.save(lin.state_dict(), tmp_path / "w.pt")
        loaded = torch.load(tmp_path / "w.pt")  # weights_only: plain CPU tensors (README: fidelity table)
        assert type(loaded["weight"]) is torch.Tensor and loaded["weight"].device.type == "cpu"
        assert torch.equal(loaded["weight"], lin.weight.cpu())


def test_a_card_tensor_is_the_cpu_tensor_itself():
    """The design the speed rests on: no wrapper and no copy; a tensor is put on a card by its class."""
    x = torch.arange(6.0)
    with virtual_gpus("2x64MiB"):
        y = x.to("cuda:1") * 1  # a new tensor, made by a call on a card tensor
        assert type(y).__name__ == "VirtualTensor1" and y.device == torch.device("cuda", 1)
        view = y.view(2, 3)
        assert view.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()
        before = torch.cuda.memory_allocated(1)
        del view
        assert torch.cuda.memory_allocated(1) == before  # a view shares its base's charge
        del y
        assert torch.cuda.memory_allocated(1) == before - 512  # 24 bytes, rounded as CUDA's allocator does


def test_accelerate_rebuilding_a_card_parameter_of_its_own_class():
    """accelerate's set_module_tensor_to_device rebuilds a parameter as type(old)(value, requires_grad=...):
    with one tensor class per card that call reached torch.Tensor.__init__ and failed (a balanced split of
    the examples with 400 KiB budgets hit it)."""
    from accelerate.utils import set_module_tensor_to_device

    with virtual_gpus("2x64MiB"):
        lin = torch.nn.Linear(3, 3).to("cuda:0")
        value = torch.arange(9.0).reshape(3, 3)
        set_module_tensor_to_device(lin, "weight", "cuda:1", value=value)
        assert isinstance(lin.weight, torch.nn.Parameter) and lin.weight.device == torch.device("cuda", 1)
        assert torch.equal(lin.weight.cpu(), value) and lin.weight.requires_grad
        assert isinstance(VirtualTensor(torch.ones(2), 1), VirtualTensor)


# ---------------------------------------------------------------- found by an adversarial pass (each failed before)


def test_fused_adamw_over_two_cards_equals_cpu():
    torch.manual_seed(0)
    cpu = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    import copy

    with virtual_gpus("2x64MiB"):
        split = copy.deepcopy(cpu)
        split[0].to("cuda:0")
        split[1].to("cuda:1")
        x = torch.randn(3, 4)
        for model, inputs in ((cpu, x), (split, x.cuda(0))):
            optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
            out = model[1](model[0](inputs).to(model[1].weight.device)) if model is split else model(inputs)
            out.sum().backward()
            optimizer.step()
        assert split[1].weight.device == torch.device("cuda", 1)
        for a, b in zip(cpu.parameters(), split.parameters()):
            assert torch.equal(a.detach(), b.detach().cpu())


def test_indices_must_be_on_the_cpu_or_the_indexed_tensors_card():
    with virtual_gpus("2x64MiB"):
        table = torch.arange(10.0)  # a scheduler's table left on the CPU, timesteps on the card
        steps = torch.tensor([1, 2], device="cuda:0")
        with pytest.raises(RuntimeError, match=r"indices should be either on cpu or on the same device as the indexed tensor \(cpu\)"):
            table[steps]
        on0 = torch.arange(10.0, device="cuda:0")
        with pytest.raises(RuntimeError, match=r"same device as the indexed tensor \(cuda:0\)"):
            on0[torch.tensor([1], device="cuda:1")]
        assert on0[torch.tensor([1, 2])].device == torch.device("cuda", 0)  # CPU indices are fine


def test_cpu_scalars_are_refused_where_cuda_refuses_them():
    with virtual_gpus("1x64MiB"):
        loss = torch.tensor(1.5, device="cuda:0")
        with pytest.raises(RuntimeError, match="cuda:0 and cpu!"):
            torch.stack([loss, torch.tensor(0.5)])  # only elementwise kernels take a 0-dim CPU tensor
        assert (loss * torch.tensor(2.0)).device == torch.device("cuda", 0)
        embedding = torch.nn.Embedding(10, 4).cuda()
        with pytest.raises(RuntimeError, match="cuda:0 and cpu!"):
            embedding(torch.tensor(3))


def test_a_list_of_card_scalars_makes_a_cpu_tensor_and_a_card_tensor_copy_stays():
    with virtual_gpus("1x64MiB"):
        a = torch.ones(3, device="cuda:0")
        assert torch.tensor([a.max(), a.min()]).device.type == "cpu"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's advice to use clone()
            assert torch.tensor(a).device == torch.device("cuda", 0)


def test_resize_keeps_the_cards_count():
    with virtual_gpus("1x64MiB"):
        grown = torch.empty(0, device="cuda:0").resize_(MiB // 4)  # float32: 1 MiB
        assert torch.cuda.memory_allocated(0) == MiB
        with pytest.raises(torch.OutOfMemoryError):
            grown.resize_(64 * MiB)
        del grown
        assert torch.cuda.memory_allocated(0) == 0


def test_deepcopy_of_a_parameter_copies_its_gradient_onto_the_card():
    import copy

    with virtual_gpus("2x64MiB"):
        lin = torch.nn.Linear(4, 4).cuda(1)
        lin(torch.randn(2, 4, device="cuda:1")).sum().backward()  # the gradient is not read before the copy
        before = torch.cuda.memory_allocated(1)
        twin = copy.deepcopy(lin.weight)
        assert torch.cuda.memory_allocated(1) - before == 2 * 512  # the weight and its gradient, both charged
        assert twin.grad.device == torch.device("cuda", 1) and torch.equal(twin.grad.cpu(), lin.weight.grad.cpu())


def test_custom_backward_code_may_combine_gradients_with_card_tensors():
    """Inside a backward, gradients are plain objects until read (README): cat/stack there is no device mix."""

    class Twice(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            return torch.stack([grad, x]).sum(0) - x + grad

    x = torch.arange(3.0, requires_grad=True)
    with virtual_gpus("1x64MiB"):
        on_card = x.cuda()
        Twice.apply(on_card).sum().backward()
    assert x.grad.tolist() == [2.0, 2.0, 2.0]


def test_seeding_a_card_makes_its_randomness_repeatable_and_its_rng_state_round_trips():
    """Found on a real H200: with real CUDA initialised, checkpointing saves each card's RNG state, which
    raised NotSimulatedError; and torch.cuda.manual_seed was a silent no-op."""
    with virtual_gpus("2x64MiB"):
        torch.cuda.manual_seed(1234)
        first = torch.randn(8, device="cuda:1")
        torch.cuda.manual_seed_all(1234)
        assert torch.equal(first, torch.randn(8, device="cuda:1"))
        state = torch.cuda.get_rng_state(1)
        again = torch.randn(8, device="cuda:0")
        torch.cuda.set_rng_state(state, 1)
        assert torch.equal(again, torch.randn(8, device="cuda:0"))
        assert torch.cuda.initial_seed() == 1234
        with pytest.raises(RuntimeError, match="invalid device ordinal"):
            torch.cuda.get_rng_state(5)


def test_checkpointing_where_real_cuda_was_initialised_saves_and_restores_the_cards_rng(monkeypatch):
    """On a GPU machine torch.cuda._initialized is True, so checkpointing asks each card for its RNG state."""
    from torch.utils.checkpoint import checkpoint

    with virtual_gpus("1x64MiB"):
        monkeypatch.setattr(torch.cuda, "_initialized", True, raising=False)
        layer = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.5)).cuda()
        x = torch.randn(4, 8, device="cuda:0", requires_grad=True)
        checkpoint(layer, x, use_reentrant=False).sum().backward()
        assert x.grad is not None and x.grad.device.type == "cuda"
