"""Training memory, estimated from the config: weights, gradients, optimizer state, activations, CUDA context.

Formulas of :func:`estimate_training_memory` (bytes; b batch, s sequence, h hidden size, I MLP size
(x experts per token for mixture-of-experts), V vocabulary, L layers, e bytes per activation element):

- weights: transformers' own per-module sizes of the meta model in the precision (quantized sizes
  for int8/4-bit), plus LoRA adapters in fp32: r x (in + out) per targeted linear layer (GPT-2's
  Conv1D and embeddings alike), the targets being peft's default for the model type unless given;
- gradients: one per trainable parameter, in its dtype (all float weights for full fine-tuning;
  only the adapters with ``lora=``);
- optimizer state: AdamW keeps two moments per trainable parameter in the parameter's dtype, as torch's
  ``zeros_like(param)`` makes them (8 bytes for fp32 weights and LoRA's fp32 adapters, 4 for bf16/fp16
  weights: the calibration measured 1.6x less than the fp32 count for bf16 weights); 8-bit AdamW
  (bitsandbytes) two 1-byte moments plus a fp32 scale per block of 256; SGD with momentum one buffer;
  plain SGD nothing;
- activations saved for backward, after Korthikanti et al. 2022 ("Reducing Activation Recomputation
  in Large Transformer Models", sec. 4.1) with the s^2 attention-score term dropped (SDPA and flash
  attention keep no score matrix): per layer e*b*s*(10h + 4I); with dropout in the config, plus
  2*(1+e)*b*s*h (two residual dropouts: mask and output); with eager attention or attention dropout,
  plus (2e+1)*b*a*s^2 (scores, softmax, mask; a heads); the head keeps
  4*b*s*(V + 4h) (fp32 logits for the loss). With gradient checkpointing only each layer's input
  (e*b*s*h per layer) is stored, plus one layer recomputed at a time during backward.
  Measured against autograd's saved tensors on the built-in decoder and encoder models: within 15%
  (stated tolerance 25%); encoder-decoders (cross-attention, T5's position bias) are underestimated by
  up to ~2x.
- optimizer step: torch's (foreach) Adam/AdamW allocate one moment-sized temporary during ``step()``, when
  the activations are already freed: the total counts the larger of the two (measured on GPT-2 124M with
  two AdamW steps on a virtual card: without it the estimate was 13-18% under the peak);
- CUDA context: per GPU that the device map uses (hundreds of MB before any tensor exists).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pytest_llmload._internal.planning.devices import device_label
from pytest_llmload.errors import LLMLoadUsageError
from pytest_llmload._internal.config.numbers import format_size

OPTIMIZER_BYTES_PER_PARAM = {"adamw": 8.0, "adam": 8.0, "adamw8bit": 2.0 + 8.0 / 256, "sgd": 0.0,
                             "sgd-momentum": 4.0, "none": 0.0}
# torch's AdamW/Adam/SGD keep their moments in the parameter's dtype (``zeros_like(param)``): two, or one
OPTIMIZER_MOMENTS = {"adamw": 2, "adam": 2, "sgd-momentum": 1, "sgd": 0, "none": 0}
ACTIVATION_TOLERANCE = 0.25


@dataclass
class MemoryEstimate:
    """A training-memory breakdown in bytes, with totals per device when a device map was given.

    ``details`` holds what the estimate assumed (precision, optimizer, batch size, sequence length,
    LoRA, device map, CUDA context per GPU); ``notes`` what a reader should know about the split.
    """

    weights: int
    gradients: int
    optimizer: int
    activations: int
    cuda_context: int
    trainable_parameters: int
    parameters: int
    activations_stored: int = 0
    activations_recompute: int = 0
    per_device: dict[Any, int] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    optimizer_step: int = 0  # what the optimizer's step allocates for a moment, after the activations are gone

    @property
    def total(self) -> int:
        """The peak: weights, gradients and optimizer state, plus the larger of the activations (forward and
        backward) and the optimizer step's temporaries (they are not alive at once), plus CUDA contexts."""
        return (self.weights + self.gradients + self.optimizer + max(self.activations, self.optimizer_step)
                + self.cuda_context)

    def to_dict(self) -> dict[str, Any]:
        return {
            "weights": self.weights, "gradients": self.gradients, "optimizer": self.optimizer,
            "activations": self.activations, "optimizer_step": self.optimizer_step,
            "cuda_context": self.cuda_context, "total": self.total,
            "parameters": self.parameters, "trainable_parameters": self.trainable_parameters,
            "activations_stored": self.activations_stored, "activations_recompute": self.activations_recompute,
            "per_device": {str(k): v for k, v in self.per_device.items()},
            "assumptions": dict(self.details), "notes": list(self.notes),
        }

    def assumed(self) -> str:
        """The assumptions in one line: batch, sequence, precision, optimizer, LoRA, checkpointing."""
        d = self.details
        if not d:
            return ""
        weights = d.get("weights_dtype")
        precision = d.get("precision", "?")
        precision_text = f"{weights} weights (precision {precision})" if weights and precision == "auto" else (
            f"{precision} weights")
        lora = d.get("lora")
        if lora:
            targets = lora.get("target_modules")
            targets = targets if isinstance(targets, str) else ",".join(targets or [])
            lora_text = f"LoRA r={lora.get('r')} on {targets}" + (
                f" ({lora['targets_from']})" if lora.get("targets_from") else "")
        else:
            lora_text = "full fine-tuning (all weights trained)"
        parts = [
            f"batch size {d.get('batch_size')}", f"sequence length {d.get('seq_len')}", precision_text,
            f"optimizer {d.get('optimizer')}", lora_text,
            "gradient checkpointing" if d.get("gradient_checkpointing") else "no gradient checkpointing",
        ]
        return ", ".join(parts)

    def table(self) -> str:
        context = self.details.get("cuda_context_per_gpu")
        gpus = self.details.get("gpus", [])
        context_text = (f"{len(gpus)} GPU(s) x {format_size(context)}" if gpus and context is not None
                        else "no GPU in the device map")
        rows = [("weights", self.weights, ""), ("gradients", self.gradients, ""),
                ("optimizer state", self.optimizer, ""), ("activations", self.activations, ""),
                *([("optimizer step", self.optimizer_step, "temporary; the total counts it or the activations, "
                    "the larger")] if self.optimizer_step else []),
                ("CUDA context", self.cuda_context, context_text), ("total", self.total, "")]
        lines = [f"training memory: {self.trainable_parameters:,} of {self.parameters:,} parameters trainable"]
        if self.details:
            lines.append(f"assumed: {self.assumed()}")
        lines += [f"  {name:<16}{format_size(size):>12}" + (f"  ({extra})" if extra else "")
                  for name, size, extra in rows]
        for device, size in self.per_device.items():
            extra = "  (offloaded weights only)" if device == "disk" else ""
            lines.append(f"  {'on ' + device_label(device):<16}{format_size(size):>12}{extra}")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def _config_numbers(config) -> dict[str, int]:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config

    def first(*names, default=None):
        for name in names:
            value = getattr(text, name, None)
            if value:
                return int(value)
        return default

    hidden = first("hidden_size", "n_embd", "d_model")
    layers = first("num_hidden_layers", "n_layer", "num_layers")
    if getattr(text, "is_encoder_decoder", False):
        layers = layers + first("num_decoder_layers", default=layers)
    experts_per_token = first("num_experts_per_tok", "moe_topk", default=1)
    intermediate = first("intermediate_size", "n_inner", "d_ff", "ffn_dim", default=4 * hidden)
    dropouts = [getattr(text, k, 0) or 0 for k in ("hidden_dropout_prob", "resid_pdrop", "dropout_rate",
                                                   "hidden_dropout", "dropout")]
    attention_dropouts = [getattr(text, k, 0) or 0 for k in ("attention_probs_dropout_prob", "attn_pdrop",
                                                             "attention_dropout", "dropout_rate")]
    implementation = getattr(text, "_attn_implementation", None) or "sdpa"
    return {"hidden": hidden, "layers": layers, "intermediate": intermediate * experts_per_token,
            "vocab": first("vocab_size"), "heads": first("num_attention_heads", "n_head", "num_heads"),
            "dropout": max(dropouts) > 0,
            "scores": implementation == "eager" or max(attention_dropouts) > 0}


