"""Training memory, estimated from the config: weights, gradients, optimizer state, activations, CUDA context.

Formulas of :func:`estimate_training_memory` (bytes; b batch, s sequence, h hidden size, I MLP size (x experts
per token for mixture-of-experts), V vocabulary, a heads, q/kv the query's and the keys' widths, e bytes per
activation element):

- weights: transformers' own per-module sizes of the meta model in the precision (quantized for int8/4-bit),
  plus LoRA adapters in fp32, r x (in + out) per targeted layer (peft's default targets unless given);
- gradients: one per trainable parameter, in its dtype (all float weights, or only LoRA's adapters);
- optimizer state: AdamW two moments per trainable parameter in its dtype (``zeros_like(param)``); 8-bit
  AdamW two 1-byte moments plus an fp32 scale per 256; SGD with momentum one buffer; plain SGD nothing;
- activations: what autograd saves per layer on CUDA, by the kind of each part (``_activations``), plus
  backward's working memory; with gradient checkpointing each layer's input and one layer recomputed.
  Measured on virtual cards (benchmarks/calibration.py; dropout off, the CPU's kernels saving other tensors
  than CUDA's): within 15% of the peak for the built-ins, GPT-2 124M and a 2-layer ~1.1B Llama;
- optimizer step: torch's foreach Adam/AdamW (CUDA's default) allocate one moment-sized temporary in
  ``step()``, when the activations are freed: the total counts the larger of the two;
- CUDA context: per GPU that the device map uses (hundreds of MB before any tensor exists).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from pytest_llmload._internal.planning.devices import device_label
from pytest_llmload.errors import LLMLoadUsageError
from pytest_llmload._internal.config.numbers import format_size, parse_size

OPTIMIZER_BYTES_PER_PARAM = {"adamw": 8.0, "adam": 8.0, "adamw8bit": 2.0 + 8.0 / 256, "sgd": 0.0,
                             "sgd-momentum": 4.0, "none": 0.0}
# torch's AdamW/Adam/SGD keep their moments in the parameter's dtype (``zeros_like(param)``): two, or one
OPTIMIZER_MOMENTS = {"adamw": 2, "adam": 2, "sgd-momentum": 1, "sgd": 0, "none": 0}
ACTIVATION_TOLERANCE = 0.15


@dataclass
class MemoryEstimate:
    """A training-memory breakdown in bytes, with totals per device when a device map was given; ``details``
    holds what the estimate assumed, ``notes`` what a reader should know about the split."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    cuda_context: int
    trainable_parameters: int
    parameters: int
    activations_stored: int = 0  # saved for backward at the end of the forward
    activations_recompute: int = 0  # with gradient checkpointing: one layer's, recomputed during backward
    activations_backward: int = 0  # backward's own working memory on top of them
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
            "activations_backward": self.activations_backward,
            "per_device": {str(k): v for k, v in self.per_device.items()},
            "assumptions": dict(self.details), "notes": list(self.notes),
        }

    def assumed(self) -> str:
        """The assumptions in one line: batch, sequence, precision, optimizer, LoRA, checkpointing."""
        d = self.details
        if not d:
            return ""
        weights, precision, lora = d.get("weights_dtype"), d.get("precision", "?"), d.get("lora")
        precision_text = f"{weights} weights (precision {precision})" if weights and precision == "auto" else (
            f"{precision} weights")
        lora_text = "full fine-tuning (all weights trained)"
        if lora:
            targets = lora.get("target_modules")
            targets = targets if isinstance(targets, str) else ",".join(targets or [])
            lora_text = f"LoRA r={lora.get('r')} on {targets}" + (
                f" ({lora['targets_from']})" if lora.get("targets_from") else "")
        return ", ".join([
            f"batch size {d.get('batch_size')}", f"sequence length {d.get('seq_len')}", precision_text,
            f"optimizer {d.get('optimizer')}", lora_text,
            "gradient checkpointing" if d.get("gradient_checkpointing") else "no gradient checkpointing"])

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


