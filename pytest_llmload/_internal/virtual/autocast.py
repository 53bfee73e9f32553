"""``torch.autocast("cuda", dtype=...)`` on virtual cards: CUDA's cast rules, computed on the CPU.

A CPU build keeps CUDA's autocast *state* (``torch.set_autocast_enabled("cuda", ...)``,
``torch.is_autocast_enabled("cuda")``, ``torch.get_autocast_dtype("cuda")`` all work), but its cast kernels are
registered for CUDA tensors only, and a card's tensors are CPU tensors. So while a CUDA autocast region is
entered, a torch-function mode casts the inputs of each call by CUDA's policy for that op (the lists of
``aten/src/ATen/autocast_mode.cpp``, by op name), and the call itself runs in the fleet as any other. The
output dtypes are CUDA's; the values are the CPU's arithmetic in those dtypes.

Like CUDA's, the policy applies to the op a call names (``F.linear``, ``x @ w``, ``F.softmax``): what runs inside
that op is not re-cast.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

# ops that run in the autocast dtype (CUDA's lower_precision_fp list)
LOWER_PRECISION = frozenset({
    "__matmul__", "__rmatmul__", "addbmm", "addmm", "addmv", "addr", "baddbmm", "bmm", "chain_matmul", "multi_dot",
    "conv1d", "conv2d", "conv3d", "conv_tbc", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "_convolution", "convolution", "prelu", "linear", "matmul", "mm", "mv", "lstm_cell", "gru_cell",
    "rnn_tanh_cell", "rnn_relu_cell", "scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
})
# ops that run in float32 (CUDA's fp32 and fp32_set_opt_dtype lists)
FLOAT32 = frozenset({
    "__pow__", "__rpow__", "__rdiv__", "__rtruediv__", "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log",
    "log10", "log2", "log1p", "reciprocal", "rsqrt", "sinh", "tan", "pow", "softplus", "layer_norm",
    "native_layer_norm", "group_norm", "frobenius_norm", "nuclear_norm", "cosine_similarity", "poisson_nll_loss",
    "cosine_embedding_loss", "nll_loss", "nll_loss2d", "hinge_embedding_loss", "kl_div", "l1_loss",
    "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss", "multilabel_margin_loss",
    "soft_margin_loss", "triplet_margin_loss", "multi_margin_loss", "binary_cross_entropy_with_logits", "dist",
    "pdist", "cdist", "renorm", "logsumexp", "normalize", "cross_entropy", "cross_entropy_loss",
    "prod", "softmax", "log_softmax", "softmin", "cumprod", "cumsum", "linalg_vector_norm", "linalg_matrix_norm",
    "sum", "norm",
})
# ops whose dtype argument, when given, is used as is (fp32_set_opt_dtype)
_OPTIONAL_DTYPE = frozenset({"prod", "softmax", "log_softmax", "softmin", "cumprod", "cumsum", "sum",
                             "linalg_vector_norm", "linalg_matrix_norm"})
# ops that run in the widest floating type of their inputs
PROMOTE = frozenset({"addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "vdot", "grid_sampler",
                     "grid_sample", "index_put", "tensordot", "scatter_add", "stack", "cat", "index_copy"})
# CUDA refuses these inside autocast, with this message
_BANNED = ("torch.nn.functional.binary_cross_entropy and torch.nn.BCELoss are unsafe to autocast.\n"
           "Many models use a sigmoid layer right before the binary cross entropy layer.\n"
           "In this case, combine the two layers using torch.nn.functional.binary_cross_entropy_with_logits\n"
           "or torch.nn.BCEWithLogitsLoss.  binary_cross_entropy_with_logits and BCEWithLogits are\n"
           "safe to autocast.")

_EXCLUDED = (torch.float64,)


def _eligible(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype not in _EXCLUDED


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if _eligible(value):
        return value if value.dtype == dtype else value.to(dtype)
    if type(value) in (list, tuple):
        return type(value)(_cast(item, dtype) for item in value)
    return value


def _widest(values, widest: torch.dtype | None = None) -> torch.dtype | None:
    for value in values:
        if _eligible(value):
            widest = value.dtype if widest is None else torch.promote_types(widest, value.dtype)
        elif type(value) in (list, tuple):
            widest = _widest(value, widest)
    return widest


class CudaAutocastMode(TorchFunctionMode):
    """Casts each call's inputs by CUDA's autocast policy while ``torch.is_autocast_enabled("cuda")``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not torch.is_autocast_enabled("cuda"):
            return func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name in LOWER_PRECISION:
            dtype = torch.get_autocast_dtype("cuda")
        elif name in FLOAT32:
            if name in _OPTIONAL_DTYPE and kwargs.get("dtype") is not None:
                return func(*args, **kwargs)
            dtype = torch.float32
        elif name in PROMOTE:
            dtype = _widest(list(args) + list(kwargs.values()))
            if dtype is None:
                return func(*args, **kwargs)
        elif name in ("binary_cross_entropy", "BCELoss"):
            raise RuntimeError(_BANNED)
        else:
            return func(*args, **kwargs)
        args = tuple(_cast(value, dtype) for value in args)
        kwargs = {key: _cast(value, dtype) for key, value in kwargs.items()}
        return func(*args, **kwargs)  # this mode is off while it runs: what runs inside the op is not re-cast


