"""Helpers the checks share: failing with a headline, and the small batch of inputs a check runs."""

from __future__ import annotations

from typing import Any

from pytest_llmload._internal.planning.devices import input_device


def fail(headline: str, *details: str) -> None:
    raise AssertionError("\n".join([headline, *[d for d in details if d]]))


def default_inputs(model, batch: int = 2, length: int = 8) -> dict[str, Any]:
    """A small deterministic batch of token ids for ``model`` (with decoder ids for encoder-decoders)."""
    import torch

    config = model.config
    vocab = getattr(config, "vocab_size", None) or 100
    device = input_device(model)
    ids = (torch.arange(batch * length).reshape(batch, length) * 7 + 3) % max(vocab - 1, 1) + 1
    inputs = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids[:, : max(length // 2, 1)].to(device)
    return inputs


def output_tensor(output) -> Any:
    for name in ("logits", "last_hidden_state"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


def to_device(batch: dict[str, Any], device) -> dict[str, Any]:
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


_ACCEPTED_INPUTS = ("a tensor of token ids (input_ids), a dict of model inputs such as {'input_ids': ..., "
                    "'attention_mask': ...}, or a tokenizer's BatchEncoding")


def as_batch(model, inputs: Any, where: str) -> dict[str, Any]:
    """``inputs`` as keyword arguments of ``model``: a tensor is ``input_ids`` (one sequence if 1-D), a dict
    or ``BatchEncoding`` is used as it is; an encoder-decoder without decoder inputs gets the start of the
    input ids as ``decoder_input_ids``, as :func:`default_inputs` does. Anything else is a ``TypeError``."""
    import collections.abc

    import torch

    if isinstance(inputs, torch.Tensor):
        token_ids = not (inputs.is_floating_point() or inputs.is_complex() or inputs.dtype == torch.bool)
        if not token_ids or inputs.dim() not in (1, 2):
            raise TypeError(f"{where}: inputs is a {inputs.dim()}-D {inputs.dtype} tensor; a tensor is taken as "
                            "input_ids and must hold integer token ids, shaped (batch, length) or (length,)")
        batch: dict[str, Any] = {"input_ids": inputs if inputs.dim() == 2 else inputs.unsqueeze(0)}
    elif isinstance(inputs, collections.abc.Mapping):  # a dict, or a BatchEncoding (a UserDict)
        batch = dict(inputs.items())
        bad = [k for k in batch if not isinstance(k, str)]
        if bad or not batch:
            raise TypeError(f"{where}: inputs {'has the key ' + repr(bad[0]) if bad else 'is empty'}; "
                            f"expected {_ACCEPTED_INPUTS}")
    else:
        raise TypeError(f"{where}: inputs of type {type(inputs).__module__}.{type(inputs).__qualname__} "
                        f"are not accepted; expected {_ACCEPTED_INPUTS}")
    config = getattr(model, "config", None)
    ids = batch.get("input_ids")
    if (getattr(config, "is_encoder_decoder", False) and isinstance(ids, torch.Tensor) and ids.dim() == 2
            and not {"decoder_input_ids", "decoder_inputs_embeds", "labels"} & set(batch)):
        batch["decoder_input_ids"] = ids[:, : max(ids.shape[1] // 2, 1)]
    return batch


def bnb_layers(model) -> dict[str, Any]:
    try:
        from pytest_llmload._internal.compat.bitsandbytes import import_bitsandbytes
        bnb = import_bitsandbytes()
    except ImportError:
        return {}
    return {n: m for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))}
