"""Virtual fleet fidelity (issue 22): what code written for real cards does, done as CUDA would.

Each test failed on the fleet before: the wrapper of torch.compile vanished, torch.cuda and
torch.accelerator memory calls raised torch-internal errors, pinned buffers raised.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from pytest_llmload import virtual_gpus


@pytest.fixture
def fleet():
    with virtual_gpus("2x64MiB") as running:
        yield running


def test_torch_compile_of_a_module_returns_an_optimized_module_that_runs_eagerly(fleet):
    from torch._dynamo.eval_frame import OptimizedModule

    module = torch.nn.Linear(4, 4).cuda()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = torch.compile(module)
        decorated = torch.compile()(module)  # the decorator form too
    assert isinstance(compiled, OptimizedModule) and compiled._orig_mod is module
    assert isinstance(decorated, OptimizedModule) and decorated._orig_mod is module
    x = torch.ones(2, 4, device="cuda:0")
    out = compiled(x)
    assert out.device == torch.device("cuda:0") and torch.equal(out, module(x))


def test_memory_introspection_answers_from_the_cards(fleet):
    x = torch.ones(1024, device="cuda:1")
    assert torch.accelerator.memory_allocated(1) == torch.cuda.memory_allocated(1) >= x.nbytes
    assert torch.accelerator.memory.memory_allocated(0) == torch.cuda.memory_allocated(0)
    assert torch.accelerator.memory.memory_stats(1)["allocated_bytes.all.current"] == torch.cuda.memory_allocated(1)
    summary = torch.cuda.memory_summary(1)
    assert "virtual GPU 1" in summary and str(torch.cuda.memory_allocated(1)) in summary
    assert torch.cuda.memory_snapshot() == []
    assert torch.cuda.can_device_access_peer(0, 1) is True
    with pytest.raises(RuntimeError, match="invalid device ordinal"):
        torch.cuda.can_device_access_peer(0, 7)
    torch.cuda.reset_accumulated_memory_stats(1)
    torch.cuda.ipc_collect()
    assert torch.cuda.get_sync_debug_mode() == 0 and torch.cuda.is_current_stream_capturing() is False
    with torch.cuda.device_of(x):
        assert torch.cuda.current_device() == 1
    assert torch.cuda.current_device() == 0


def test_pinned_host_buffers_are_host_memory_and_a_card_tensor_cannot_be_pinned(fleet):
    assert torch.empty(2, pin_memory=True).device == torch.device("cpu")
    host = torch.arange(4.0)
    pinned = host.pin_memory()
    assert pinned.device == torch.device("cpu") and torch.equal(pinned, host) and pinned is not host
    with pytest.raises(RuntimeError, match=r"cannot pin 'torch\.cuda\.FloatTensor' only dense CPU tensors"):
        torch.ones(2, device="cuda:0").pin_memory()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(6.0)), batch_size=2,
                                         pin_memory=True)
    assert [batch[0].tolist() for batch in loader] == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]


def test_legacy_cuda_tensor_types_move_tensors_onto_the_card(fleet):
    on_card = torch.ones(2, device="cuda:0").type(torch.cuda.HalfTensor)
    assert on_card.dtype == torch.float16 and on_card.device == torch.device("cuda:0")
    assert torch.ones(2).type(torch.cuda.FloatTensor).device.type == "cuda"


def test_torch_load_onto_a_card(fleet, tmp_path):
    path = tmp_path / "state.pt"
    torch.save({"w": torch.arange(3.0), "steps": 7}, path)
    loaded = torch.load(path, map_location="cuda:1")
    assert loaded["w"].device == torch.device("cuda:1") and loaded["steps"] == 7
    assert torch.equal(loaded["w"].cpu(), torch.arange(3.0))
    assert torch.load(path, map_location="cuda")["w"].device == torch.device("cuda:0")
    assert torch.load(path)["w"].device == torch.device("cpu")  # saved from the CPU: loads there
    with pytest.raises(RuntimeError, match="invalid device ordinal"):
        torch.load(path, map_location="cuda:5")


def test_a_memory_fraction_caps_the_card_with_cudas_oom(fleet):
    torch.cuda.set_per_process_memory_fraction(0.5, 0)
    with pytest.raises(torch.OutOfMemoryError):
        torch.empty(40 * 2**20, dtype=torch.uint8, device="cuda:0")
    kept = torch.empty(20 * 2**20, dtype=torch.uint8, device="cuda:0")
    assert kept.device == torch.device("cuda:0")
    torch.empty(40 * 2**20, dtype=torch.uint8, device="cuda:1")  # the other card is not capped
    with pytest.raises(ValueError, match="Invalid fraction value: 2.0"):
        torch.cuda.set_per_process_memory_fraction(2.0, 0)
    with pytest.raises(TypeError, match="must be `float`"):
        torch.cuda.set_per_process_memory_fraction(1, 0)


def test_a_card_bigger_than_the_hosts_ram_raises_cudas_oom_saying_the_host_could_not_back_it():
    import psutil

    available = psutil.virtual_memory().available
    size = 2 * (psutil.virtual_memory().total + (psutil.swap_memory().total or 0))  # no host can back this
    with virtual_gpus(f"1x{2 * size}B"):
        with pytest.raises(torch.OutOfMemoryError, match=r"^CUDA out of memory\. Tried to allocate .*\(virtual GPU: "
                           r"the host could not back it: [\d.]+ [KMG]iB of RAM available\)$"):
            torch.empty(size, dtype=torch.uint8, device="cuda:0")
        with pytest.raises(torch.OutOfMemoryError, match=r"a CPU-backed card of this pytest-llmload fleet"):
            torch.empty(4 * size, dtype=torch.uint8, device="cuda:0")  # past the card itself
        assert torch.cuda.memory_allocated(0) == 0
    assert available > 0
    with pytest.raises(RuntimeError, match="DefaultCPUAllocator"):  # the user's own CPU allocation: the host's error
        torch.empty(size, dtype=torch.uint8)


def test_the_header_warns_when_the_fleet_holds_more_than_the_hosts_ram(pytester):
    pytester.makepyfile("def test_x():\n    pass\n")
    result = pytester.runpytest_subprocess("--llm-virtual-gpus=2x4096GiB", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["llmload: warning: virtual GPUs 2x4.0 TiB hold 8.0 TiB, more than this host's * of "
                                 "available RAM: an allocation the host cannot back raises CUDA's out-of-memory error"])
    small = pytester.runpytest_subprocess("--llm-virtual-gpus=2x64MiB", "-p", "no:cacheprovider")
    assert "warning: virtual GPUs" not in small.stdout.str()


def test_set_default_device_to_a_card_behaves_like_the_device_context(fleet):
    torch.set_default_device("cuda:1")
    try:
        assert torch.zeros(2).device == torch.device("cuda:1")
        assert torch.get_default_device() == torch.device("cuda:1")
        assert torch.nn.Linear(2, 2).weight.device == torch.device("cuda:1")
        with pytest.raises(RuntimeError, match="invalid device ordinal"):
            torch.set_default_device("cuda:7")
    finally:
        torch.set_default_device(None)
    assert torch.zeros(2).device == torch.device("cpu")
    with torch.device("cuda:0"):
        assert torch.ones(1).device == torch.device("cuda:0")


def test_a_card_default_set_before_the_fleet_applies_in_it_and_is_the_users_again_after():
    torch.set_default_device("cuda:0")
    try:
        with virtual_gpus("1x64MiB"):
            assert torch.zeros(2).device == torch.device("cuda:0")
            torch.set_default_device("cuda:0")  # set again inside: still one default
        assert torch.get_default_device() == torch.device("cuda:0")
    finally:
        torch.set_default_device(None)
    assert torch.zeros(2).device == torch.device("cpu")


def test_what_was_compiled_before_the_fleet_runs_eagerly_in_it():
    module = torch.nn.Linear(4, 4)
    compiled_module = torch.compile(module)
    compiled_function = torch.compile(lambda x: torch.relu(x) * 2)
    with virtual_gpus("1x64MiB"):
        module.cuda()
        x = torch.randn(2, 4, device="cuda:0")
        out = compiled_module(x)
        assert out.device == torch.device("cuda:0") and torch.equal(out, module(x))
        assert torch.equal(compiled_function(x), torch.relu(x) * 2)


def test_an_out_of_memory_error_shows_the_users_frame_and_cudas_message(pytester):
    pytester.makepyfile("""
        import pytest, torch

        @pytest.mark.virtual_gpus("1x64MiB")
        def test_too_big():
            torch.empty(128 * 2**20, dtype=torch.uint8, device="cuda:0")
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    text = result.stdout.str()
    assert "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 128.00 MiB" in text
    assert "torch.empty(128 * 2**20" in text
    assert "virtual/mode.py" not in text and "virtual/fleet.py" not in text and "self = Fleet(" not in text