def _config_numbers(config) -> dict[str, Any]:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config

    def first(*names, default=None):
        return next((getattr(text, name) for name in names if getattr(text, name, None)), default)

    hidden = first("hidden_size", "n_embd", "d_model")
    heads = first("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads", default=1)
    layers, decoder = first("num_hidden_layers", "n_layer", "num_layers"), 0
    if getattr(text, "is_encoder_decoder", False):
        layers = first("num_layers", "encoder_layers", default=layers)
        decoder = first("num_decoder_layers", "decoder_layers", default=layers)
    intermediate = first("intermediate_size", "n_inner", "d_ff", "ffn_dim", "encoder_ffn_dim", default=4 * hidden)
    dropout = first("hidden_dropout_prob", "resid_pdrop", "dropout_rate", "hidden_dropout", "dropout", default=0)
    attn_drop = first("attention_probs_dropout_prob", "attn_pdrop", "attention_dropout", "dropout_rate", default=0)
    dim = first("head_dim", "d_kv", default=hidden // heads)
    return {"hidden": hidden, "layers": layers, "decoder": decoder, "heads": heads, "q": heads * dim,
            "kv": first("num_key_value_heads", default=heads) * dim, "base_intermediate": intermediate,
            "intermediate": intermediate * first("num_experts_per_tok", "moe_topk", default=1),
            "vocab": first("vocab_size", default=0),
            "act": str(first("hidden_act", "activation_function", "dense_act_fn", default="gelu")),
            "dropout": float(dropout) > 0, "attention_dropout": float(attn_drop) > 0,
            "eager": getattr(text, "_attn_implementation", None) == "eager",
            "position_bias": bool(getattr(text, "relative_attention_num_buckets", None))}


@functools.lru_cache(maxsize=None)
def _activation_saves(name: str) -> tuple[int, bool]:
    """How many tensors of its input's size transformers' activation ``name`` saves for backward, and whether its
    output is one of them, measured on a tiny tensor (a fused GELU or SiLU its input; ReLU its output)."""
    import torch
    from transformers.activations import ACT2FN

    if name not in ACT2FN:  # a name transformers does not know: a fused kernel saving its input
        return 1, False
    act, saved = ACT2FN[name], set()
    x = torch.linspace(-2, 2, 16, requires_grad=True) * 1  # not a leaf, as in a model
    pack = lambda tensor: saved.add(tensor.untyped_storage().data_ptr()) or tensor  # noqa: E731
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        y = act(x)
    return len(saved), y.untyped_storage().data_ptr() in saved


def _activations(network, n: dict[str, Any], e: int, batch: int, seq: int, lora: list | None, r: int,
                 checkpointing: bool) -> tuple[int, int, int]:
    """Activation bytes (saved at the forward's end, one layer recomputed, backward's working memory on top),
    per token from what autograd saves on CUDA: a norm its input (HF's RMSNorm an fp32 copy and the normalized
    output, or 4h + 4 with a frozen weight; LayerNorm eh + 8), a trained linear layer its input (LoRA's B its
    r outputs; a frozen layer nothing), SDPA q, k, v, its output and a logsumexp (eager attention the
    probabilities), the MLP eI per tensor its activation saves (measured: ReLU 1, GELU/SiLU 1 and the output,
    gelu_new 5; gated: and the up projection and the product), dropout a 1-byte mask."""
    import torch

    h, q, kv, inner, a, vocab, base = (n[k] for k in ("hidden", "q", "kv", "intermediate", "heads", "vocab",
                                                       "base_intermediate"))
    linears = _adaptable_layers(network)
    shrink = sum(1 for _, i, o in linears if i == base and o == h)
    rms = not any(isinstance(m, torch.nn.LayerNorm) for m in network.modules())
    gated = sum(1 for _, i, o in linears if i == h and o == base) >= 2 * shrink if shrink else rms
    full, tokens = lora is None, batch * seq
    roles = set() if full else {_role(name, i, o, h, base) for name, i, o in lora}
    # a linear layer's input, kept for its weight's gradient (LoRA's A: an fp32 copy)
    saved_input = lambda width, role: e * width if full else 4 * width if role in roles else 0  # noqa: E731
    norm = (((4 + e) * h if full else 4 * h) + 4) if rms else e * h + 8
    scores = (e + (1 + e) * n["attention_dropout"]) * a * seq if n["eager"] else 4 * a
    attention = norm + saved_input(h, "attn_in") + e * 2 * (q + kv) + scores
    (saves, keeps_output), trains_out = _activation_saves(n["act"]), full or "mlp_out" in roles
    widths = saves + (not keeps_output) + 1 + trains_out if gated else saves + (trains_out and not keeps_output)
    masks = h if n["dropout"] else 0  # one per residual: CUDA's fused dropout keeps a 1-byte mask
    layer = attention + norm + saved_input(h, "mlp_in") + e * inner * widths + 2 * masks
    # LoRA's A on an output projection: an fp32 copy of the (half) attention output, the product in fp32
    layer += 0 if full or e == 4 else 4 * q * ("attn_out" in roles) + 2 * inner * ("mlp_out" in roles)
    cross = attention + masks if n["decoder"] else 0  # the decoder's: keys and values of the encoder's tokens
    encoder_out, stacks = saved_input(h, "attn_in") if n["decoder"] else 0, 2 if n["decoder"] else 1
    # T5: its bias table's indices (int64) per stack; SDPA keeps the bias (the decoder's per layer, causal)
    bias = n["position_bias"] * ((8 * seq * seq * stacks if full else 0) + (0 if n["eager"] else (
        e * a * seq * seq * (2 + n["decoder"]) + n["decoder"] * seq * seq)))
    head = network.get_output_embeddings() is not None
    outside = norm * stacks + encoder_out + ((saved_input(h, "head") + (e + 4) * vocab) if head else e * h)
    freed = saved_input(h, "head") + 4 * vocab + norm if head else 0  # once the loss's backward is past
    adapters = 0 if full else 4 * r * len(lora)
    # one layer's backward: its output's and MLP's gradients (eager attention: the probabilities', the scores')
    working = tokens * (e * (h + inner) + (2 + (n["position_bias"] and full)) * e * a * seq * n["eager"] - freed)
    # plus a weight's gradient before it is added to .grad; tied embeddings: the head's, held until the embedding's
    tied = head and network.get_output_embeddings().weight is getattr(network.get_input_embeddings(), "weight", 0)
    working += e * h * (inner + vocab * tied) if full else 0
    # the loss's backward: two fp32 gradients of the logits' size; then the head's weight's, the log-softmax freed
    loss = max(8 * vocab * tokens, (e * vocab * h + (e - 4) * vocab * tokens) * full) if head else 4 * h * tokens
    # backward's end: the logits (held) and the embedding's gradient (tied: the head's too, and their sum)
    end = tokens * e * vocab + (e * vocab * h * (3 if tied else 1) if full else 0)
    if not checkpointing:
        stored = tokens * (n["layers"] * layer + n["decoder"] * (layer + cross) + outside + adapters) + bias
        return stored, 0, max(loss, working, end - stored)
    passed = e * a * seq * seq * (stacks + (n["decoder"] > 0)) * n["position_bias"]  # T5's biases, layer to layer
    stored = tokens * ((n["layers"] + n["decoder"]) * e * h + outside) + passed  # and each layer's input
    recompute = tokens * (layer + cross + adapters // (n["layers"] + n["decoder"]))
    return stored, recompute, max(loss - recompute, working, end - stored - recompute)


def _role(name: str, into: int, out: int, hidden: int, inner: int) -> str:
    """What a layer LoRA adapts takes in: the attention's or the MLP's input, or it is an output projection."""
    last = name.rsplit(".", 1)[-1]
    return ("mlp_in" if (into, out) == (hidden, inner) else "mlp_out" if (into, out) == (inner, hidden) else
            "head" if last in ("lm_head", "embed_out") else
            "attn_out" if last in ("o_proj", "out_proj", "o", "dense", "c_proj", "wo") else "attn_in")


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


def _lora_parameters(network, lora: dict[str, Any]) -> tuple[int, dict[str, Any], list]:
    """Adapter parameters for ``lora`` (matched as peft matches target modules), what was assumed, the layers."""
    import re

    import torch

    r = lora.get("r", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise LLMLoadUsageError(f"invalid lora r {r!r}: expected an int >= 1 (the adapters' rank)")
    model_type = getattr(network.config, "model_type", None)
    targets, source = lora.get("target_modules"), "given"
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
        matches = [(n, i, o) for n, i, o in layers
                   if n not in head_names and not isinstance(network.get_submodule(n), torch.nn.Embedding)]
    elif isinstance(targets, str) and not re.fullmatch(r"[\w.]+", targets):
        matches = [layer for layer in layers if re.fullmatch(targets, layer[0])]
    else:
        targets = names = [targets] if isinstance(targets, str) else [str(t) for t in targets]
        matches = [layer for layer in layers if any(layer[0] == t or layer[0].endswith("." + t) for t in names)]
    count = sum(r * (i + o) for _, i, o in matches)
    if not count:
        kinds = _layer_kinds(network)
        raise LoraTargetsError(
            f"lora target_modules {targets!r} match no linear layer of {type(network).__name__} "
            f"(its layers: {', '.join(kinds)}); pass lora={{'target_modules': [...]}} with some of them",
            targets=targets, layer_names=kinds, model_type=model_type)
    return count, {"r": r, "target_modules": targets, "targets_from": source, "layers": len(matches)}, matches


def _layer_kinds(network, limit: int = 12) -> list[str]:
    """The distinct last names of the layers LoRA can wrap, in model order (``q_proj``, ``v_proj``...)."""
    kinds = list(dict.fromkeys(name.rsplit(".", 1)[-1] for name, _, _ in _adaptable_layers(network)))
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
    model: Any, *, precision: str = "auto", optimizer: str = "adamw", batch_size: int = 1, seq_len: int = 512,
    gradient_checkpointing: bool = False, lora: dict[str, Any] | None = None, device_map: Any = None,
    cuda_context: int | str = 500 * 2**20, trust_remote_code: bool = False,
) -> MemoryEstimate:
    """What one training step of ``model`` needs, from the config alone (meta device, no weights).

    ``lora={"r": 8}`` trains adapters only (required for int8/4-bit); without ``target_modules`` the targets
    are peft's default for the model type (Llama: q_proj, v_proj; BERT: query, value; GPT-2: c_attn);
    ``"all-linear"`` and regular expressions work as in peft. ``device_map`` (a custom map or a device; plan
    strategies first with :func:`plan_device_map`) splits the total per device: weights, gradients and
    optimizer state by where each module lives, activations in proportion, a CUDA context per GPU; without
    one no GPU (and no CUDA context) is counted. The module docstring has the formulas."""
    from pytest_llmload._internal.planning.planner import meta_model, module_sizes
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
    context, device_map = parse_size(cuda_context), (None if device_map is None else _custom_map(device_map))
    network, quantizer = meta_model(model, precision, trust_remote_code=trust_remote_code)
    network.tie_weights()  # as from_pretrained does: a tied weight is one parameter, trained once
    sizes = module_sizes(network, quantizer=quantizer)
    weights = sizes[""]
    float_params = [p for p in network.parameters() if p.is_floating_point()]
    parameters = sum(p.numel() for p in network.parameters())
    lora_details, matches = None, None
    if lora is not None:
        trainable, lora_details, matches = _lora_parameters(network, lora)
        grad_bytes = trainable * 4  # peft keeps adapters in fp32
        weights += trainable * 4
    else:
        trainable = sum(p.numel() for p in float_params)
        grad_bytes = sum(p.numel() * p.element_size() for p in float_params)
    # torch's (foreach) Adam/AdamW make one moment-sized temporary in their step (the second moment's root)
    step = grad_bytes if optimizer in ("adamw", "adam") else 0
    if optimizer in OPTIMIZER_MOMENTS:  # torch's optimizers keep their moments in each parameter's dtype
        optimizer_bytes = OPTIMIZER_MOMENTS[optimizer] * grad_bytes
    else:
        optimizer_bytes = int(trainable * OPTIMIZER_BYTES_PER_PARAM[optimizer])
    weights_dtype = precision if precision in QUANTIZED_PRECISIONS else _main_dtype(float_params)

    half = precision in ("fp16", "bf16") or (precision == "auto" and weights_dtype in ("float16", "bfloat16"))
    e = 2 if half else 4
    stored, recompute, backward = _activations(network, _config_numbers(network.config), e, batch_size, seq_len,
                                               matches, (lora_details or {}).get("r", 0), gradient_checkpointing)
    activations = stored + recompute + backward
    per_device: dict[Any, int] = {}
    gpus, notes = [], []
    if device_map:
        from pytest_llmload._internal.planning.fit_check import bytes_per_device

        placed = bytes_per_device(device_map, sizes)
        in_memory = {d: v for d, v in placed.items() if d != "disk"}
        total_in_memory = sum(in_memory.values()) or 1
        gpus = sorted(d for d in in_memory if isinstance(d, int))
        # what the map does not place (LoRA's adapters, buffers a custom map leaves out), gradients, optimizer
        # state and activations go with the weights, in proportion; the rounding remainder to the largest
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
        activations_stored=stored, activations_recompute=recompute, activations_backward=backward,
        per_device=per_device, optimizer_step=step, details=details, notes=notes,
    )


def _main_dtype(params) -> str | None:
    """The dtype holding most of the float weights, as torch names it without the prefix (``bfloat16``)."""
    sizes: dict[str, int] = {}
    for p in params:
        sizes[str(p.dtype)[6:]] = sizes.get(str(p.dtype)[6:], 0) + p.numel() * p.element_size()
    return max(sizes, key=sizes.get) if sizes else None