# -- LoRA ------------------------------------------------------------------------------------------



class LoraTargetsError(LLMLoadUsageError):
    """LoRA target modules that match no layer of the model (or no default for its type)."""

    def __init__(self, message: str, *, targets: Any, layer_names: list[str], model_type: str | None) -> None:
        super().__init__(message)
        self.targets, self.layer_names, self.model_type = targets, layer_names, model_type


def default_lora_targets(config: Any) -> Any:
    """The LoRA target modules peft picks when none are given: its mapping by ``config.model_type``
    (BERT: query, value; Llama: q_proj, v_proj; GPT-2: c_attn), or None for a type peft does not know."""
    from pytest_llmload._internal.compat.peft import lora_target_mapping

    targets = lora_target_mapping().get(getattr(config, "model_type", None))
    return list(targets) if isinstance(targets, (list, tuple, set)) else targets


def _adaptable_layers(network) -> list[tuple[str, int, int]]:
    """``(name, in, out)`` of the layers LoRA can wrap: Linear (incl. bitsandbytes' subclasses), GPT-2's Conv1D,
    Embedding; the output head is kept apart by peft's ``all-linear`` only."""
    import torch

    layers = []
    for name, module in network.named_modules():
        if isinstance(module, torch.nn.Linear):
            layers.append((name, int(module.in_features), int(module.out_features)))
        elif type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
            layers.append((name, int(module.weight.shape[0]), int(module.weight.shape[1])))
        elif isinstance(module, torch.nn.Embedding):
            layers.append((name, int(module.num_embeddings), int(module.embedding_dim)))
    return layers