def test_a_card_tensor_that_outlived_its_fleet_can_be_brought_to_the_cpu():
    with virtual_gpus("2x64MiB"):
        left_over = torch.arange(3.0, device="cuda:1")
    for moved in (left_over.cpu(), left_over.to("cpu"), left_over.to("cpu", torch.float16)):
        assert type(moved) is torch.Tensor and moved.device == torch.device("cpu")
        assert moved.tolist() == [0.0, 1.0, 2.0]


def test_data_parallel_over_the_cards_equals_one_device_forward_and_backward():
    import copy

    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x = torch.randn(6, 8)
    expected = reference(x)
    expected.sum().backward()
    with virtual_gpus("2x64MiB"):
        module = copy.deepcopy(reference)
        module.zero_grad()
        parallel = torch.nn.DataParallel(module).cuda()
        assert parallel.device_ids == [0, 1] and parallel.module is module
        before = torch.cuda.max_memory_allocated(1)
        out = parallel(x.cuda())
        assert out.device == torch.device("cuda:0")
        torch.testing.assert_close(out.cpu(), expected)
        assert torch.cuda.max_memory_allocated(1) > before  # the replica on card 1 really held memory
        out.sum().backward()
        for param, ref in zip(module.parameters(), reference.parameters()):
            assert param.grad.device == torch.device("cuda:0")
            torch.testing.assert_close(param.grad.cpu(), ref.grad)
        torch.testing.assert_close(parallel(x).cpu(), expected)  # CPU inputs are scattered too


