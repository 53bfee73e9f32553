"""Whether a k-bit model can be fine-tuned: ``assert_int8_trainable``."""

from __future__ import annotations

import warnings
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


def _quantized_weight_ids(layers: dict[str, Any]) -> set[int]:
    return {id(m.weight) for m in layers.values()}


def _is_adapter(name: str) -> bool:
    return any(key in name for key in ("lora_", "modules_to_save", "adapter", "prompt_encoder", "ia3_", "vera_"))


def assert_int8_trainable(model, inputs: Any = None) -> None:
    """Assert that a quantized (int8 or 4-bit) model is set up for adapter training, and that it trains.

    Checks, in order: the model is really quantized; non-quantized parameters are fp32 (what
    ``prepare_model_for_kbit_training`` does); with gradient checkpointing, the input embeddings'
    outputs require grad or checkpointing is non-reentrant; there are trainable adapter parameters and
    every base weight is frozen; one forward and backward on a tiny batch gives finite gradients that
    are non-zero where they must be (LoRA B matrices; A gets no gradient while B is still zero), and
    none on frozen weights. Gradients are cleared afterwards. ``inputs`` (default: a small deterministic
    batch) takes the forms :func:`assert_outputs_close` takes.
    """
    import torch

    layers = bnb_layers(model)
    if not layers:
        fail("model is not quantized: no bitsandbytes Linear8bitLt or Linear4bit layer found",
              "  fix: load it with quantization_config=BitsAndBytesConfig(load_in_8bit=True) (or load_in_4bit=True), "
              "or precision='int8'/'nf4' in pytest-llmload")
    quantized_ids = _quantized_weight_ids(layers)
    named = list(model.named_parameters())

    half = [n for n, p in named if id(p) not in quantized_ids and p.dtype in (torch.float16, torch.bfloat16)]
    if half:
        fail(f"{len(half)} non-quantized parameter(s) are not fp32 (e.g. {', '.join(half[:3])}); "
              "k-bit training is unstable in half precision",
              "  fix: call peft.prepare_model_for_kbit_training(model) before get_peft_model")

    checkpointing = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    if checkpointing:
        reentrant = any(_uses_reentrant(m) for m in checkpointing)
        if reentrant and not _embeddings_require_grad(model):
            fail("gradient checkpointing is reentrant, but the input embeddings' outputs do not require grad: "
                  "no gradient reaches the adapters inside checkpointed layers",
                  "  fix: call peft.prepare_model_for_kbit_training(model) (it calls "
                  f"model.enable_input_require_grads()), or {_checkpointing_call()}")

    trainable = [(n, p) for n, p in named if p.requires_grad]
    adapters = [(n, p) for n, p in trainable if _is_adapter(n)]
    if not adapters:
        fail("no trainable adapter parameters: a quantized model can only be fine-tuned through adapters",
              "  fix: model = peft.get_peft_model(model, LoraConfig(...)) after prepare_model_for_kbit_training")
    unfrozen = [n for n, _ in trainable if not _is_adapter(n)]
    if unfrozen:
        fail(f"{len(unfrozen)} base parameter(s) are trainable (e.g. {', '.join(unfrozen[:3])}); "
              "only adapter weights should be", "  fix: call peft.prepare_model_for_kbit_training(model) "
              "before get_peft_model (it freezes the base model)")

    was_training = model.training
    model.train()
    model.zero_grad(set_to_none=True)
    try:
        batch = (to_device(as_batch(model, inputs, "assert_int8_trainable"), input_device(model)) if inputs is not None
                 else default_inputs(model))
        from pytest_llmload._internal.compat.bitsandbytes import quiet_int8_matmul

        with quiet_int8_matmul():
            output = model(**batch)
            loss = getattr(output, "loss", None)
            if loss is None:
                loss = output_tensor(output).float().pow(2).mean()
            loss.backward()
        if not torch.isfinite(loss.detach()).all():
            fail(f"the loss of one forward pass is not finite ({loss.item()})")
        missing, zero, bad = [], [], []
        for name, param in adapters:
            grad = param.grad
            must_move = "lora_A" not in name or _lora_b_is_nonzero(model, name)
            if grad is None:
                if must_move:
                    missing.append(name)
                continue
            if not torch.isfinite(grad).all():
                bad.append(name)
            elif must_move and not grad.abs().sum() > 0:
                zero.append(name)
        frozen_with_grad = [n for n, p in named if not p.requires_grad and p.grad is not None]
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if missing:
        fail(f"{len(missing)} adapter parameter(s) got no gradient after backward (e.g. {', '.join(missing[:3])})",
              "  usual cause: reentrant gradient checkpointing without enable_input_require_grads; "
              "fix: call peft.prepare_model_for_kbit_training(model) before get_peft_model")
    if bad:
        fail(f"non-finite gradients on {', '.join(bad[:3])}", "  usual cause: fp16 layer norms or an fp16 "
              "loss; fix: call peft.prepare_model_for_kbit_training(model)")
    if zero:
        fail(f"{len(zero)} adapter parameter(s) got an all-zero gradient (e.g. {', '.join(zero[:3])})",
              "  usual cause: the adapters are not on the path from the inputs to the loss (wrong target_modules?)")
    if frozen_with_grad:
        fail(f"frozen parameter(s) received gradients: {', '.join(frozen_with_grad[:3])}")


def _uses_reentrant(module) -> bool:
    func = getattr(module, "_gradient_checkpointing_func", None)
    keywords = getattr(func, "keywords", None) or {}
    return bool(keywords.get("use_reentrant", True))


def _embeddings_require_grad(model) -> bool:
    import torch

    embeddings = model.get_input_embeddings()
    device = embeddings.weight.device if embeddings.weight.device.type != "meta" else input_device(model)
    with torch.enable_grad():
        out = embeddings(torch.ones(1, 2, dtype=torch.long, device=device))
    return bool(out.requires_grad)


def _lora_b_is_nonzero(model, a_name: str) -> bool:
    b_name = a_name.replace("lora_A", "lora_B")
    for name, param in model.named_parameters():
        if name == b_name:
            return bool(param.detach().abs().sum() > 0)
    return False


def prepare_model_for_int8_training(model, **kwargs):
    """The seed notes' ``prepare_model_for_int8_training``, removed from peft in 0.10.

    Calls ``peft.prepare_model_for_kbit_training`` (same job: casts non-int8 parameters to fp32,
    makes the input embeddings' outputs require grad, enables gradient checkpointing).
    """
    warnings.warn("prepare_model_for_int8_training was removed from peft in 0.10; use "
                  "peft.prepare_model_for_kbit_training", DeprecationWarning, stacklevel=2)
    from pytest_llmload._internal.compat.peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, **kwargs)


def _checkpointing_call() -> str:
    from pytest_llmload._internal.compat.transformers import checkpointing_method

    name = checkpointing_method()
    return f"{name}({name.replace('_enable', '_kwargs')}={{'use_reentrant': False}})"