def enter(state, autocast_object) -> None:
    """Enter a ``torch.autocast("cuda", ...)`` region in a fleet (``state``: the fleet's thread state)."""
    stack = getattr(state, "autocast", None)
    if stack is None:
        stack = state.autocast = []
    previous = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
    mode = None
    if not any(entry[1] is not None for entry in stack):
        mode = CudaAutocastMode()
        mode.__enter__()
    stack.append((previous, mode))
    torch.set_autocast_enabled("cuda", bool(autocast_object._enabled))
    if autocast_object._enabled:
        torch.set_autocast_dtype("cuda", autocast_object.fast_dtype)


def exit(state) -> None:
    stack = getattr(state, "autocast", None)
    if not stack:
        return
    (enabled, dtype), mode = stack.pop()
    torch.set_autocast_enabled("cuda", enabled)
    torch.set_autocast_dtype("cuda", dtype)
    if mode is not None:
        mode.__exit__(None, None, None)


def autocast_targets(thread_state) -> list[tuple[Any, str, Any]]:
    """The fleet's patches of ``torch.autocast``: a CUDA autocast builds as on CUDA, and entering it starts the
    casts above (leaving it restores the previous state)."""
    autocast = torch.amp.autocast_mode.autocast
    original_init, original_enter, original_exit = autocast.__init__, autocast.__enter__, autocast.__exit__

    @functools.wraps(original_init)
    def __init__(self, device_type, dtype=None, enabled=True, cache_enabled=None):
        if device_type != "cuda":
            return original_init(self, device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)
        if dtype is None:
            dtype = torch.get_autocast_dtype("cuda")
        if enabled and dtype not in (torch.float16, torch.bfloat16):  # CUDA's own warning, then disabled
            import warnings

            warnings.warn("In CUDA autocast, but the target dtype is not supported. Disabling autocast.\n"
                          "CUDA Autocast only supports dtypes of torch.float16 and torch.bfloat16 currently.",
                          stacklevel=2)
            enabled = False
        self.device = "cuda"
        self.fast_dtype = dtype
        self._enabled = bool(enabled)
        self._cache_enabled = cache_enabled if cache_enabled is not None else torch.is_autocast_cache_enabled()
        self._virtual_cuda = True
        return None

    @functools.wraps(original_enter)
    def __enter__(self):
        if getattr(self, "_virtual_cuda", False):
            enter(thread_state(), self)
            return self
        return original_enter(self)

    @functools.wraps(original_exit)
    def __exit__(self, *exc):
        if getattr(self, "_virtual_cuda", False):
            exit(thread_state())
            return False
        return original_exit(self, *exc)

    return [(autocast, "__init__", __init__), (autocast, "__enter__", __enter__), (autocast, "__exit__", __exit__)]