def _lora_parameters(network, lora: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """Adapter parameters for ``lora`` (matched as peft matches target modules), and what was assumed."""
    import re

    r = lora.get("r", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise LLMLoadUsageError(f"invalid lora r {r!r}: expected an int >= 1 (the adapters' rank)")
    model_type = getattr(network.config, "model_type", None)
    targets = lora.get("target_modules")
    source = "given"
    if not targets:
        targets = default_lora_targets(network.config)
        source = f"peft's default for {model_type}"
        if not targets:
            raise LoraTargetsError(
                f"no default LoRA target modules for model type {model_type!r} (peft has none): pass "
                f"lora={{'target_modules': [...]}}; its layers: {', '.join(_layer_kinds(network))}",
                targets=None, layer_names=_layer_kinds(network), model_type=model_type)
    layers = _adaptable_layers(network)
    head = network.get_output_embeddings() if hasattr(network, "get_output_embeddings") else None
    head_names = {n for n, m in network.named_modules() if m is head} if head is not None else set()
    if isinstance(targets, str) and targets == "all-linear":
        matches = [(n, i, o) for n, i, o in layers if n not in head_names and not _is_embedding(network, n)]
    elif isinstance(targets, str) and not re.fullmatch(r"[\w.]+", targets):
        matches = [layer for layer in layers if re.fullmatch(targets, layer[0])]
    else:
        names = [targets] if isinstance(targets, str) else [str(t) for t in targets]
        targets = names
        matches = [layer for layer in layers if any(layer[0] == t or layer[0].endswith("." + t) for t in names)]
    count = sum(r * (i + o) for _, i, o in matches)
    if not count:
        kinds = _layer_kinds(network)
        raise LoraTargetsError(
            f"lora target_modules {targets!r} match no linear layer of {type(network).__name__} "
            f"(its layers: {', '.join(kinds)}); pass lora={{'target_modules': [...]}} with some of them",
            targets=targets, layer_names=kinds, model_type=model_type)
    return count, {"r": r, "target_modules": targets, "targets_from": source, "layers": len(matches)}


def _is_embedding(network, name: str) -> bool:
    import torch

    return isinstance(network.get_submodule(name), torch.nn.Embedding)


def _layer_kinds(network, limit: int = 12) -> list[str]:
    """The distinct last names of the layers LoRA can wrap, in model order (``q_proj``, ``v_proj``...)."""
    kinds: list[str] = []
    for name, _, _ in _adaptable_layers(network):
        last = name.rsplit(".", 1)[-1]
        if last not in kinds:
            kinds.append(last)
    return kinds[:limit] + (["..."] if len(kinds) > limit else [])


# -- the estimate ----------------------------------------------------------------------------------


def _custom_map(device_map: Any) -> dict[str, Any]:
    """A device map as a dict; strategies and ``process`` are decided at load time and cannot be split."""
    from pytest_llmload._internal.config.specs import parse_device_map

    spec = parse_device_map(device_map)
    if spec.kind in ("strategy", "process"):
        raise LLMLoadUsageError(
            f"device_map={device_map!r} is decided at load time, so the estimate cannot split it: plan it with "
            f"plan_device_map(model, {spec.value!r}, gpus=...) and pass plan.device_map, or pass a custom map"
            if spec.kind == "strategy" else
            "device_map='process' puts one copy on each process's own GPU: estimate one process with device_map=0"
        )
    return spec.as_user_value()


def estimate_training_memory(
    model: Any,
    *,
    precision: str = "auto",
    optimizer: str = "adamw",
    batch_size: int = 1,
    seq_len: int = 512,
    gradient_checkpointing: bool = False,
    lora: dict[str, Any] | None = None,
    device_map: Any = None,
    cuda_context: int | str = 500 * 2**20,
    trust_remote_code: bool = False,
) -> MemoryEstimate:
    """What one training step of ``model`` needs, from the config alone (meta device, no weights).

    ``lora={"r": 8}`` trains adapters only (required for int8/4-bit); without ``target_modules`` the
    targets are peft's default for the model type (Llama: q_proj, v_proj; BERT: query, value; GPT-2:
    c_attn), and ``"all-linear"`` and regular expressions work as in peft. ``device_map`` (a custom
    map or a single device; plan strategies first with :func:`plan_device_map`) splits the total per
    device: weights, gradients and optimizer state by where each module lives, activations in
    proportion, a CUDA context per GPU. Without one, no GPU (and no CUDA context) is counted. See the
    module docstring for the formulas.
    """
    from pytest_llmload._internal.planning.planner import meta_model, module_sizes
    from pytest_llmload._internal.config.numbers import parse_size
    from pytest_llmload._internal.config.specs import QUANTIZED_PRECISIONS, parse_precision

    precision = parse_precision(precision)
    if optimizer not in OPTIMIZER_BYTES_PER_PARAM:
        raise LLMLoadUsageError(f"unknown optimizer {optimizer!r}: expected one of {', '.join(OPTIMIZER_BYTES_PER_PARAM)}")
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LLMLoadUsageError(f"invalid {name} {value!r}: expected an int >= 1")
    if precision in QUANTIZED_PRECISIONS and lora is None:
        raise LLMLoadUsageError(f"{precision} weights cannot be trained directly: pass lora={{'r': 8, ...}}")
    if lora is not None and not isinstance(lora, dict):
        raise LLMLoadUsageError(f"invalid lora {lora!r}: expected a dict such as {{'r': 8}}")
    context = parse_size(cuda_context)
    if device_map is not None:
        device_map = _custom_map(device_map)
    network, quantizer = meta_model(model, precision, trust_remote_code=trust_remote_code)
    network.tie_weights()  # as from_pretrained does: a tied weight is one parameter, trained once
    sizes = module_sizes(network, quantizer=quantizer)
    weights = sizes[""]
    float_params = [p for p in network.parameters() if p.is_floating_point()]
    parameters = sum(p.numel() for p in network.parameters())
    lora_details = None
    if lora is not None:
        trainable, lora_details = _lora_parameters(network, lora)
        grad_bytes = trainable * 4  # peft keeps adapters in fp32
        weights += trainable * 4
    else:
        trainable = sum(p.numel() for p in float_params)
        grad_bytes = sum(p.numel() * p.element_size() for p in float_params)
    # torch's Adam/AdamW (foreach, the default) make one moment-sized temporary in their step (the square
    # root of the second moment): measured on GPT-2 124M, it is the training peak once activations are small
    step = grad_bytes if optimizer in ("adamw", "adam") else 0
    if optimizer in OPTIMIZER_MOMENTS:  # torch's optimizers keep their moments in each parameter's dtype
        optimizer_bytes = OPTIMIZER_MOMENTS[optimizer] * grad_bytes
    else:
        optimizer_bytes = int(trainable * OPTIMIZER_BYTES_PER_PARAM[optimizer])
    weights_dtype = precision if precision in QUANTIZED_PRECISIONS else _main_dtype(float_params)

    n = _config_numbers(network.config)
    half = precision in ("fp16", "bf16") or (precision == "auto" and weights_dtype in ("float16", "bfloat16"))
    e = 2 if half else 4
    tokens = batch_size * seq_len
    per_layer = e * tokens * (10 * n["hidden"] + 4 * n["intermediate"])
    if n["dropout"]:  # two residual dropouts per layer: a 1-byte mask and the output, per element
        per_layer += 2 * (1 + e) * tokens * n["hidden"]
    if n["scores"]:  # eager attention (or dropout on the probabilities) keeps scores, softmax and mask
        per_layer += (2 * e + 1) * tokens * n["heads"] * seq_len
    has_head = network.get_output_embeddings() is not None
    head = 4 * tokens * ((n["vocab"] or 0) + 4 * n["hidden"]) if has_head else 0
    if gradient_checkpointing:
        stored = e * tokens * n["hidden"] * n["layers"] + head
        recompute = per_layer
    else:
        stored, recompute = per_layer * n["layers"] + head, 0
    activations = stored + recompute

    per_device: dict[Any, int] = {}
    gpus: list = []
    notes: list[str] = []
    if device_map:
        from pytest_llmload._internal.planning.fit_check import bytes_per_device

        placed = bytes_per_device(device_map, sizes)
        in_memory = {d: v for d, v in placed.items() if d != "disk"}
        total_in_memory = sum(in_memory.values()) or 1
        gpus = sorted(d for d in in_memory if isinstance(d, int))
        # what the map does not place (LoRA's adapters; buffers of modules a custom map leaves out), gradients,
        # optimizer state and activations go with the weights, in proportion; the rounding remainder to the
        # device holding the most, so the rows add up to the total
        extra = (weights - sum(placed.values())) + grad_bytes + optimizer_bytes + max(activations, step)
        shares = {device: extra * size // total_in_memory for device, size in in_memory.items()}
        if shares:
            shares[max(in_memory, key=lambda d: in_memory[d])] += extra - sum(shares.values())
        for device, size in in_memory.items():
            per_device[device] = size + shares[device] + (context if device in gpus else 0)
        if placed.get("disk"):
            per_device["disk"] = placed["disk"]
            notes.append(f"{format_size(placed['disk'])} of weights are offloaded to disk; the gradients, optimizer "
                         "state and activations of those modules are counted on the other devices")
    else:
        notes.append("no device map: no GPU and no CUDA context counted; give a device map to split the total "
                     "per device")
    details = {"precision": precision, "weights_dtype": weights_dtype, "optimizer": optimizer,
               "batch_size": batch_size, "seq_len": seq_len, "gradient_checkpointing": gradient_checkpointing,
               "activation_bytes_per_element": e, "lora": lora_details, "device_map": device_map,
               "gpus": gpus, "cuda_context_per_gpu": context}
    return MemoryEstimate(
        weights=weights, gradients=grad_bytes, optimizer=optimizer_bytes, activations=activations,
        cuda_context=context * len(gpus), trainable_parameters=trainable, parameters=parameters,
        activations_stored=stored, activations_recompute=recompute, per_device=per_device, optimizer_step=step,
        details=details, notes=notes,
    )


def _main_dtype(params) -> str | None:
    """The dtype holding most of the float weights, as torch names it without the prefix (``bfloat16``)."""
    bytes_by_dtype: dict[str, int] = {}
    for p in params:
        name = str(p.dtype).replace("torch.", "")
        bytes_by_dtype[name] = bytes_by_dtype.get(name, 0) + p.numel() * p.element_size()
    return max(bytes_by_dtype, key=bytes_by_dtype.get) if bytes_by_dtype else None