def test_autocast_cuda_casts_by_cudas_lists(fleet):
    """CUDA's autocast policy: matmuls and linears in the autocast dtype, softmax/layer_norm/sums in float32,
    promote ops in the widest input type, everything else in its inputs' dtype; it nests and restores."""
    context = torch.autocast("cuda", dtype=torch.bfloat16)
    assert context.device == "cuda" and context.fast_dtype == torch.bfloat16
    a = torch.randn(4, 4, device="cuda:0")
    linear = torch.nn.Linear(4, 4).cuda()
    assert not torch.is_autocast_enabled("cuda")
    with context:
        assert torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16
        product = a @ a
        assert product.dtype == torch.bfloat16 and product.device == torch.device("cuda:0")
        assert torch.mm(a, a).dtype == torch.bfloat16 and linear(a).dtype == torch.bfloat16
        torch.testing.assert_close(product.float(), (a.bfloat16() @ a.bfloat16()).float())
        assert torch.softmax(product, -1).dtype == torch.float32  # fp32 list, from a bfloat16 input
        assert torch.nn.functional.layer_norm(product, (4,)).dtype == torch.float32
        assert product.sum().dtype == torch.float32 and product.sum(dtype=torch.bfloat16).dtype == torch.bfloat16
        assert torch.relu(product).dtype == torch.bfloat16  # not on a list: its input's dtype
        assert torch.addcmul(a, product, product).dtype == torch.float32  # promote: the widest input
        assert (a + product).dtype == torch.float32  # ordinary type promotion
        assert torch.mm(a.double(), a.double()).dtype == torch.float64  # float64 is never cast
        with torch.autocast("cuda", enabled=False):
            assert not torch.is_autocast_enabled("cuda") and (a @ a).dtype == torch.float32
        with torch.autocast("cuda", dtype=torch.float16):
            assert (a @ a).dtype == torch.float16
        assert (a @ a).dtype == torch.bfloat16
        with pytest.raises(RuntimeError, match="unsafe to autocast"):  # CUDA refuses it in autocast
            torch.nn.functional.binary_cross_entropy(torch.sigmoid(a), torch.ones_like(a))
        linear(a).float().sum().backward()  # gradients flow through the casts, in the parameters' dtype
    assert not torch.is_autocast_enabled("cuda") and (a @ a).dtype == torch.float32
    assert linear.weight.grad.dtype == torch.float32 and linear.weight.grad.device == torch.device("cuda:0")


