"""Whether two models compute the same: ``assert_outputs_close``."""

from __future__ import annotations

from typing import Any

from pytest_llmload._internal.planning.devices import input_device
from pytest_llmload._internal.checks.common import (
    fail,
    default_inputs,
    output_tensor,
    to_device,
    as_batch,
    bnb_layers,
)


RELATIVE_TOLERANCE = {"fp32": 1e-5, "fp16": 1e-2, "bf16": 4e-2, "int8": 8e-2, "nf4": 0.5, "fp4": 0.6}


def model_precision(model) -> str:
    """int8 / nf4 / fp4 for bitsandbytes models, else the float dtype of the parameters."""
    layers = bnb_layers(model)
    if layers:
        layer = next(iter(layers.values()))
        quant_state = getattr(layer.weight, "quant_state", None)
        return getattr(quant_state, "quant_type", None) or ("int8" if "8bit" in type(layer).__name__ else "nf4")
    import torch

    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    for dtype, name in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):
        if dtype in dtypes:
            return name
    return "fp32"


def assert_outputs_close(model, reference, inputs: Any = None, *,
                         atol: float | None = None, rtol: float = 0.0) -> None:
    """Assert that ``model`` (split, offloaded, quantized) computes what ``reference`` computes.

    Compares logits (or ``last_hidden_state``) on ``inputs``: a tensor of token ids (``input_ids``), a
    dict of model inputs, or a tokenizer's ``BatchEncoding`` (default: a small deterministic batch); each
    model gets them on its :func:`input_device`.
    The default ``atol`` is a share of the reference's largest magnitude that depends on the looser
    precision of the two models (:data:`RELATIVE_TOLERANCE`: int8 is not fp32).
    """
    import torch

    batch = as_batch(reference, inputs, "assert_outputs_close") if inputs is not None else default_inputs(reference)
    from pytest_llmload._internal.compat.bitsandbytes import quiet_int8_matmul

    with torch.no_grad(), quiet_int8_matmul():
        want = output_tensor(reference(**to_device(batch, input_device(reference)))).float().cpu()
        got = output_tensor(model(**to_device(batch, input_device(model)))).float().cpu()
    if got.shape != want.shape:
        fail(f"outputs differ in shape: {tuple(got.shape)} vs reference {tuple(want.shape)}")
    precisions = (model_precision(model), model_precision(reference))
    if atol is None:
        share = max(RELATIVE_TOLERANCE.get(p, 1e-5) for p in precisions)
        atol = share * float(want.abs().max())
        how = f"default for {'/'.join(sorted(set(precisions)))}: {share:g} x max|reference|"
    else:
        how = "given"
    diff = (got - want).abs()
    allowed = atol + rtol * want.abs()
    if not torch.isfinite(got).all():
        position = tuple(int(i) for i in torch.nonzero(~torch.isfinite(got))[0])
        fail(f"outputs are not finite, first at position {position}")
    over = diff > allowed
    if over.any():
        worst = int(torch.argmax(diff - allowed))
        position = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), diff.shape))
        fail(f"outputs differ from the reference: {int(over.sum())} of {diff.numel()} values out of tolerance",
              f"  worst at position {position}: {got[position]:.6g} vs {want[position]:.6g} "
              f"(difference {diff[position]:.3g}, allowed {allowed[position]:.3g}; atol {how}, rtol {rtol:g})")
