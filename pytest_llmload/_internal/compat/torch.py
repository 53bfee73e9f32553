"""torch internals the virtual GPU fleet relies on, checked by presence (not by a torch version pin)."""

from __future__ import annotations

from pytest_llmload._internal.compat import exists, missing_internal

# Every private torch name the fleet (virtual/mode.py, ops.py, moves.py, backward.py, tensor.py, cuda.py, patches.py) uses. Checked when a fleet
# starts, before those modules import; a missing one is one line naming it.
FLEET_INTERNALS = (
    "torch._C.DisableTorchFunction",
    "torch._C._disabled_torch_function_impl",
    "torch._C._len_torch_dispatch_stack",
    "torch._C._nn._parse_to",
    "torch._C.TensorBase.device",
    "torch._has_compatible_shallow_copy_type",
    "torch.overrides.TorchFunctionMode",
    "torch.utils._python_dispatch.TorchDispatchMode",
    "torch.utils._python_dispatch._disable_current_modes",
    "torch.autograd._make_grads",
    "torch.autograd._tensor_or_tensors_to_tuple",
    "torch.autograd.graph._engine_run_backward",
    "torch.utils.checkpoint._allowed_determinism_checks_to_fns",
    "torch.utils.checkpoint._DEFAULT_DETERMINISM_MODE",
    "torch.amp.autocast_mode.autocast",
    "torch.set_autocast_dtype",
    "torch.get_autocast_dtype",
    "torch._C.Generator",
    "torch.accelerator",
    "torch._dynamo.eval_frame.OptimizedModule",
    "torch._dynamo.eval_frame.DisableContext",
    "torch._dynamo.config.disable",
    "torch._C._functorch.maybe_current_level",
    "torch._utils._get_device_index",
    "torch.utils._pytree.tree_map_only",
    "torch.utils._device.DeviceContext",
    "torch.utils._device.CURRENT_DEVICE",
    "torch.nn.parallel._functions.Scatter",
    "torch.nn.parallel.comm.broadcast_coalesced",
    "torch.nn.parallel.comm.reduce_add_coalesced",
    "torch.nn.parallel.comm.scatter",
    "torch.nn.parallel.comm.gather",
    "torch.nn.DataParallel.parallel_apply",
)


def check_fleet_internals(names: tuple[str, ...] = FLEET_INTERNALS) -> None:
    """Raise :class:`MissingInternalError` for the first internal this torch lacks."""
    for name in names:
        if not exists(name):
            raise missing_internal("virtual GPUs need", "torch", name)


def eager_optimized_module(module):
    """What ``torch.compile(module)`` returns (an ``OptimizedModule`` with ``_orig_mod``), running eagerly:
    dynamo disabled for its forward (a virtual card's tensors cannot be traced)."""
    from torch._dynamo.eval_frame import DisableContext, OptimizedModule

    return OptimizedModule(module, DisableContext())


def default_store():
    """The key-value store of the default process group (``distributed_c10d._get_default_store``): the
    lockstep guard keeps its per-test records there."""
    from torch.distributed import distributed_c10d

    get = getattr(distributed_c10d, "_get_default_store", None)
    if get is None:
        raise missing_internal("the distributed lockstep guard needs", "torch",
                               "torch.distributed.distributed_c10d._get_default_store")
    return get()