def test_autocast_cuda_as_a_decorator_and_with_an_unsupported_dtype_warns_and_is_off(fleet):
    @torch.autocast("cuda", dtype=torch.float16)
    def forward(x):
        return x @ x

    assert forward(torch.ones(2, 2, device="cuda:1")).dtype == torch.float16
    with pytest.warns(UserWarning, match="CUDA Autocast only supports"):
        context = torch.autocast("cuda", dtype=torch.float32)
    with context:
        assert (torch.ones(2, 2, device="cuda") @ torch.ones(2, 2, device="cuda")).dtype == torch.float32


def test_a_thread_started_inside_a_fleet_runs_on_its_cards():
    import threading

    seen = {}

    def work():
        seen["available"] = torch.cuda.is_available()
        seen["device"] = torch.ones(2, device="cuda").device
        seen["value"] = (torch.ones(2, device="cuda:0") * 2).sum().item()

    with virtual_gpus("2x64MiB"):
        torch.cuda.set_device(1)
        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
    assert seen == {"available": True, "device": torch.device("cuda:1"), "value": 4.0}


def test_flex_attention_masks_built_for_a_card_live_on_it_and_attention_equals_the_cpu():
    import torch.nn.attention.flex_attention as flex

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    q = torch.randn(1, 1, 128, 16)
    expected = flex.flex_attention(q, q, q, block_mask=flex.create_block_mask(causal, 1, 1, 128, 128, device="cpu"))
    with warnings.catch_warnings(), virtual_gpus("2x64MiB"):
        warnings.simplefilter("ignore")
        mask = flex.create_block_mask(causal, 1, 1, 128, 128, device="cuda:1")
        assert mask.kv_num_blocks.device == torch.device("cuda:1")
        assert flex.create_mask(causal, 1, 1, 16, 16, "cuda:0").device == torch.device("cuda:0")
        on_card = q.to("cuda:1")
        out = flex.flex_attention(on_card, on_card, on_card, block_mask=mask)
        assert out.device == torch.device("cuda:1") and torch.equal(out.cpu(), expected)
        with pytest.raises(RuntimeError, match="same device but got cuda:1 and cpu"):
            flex.flex_attention(on_card, on_card, on_card,
                                block_mask=flex.create_block_mask(causal, 1, 1, 128, 128, device="cpu"))


def test_pickle_keeps_a_card_tensor_on_its_card_and_torch_save_stays_readable_anywhere(fleet, tmp_path):
    import io
    import pickle

    x = torch.arange(4.0, device="cuda:1").requires_grad_()
    before = torch.cuda.memory_allocated(1)
    back = pickle.loads(pickle.dumps(x))
    assert back.device == torch.device("cuda:1") and back.requires_grad and torch.equal(back.cpu(), x.cpu())
    assert torch.cuda.memory_allocated(1) > before  # the copy is charged to the card, as CUDA's would be
    buffer = io.BytesIO()
    torch.save({"x": x}, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True, map_location="cuda:0")["x"].device == torch.device("cuda:0")


def test_unpickling_a_card_tensor_without_its_card_is_cudas_error(tmp_path):
    import pickle

    with virtual_gpus("2x64MiB"):
        data = pickle.dumps(torch.ones(2, device="cuda:1"))
    with pytest.raises(RuntimeError, match="Attempting to deserialize object on a CUDA device.*no virtual fleet"):
        pickle.loads(data)
    with virtual_gpus("1x64MiB"):
        with pytest.raises(RuntimeError, match="virtual GPU 1, and the running fleet has 1 card"):
            pickle.loads(data)


