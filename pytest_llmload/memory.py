"""Memory accounting: what training will cost (estimated from the config) and what a test used (measured).

Formulas of :func:`estimate_training_memory` (bytes; b batch, s sequence, h hidden size, I MLP size
(x experts per token for mixture-of-experts), V vocabulary, L layers, e bytes per activation element):

- weights: transformers' own per-module sizes of the meta model in the precision (quantized sizes
  for int8/4-bit), plus LoRA adapters in fp32: r x (in + out) per targeted linear layer;
- gradients: one per trainable parameter, in its dtype (all float weights for full fine-tuning;
  only the adapters with ``lora=``);
- optimizer state: AdamW keeps two fp32 moments per trainable parameter (8 bytes); 8-bit AdamW
  (bitsandbytes) two 1-byte moments plus a fp32 scale per block of 256; SGD with momentum one fp32
  buffer; plain SGD nothing (as ``accelerate estimate-memory``, which counts Adam as 2 x the fp32 weights);
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
- CUDA context: per GPU that the device map uses (hundreds of MB before any tensor exists).
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from .devices import device_label
from .sizes import format_size

OPTIMIZER_BYTES_PER_PARAM = {"adamw": 8.0, "adam": 8.0, "adamw8bit": 2.0 + 8.0 / 256, "sgd": 0.0,
                             "sgd-momentum": 4.0, "none": 0.0}
ACTIVATION_TOLERANCE = 0.25


@dataclass
class MemoryEstimate:
    """A training-memory breakdown in bytes, with totals per device when a device map was given."""

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

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.cuda_context

    def to_dict(self) -> dict[str, Any]:
        return {
            "weights": self.weights, "gradients": self.gradients, "optimizer": self.optimizer,
            "activations": self.activations, "cuda_context": self.cuda_context, "total": self.total,
            "parameters": self.parameters, "trainable_parameters": self.trainable_parameters,
            "per_device": {str(k): v for k, v in self.per_device.items()}, **self.details,
        }

    def table(self) -> str:
        rows = [("weights", self.weights), ("gradients", self.gradients), ("optimizer state", self.optimizer),
                ("activations", self.activations), ("CUDA context", self.cuda_context), ("total", self.total)]
        lines = [f"training memory: {self.trainable_parameters:,} of {self.parameters:,} parameters trainable"]
        lines += [f"  {name:<16}{format_size(size):>12}" for name, size in rows]
        for device, size in self.per_device.items():
            lines.append(f"  {'on ' + device_label(device):<16}"
                         f"{format_size(size):>12}")
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


def _lora_parameters(network, lora: dict[str, Any]) -> int:
    import torch

    r = int(lora.get("r", 8))
    targets = lora.get("target_modules") or ["q_proj", "v_proj"]
    targets = [targets] if isinstance(targets, str) else list(targets)
    count = 0
    for name, module in network.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            count += r * (module.in_features + module.out_features)
    if not count:
        from .errors import LLMLoadUsageError

        raise LLMLoadUsageError(f"lora target_modules {targets!r} match no linear layer of {type(network).__name__}")
    return count


def estimate_training_memory(
    model: Any,
    *,
    precision: str = "auto",
    optimizer: str = "adamw",
    batch_size: int = 1,
    seq_len: int = 512,
    gradient_checkpointing: bool = False,
    lora: dict[str, Any] | None = None,
    device_map: dict[str, Any] | None = None,
    cuda_context: int | str = 500 * 2**20,
) -> MemoryEstimate:
    """What one training step of ``model`` needs, from the config alone (meta device, no weights).

    ``lora={"r": 8, "target_modules": ["q_proj", "v_proj"]}`` trains adapters only (required for
    int8/4-bit). ``device_map`` splits the total per device (weights, gradients and optimizer state by
    where each module lives; activations in proportion). See the module docstring for the formulas.
    """
    from .errors import LLMLoadUsageError
    from .planning import meta_model, module_sizes
    from .sizes import parse_size
    from .specs import QUANTIZED_PRECISIONS, parse_precision

    precision = parse_precision(precision)
    if optimizer not in OPTIMIZER_BYTES_PER_PARAM:
        raise LLMLoadUsageError(f"unknown optimizer {optimizer!r}: expected one of {', '.join(OPTIMIZER_BYTES_PER_PARAM)}")
    if batch_size < 1 or seq_len < 1:
        raise LLMLoadUsageError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
    if precision in QUANTIZED_PRECISIONS and lora is None:
        raise LLMLoadUsageError(f"{precision} weights cannot be trained directly: pass lora={{'r': 8, ...}}")
    network, quantizer = meta_model(model, precision)
    network.tie_weights()  # as from_pretrained does: a tied weight is one parameter, trained once
    sizes = module_sizes(network, quantizer=quantizer)
    weights = sizes[""]
    float_params = [p for p in network.parameters() if p.is_floating_point()]
    parameters = sum(p.numel() for p in network.parameters())
    if lora is not None:
        trainable = _lora_parameters(network, lora)
        grad_bytes = trainable * 4  # peft keeps adapters in fp32
        weights += trainable * 4
    else:
        trainable = sum(p.numel() for p in float_params)
        grad_bytes = sum(p.numel() * p.element_size() for p in float_params)
    optimizer_bytes = int(trainable * OPTIMIZER_BYTES_PER_PARAM[optimizer])

    n = _config_numbers(network.config)
    e = 2 if precision in ("fp16", "bf16") else 4
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

    context = parse_size(cuda_context)
    per_device: dict[Any, int] = {}
    gpus: set = set()
    if device_map:
        from .fit import bytes_per_device

        placed = bytes_per_device(device_map, sizes)
        placed = {d: v for d, v in placed.items() if d != "disk"}
        total_placed = sum(placed.values()) or 1
        gpus = {d for d in placed if isinstance(d, int)}
        for device, size in placed.items():
            share = size / total_placed
            per_device[device] = int(size + (grad_bytes + optimizer_bytes + activations) * share) + (
                context if device in gpus else 0)
    return MemoryEstimate(
        weights=weights, gradients=grad_bytes, optimizer=optimizer_bytes, activations=activations,
        cuda_context=context * len(gpus), trainable_parameters=trainable, parameters=parameters,
        activations_stored=stored, activations_recompute=recompute, per_device=per_device,
        details={"precision": precision, "optimizer": optimizer, "batch_size": batch_size, "seq_len": seq_len,
                 "gradient_checkpointing": gradient_checkpointing, "lora": lora},
    )


# -- measurement -----------------------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass
class MemoryUsage:
    """Peak memory during a block: per GPU (allocated, reserved, driver-level used) and the CPU RSS delta."""

    cpu_peak_delta: int = 0
    gpu_allocated_peak: dict[int, int] = field(default_factory=dict)
    gpu_reserved_peak: dict[int, int] = field(default_factory=dict)
    gpu_used: dict[int, int] = field(default_factory=dict)  # total - free, as nvidia-smi shows it
    seconds: float = 0.0

    def describe(self) -> str:
        parts = [f"cpu +{format_size(self.cpu_peak_delta)}"]
        for index in sorted(self.gpu_allocated_peak):
            parts.append(f"cuda:{index} allocated {format_size(self.gpu_allocated_peak[index])}, reserved "
                         f"{format_size(self.gpu_reserved_peak[index])}, used {format_size(self.gpu_used[index])}")
        return "; ".join(parts)


class _RssSampler(threading.Thread):
    def __init__(self, interval: float = 0.001):
        super().__init__(daemon=True)
        self.interval, self.peak, self._stop_event = interval, _rss(), threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, _rss())
            self._stop_event.wait(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak, _rss())


class MemoryTracker:
    """Peaks since :meth:`start`, readable at any time (:meth:`snapshot`) and final at :meth:`stop`.

    GPU peaks are reset on start, so trackers that follow each other do not see each other's peaks.
    """

    def __init__(self) -> None:
        self.usage = MemoryUsage()
        self._sampler: _RssSampler | None = None
        self._start_rss = 0
        self._start = 0.0

    @staticmethod
    def _cuda():
        import sys

        torch = sys.modules.get("torch")
        return torch if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def start(self) -> "MemoryTracker":
        torch = self._cuda()
        if torch is not None:
            for index in range(torch.cuda.device_count()):
                torch.cuda.reset_peak_memory_stats(index)
        self._start_rss = _rss()
        self._sampler = _RssSampler()
        self._sampler.start()
        self._start = time.perf_counter()
        return self

    @property
    def running(self) -> bool:
        return self._sampler is not None

    def snapshot(self) -> MemoryUsage:
        """Fill :attr:`usage` with the peaks so far (the tracker keeps running)."""
        if self._sampler is None:
            return self.usage
        self._fill(max(self._sampler.peak, _rss()))
        return self.usage

    def stop(self) -> MemoryUsage:
        if self._sampler is not None:
            self._fill(self._sampler.stop())
            self._sampler = None
        return self.usage

    def _fill(self, peak_rss: int) -> None:
        usage = self.usage
        usage.seconds = time.perf_counter() - self._start
        usage.cpu_peak_delta = max(peak_rss - self._start_rss, 0)
        torch = self._cuda()
        if torch is not None:
            for index in range(torch.cuda.device_count()):
                usage.gpu_allocated_peak[index] = int(torch.cuda.max_memory_allocated(index))
                usage.gpu_reserved_peak[index] = int(torch.cuda.max_memory_reserved(index))
                free, total = torch.cuda.mem_get_info(index)
                usage.gpu_used[index] = int(total - free)


@contextmanager
def track_memory() -> Iterator[MemoryUsage]:
    """Record peak memory inside the block; GPU peaks are reset on entry so blocks do not see each other."""
    tracker = MemoryTracker().start()
    try:
        yield tracker.usage
    finally:
        tracker.stop()


def saved_activation_bytes(model, inputs: dict[str, Any]) -> int:
    """Bytes autograd saves for backward in one forward pass (storages counted once, weights excluded)."""
    import torch

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[tuple[int, int], int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = model(**inputs)
    loss = getattr(output, "loss", None)
    if loss is not None:
        loss.backward()
    return sum(seen.values())


class MemoryRecorder:
    """What the ``llm_memory`` fixture gives: the whole test's peaks in ``.usage``, blocks with ``.track()``.

    ``.usage`` is live: read during the test, it holds the peaks so far; the plugin records the whole
    test's peaks when the test body ends (in the JSON report's ``tests`` and the report's user_properties).
    """

    def __init__(self) -> None:
        self._tracker = MemoryTracker()

    @property
    def usage(self) -> MemoryUsage:
        return self._tracker.snapshot()

    def start(self) -> None:
        self._tracker.start()

    def stop(self) -> MemoryUsage:
        return self._tracker.stop()

    def track(self):
        return track_memory()