def test_a_cuda_generator_is_a_cpu_generator_on_the_card(fleet):
    generator = torch.Generator("cuda:1")
    assert generator.device == torch.device("cuda:1") and isinstance(generator, torch.Generator)
    assert isinstance(torch.default_generator, torch.Generator)  # plain generators are still generators
    first = torch.randn(4, device="cuda:1", generator=generator.manual_seed(7))
    again = torch.randn(4, device="cuda:1", generator=generator.manual_seed(7))
    assert first.device == torch.device("cuda:1") and torch.equal(first.cpu(), again.cpu())
    assert torch.Generator(device="cuda").device == torch.device("cuda:0")
    with pytest.raises(RuntimeError, match="invalid device ordinal"):
        torch.Generator("cuda:2")
    assert torch.Generator("cpu").device == torch.device("cpu")


def test_record_stream_on_a_card_has_nothing_to_do(fleet):
    x = torch.ones(4, device="cuda:0")
    assert x.record_stream(torch.cuda.current_stream()) is None
    assert torch.cuda.memory_allocated(0) >= x.nbytes


def test_a_thread_outside_the_fleet_is_not_told_the_cards_exist():
    import threading

    started, done, seen = threading.Event(), threading.Event(), {}
    machine = (torch.cuda.is_available(), torch.cuda.device_count())

    def run_fleet():
        with virtual_gpus("2x64MiB"):
            seen["inside"] = (torch.cuda.is_available(), torch.cuda.device_count())
            started.set()
            done.wait(30)

    worker = threading.Thread(target=run_fleet)
    worker.start()
    try:
        assert started.wait(30)
        # this (main) thread is not in the fleet: it sees the machine, not 2 cards it cannot use
        assert (torch.cuda.is_available(), torch.cuda.device_count()) == machine
    finally:
        done.set()
        worker.join(30)
    assert seen["inside"] == (True, 2)


def _rounded(t: torch.Tensor) -> int:
    return (t.untyped_storage().nbytes() + 511) // 512 * 512  # the card's allocator rounding


def test_a_storage_a_composite_op_returns_only_as_a_view_is_charged_to_its_card():
    with virtual_gpus("1x64MiB"):
        x = torch.randn(4, 8, 16, device="cuda:0")
        lin = torch.nn.Linear(16, 32).to("cuda:0")
        w, b = torch.randn(16, 32, device="cuda:0"), torch.randn(32, device="cuda:0")
        for forward in (lambda: lin(x),  # F.linear on a 3-D input with a bias: addmm on a reshape, then a view
                        lambda: torch.addmm(b, x.view(-1, 16), w).view(4, 8, 32)):  # GPT-2's Conv1D
            before = torch.cuda.memory_allocated(0)
            y = forward()
            assert y.device == torch.device("cuda:0")
            assert torch.cuda.memory_allocated(0) - before == _rounded(y) == 4 * 8 * 32 * 4
            z = y.view(32, 32)  # a view of a charged storage: no second charge
            assert torch.cuda.memory_allocated(0) - before == _rounded(y)
            del y, z
            assert torch.cuda.memory_allocated(0) == before


def test_adamw_on_card_parameters_defaults_to_foreach_as_on_cuda():
    from torch.optim.optimizer import _default_to_fused_or_foreach

    torch.manual_seed(0)
    host = [torch.nn.Parameter(torch.randn(1024)) for _ in range(3)]
    for p in host:
        p.grad = torch.randn_like(p)
    with virtual_gpus("1x64MiB"):
        params = [torch.nn.Parameter(p.detach().to("cuda:0")) for p in host]
        for p, h in zip(params, host):
            p.grad = h.grad.to("cuda:0")
        assert _default_to_fused_or_foreach(params, differentiable=False, use_fused=False) == (False, True)
        optimizer = torch.optim.AdamW(params)
        optimizer.step()  # makes the moments
        before = torch.cuda.memory_allocated(0)
        torch.cuda.reset_peak_memory_stats(0)
        optimizer.step()
        # foreach's temporary: sqrt of every second moment at once (the per-tensor loop peaks at 2 of 3)
        assert torch.cuda.max_memory_allocated(0) - before == 3 * 4096
        assert torch.cuda.memory_allocated(0) == before
        assert all(p.device == torch.device("cuda:0") for p in params)
        on_card = [p.detach().cpu() for p in params]
    assert _default_to_fused_or_foreach(params, differentiable=False, use_fused=False) == (False, False)
    reference = torch.optim.AdamW(host, foreach=True)
    reference.step()
    reference.step()
    assert all(torch.equal(c, h.detach()) for c, h in zip(on_card, host))
