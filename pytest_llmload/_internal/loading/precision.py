"""The precision a load gets, from ``precision=`` and the ``from_pretrained`` kwargs that also mean one.

One precedence rule (:func:`reconcile_precision`), the transformers-4 kwargs translated, the
``BitsAndBytesConfig`` of a quantized precision, and config overrides passed as kwargs.
"""

from __future__ import annotations

import warnings
from typing import Any

from pytest_llmload.errors import LLMLoadUsageError
from pytest_llmload._internal.config.specs import QUANTIZED_PRECISIONS, parse_precision

# BitsAndBytesConfig fields that transformers 4 let users pass straight to from_pretrained.
_LEGACY_BNB_KWARGS = (
    "load_in_8bit",
    "load_in_4bit",
    "llm_int8_threshold",
    "llm_int8_skip_modules",
    "llm_int8_enable_fp32_cpu_offload",
    "llm_int8_has_fp16_weight",
    "bnb_4bit_compute_dtype",
    "bnb_4bit_quant_type",
    "bnb_4bit_use_double_quant",
    "bnb_4bit_quant_storage",
)


def quantization_config_for(precision: str, **overrides):
    """The ``BitsAndBytesConfig`` for int8/nf4/fp4, or ``None`` for a float precision."""
    if precision not in QUANTIZED_PRECISIONS:
        return None
    from transformers import BitsAndBytesConfig

    if precision == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, **overrides)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=precision, **overrides)


def translate_legacy_kwargs(kwargs: dict[str, Any]) -> str | None:
    """Turn transformers-4 style ``load_in_8bit=True`` (and friends) into a ``quantization_config``.

    Mutates ``kwargs``; returns the precision it implies, or None. Warns with a DeprecationWarning.
    """
    legacy = {k: kwargs.pop(k) for k in _LEGACY_BNB_KWARGS if k in kwargs}
    if not legacy:
        return None
    if kwargs.get("quantization_config") is not None:
        raise LLMLoadUsageError(
            f"pass either quantization_config or {', '.join(sorted(legacy))}, not both"
        )
    eight, four = legacy.pop("load_in_8bit", False), legacy.pop("load_in_4bit", False)
    if eight and four:
        raise LLMLoadUsageError("load_in_8bit=True and load_in_4bit=True together: choose one")
    if not (eight or four):
        if legacy:
            raise LLMLoadUsageError(
                f"{', '.join(sorted(legacy))} given without load_in_8bit=True or load_in_4bit=True"
            )
        return None
    precision = "int8" if eight else legacy.get("bnb_4bit_quant_type", "nf4")
    warnings.warn(
        f"{'load_in_8bit' if eight else 'load_in_4bit'}=True was removed from from_pretrained in transformers 5; "
        f"pytest-llmload translated it to quantization_config=BitsAndBytesConfig(...) "
        f"(use precision={precision!r} instead)",
        DeprecationWarning,
        stacklevel=4,
    )
    from transformers import BitsAndBytesConfig

    kwargs["quantization_config"] = BitsAndBytesConfig(
        load_in_8bit=bool(eight), load_in_4bit=bool(four), **legacy
    )
    return precision


def _precision_of_quantization(config: Any) -> str | None:
    if getattr(config, "load_in_8bit", False):
        return "int8"
    if getattr(config, "load_in_4bit", False):
        return str(getattr(config, "bnb_4bit_quant_type", "nf4"))
    return None  # another quantization method: nothing to compare with


def _precision_of_dtype(dtype: Any) -> str | None:
    name = str(dtype).replace("torch.", "").strip().lower()
    return {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}.get(name)


def reconcile_precision(precision: Any, kwargs: dict[str, Any]) -> str | None:
    """The one precedence rule between ``precision`` and the ``from_pretrained`` kwargs that also mean one.

    ``dtype=``/``torch_dtype=``, ``quantization_config=`` and the legacy ``load_in_8bit=``/``load_in_4bit=``
    set the precision when ``precision`` is not given (None); when it is given they must agree with it
    (``dtype=`` may accompany a quantized precision: it is then the dtype of the modules left unquantized).
    A contradiction is one :class:`LLMLoadUsageError`. Mutates ``kwargs`` (legacy kwargs translated, a
    dtype that the precision already sets removed); returns the precision, or None when nothing says one.
    """
    chosen = parse_precision(precision) if precision is not None else None
    legacy = translate_legacy_kwargs(kwargs)
    implied: list[tuple[str, str]] = []
    if legacy is not None:
        implied.append(("the legacy bitsandbytes kwargs", legacy))
    elif kwargs.get("quantization_config") is not None:
        quantized = _precision_of_quantization(kwargs["quantization_config"])
        if quantized is not None:
            implied.append(("quantization_config", quantized))
    dtype_keys = [k for k in ("dtype", "torch_dtype") if kwargs.get(k) not in (None, "auto")]
    for key in dtype_keys:
        floating = _precision_of_dtype(kwargs[key])
        if floating is None:
            raise LLMLoadUsageError(f"{key}={kwargs[key]!r} is not a float dtype: expected torch.float32, "
                                    "torch.float16 or torch.bfloat16 (or precision=...)")
        if not any(p in QUANTIZED_PRECISIONS for _, p in implied) and chosen not in QUANTIZED_PRECISIONS:
            implied.append((f"{key}={kwargs[key]}", floating))
    for source, meaning in implied:
        if chosen is None:
            chosen = meaning
        elif chosen != meaning:
            raise LLMLoadUsageError(
                f"precision={precision!r} contradicts {source} (which mean{'s' if '=' in source else ''} "
                f"{meaning!r}): pass one of them"
            )
    if chosen is not None and chosen not in QUANTIZED_PRECISIONS:
        for key in dtype_keys:  # the precision sets dtype itself
            kwargs.pop(key)
    for key in ("dtype", "torch_dtype"):
        if key in kwargs and kwargs[key] in (None, "auto") and chosen is not None:
            kwargs.pop(key)
    return chosen


# Keyword arguments from_pretrained takes for itself; any other kwarg that names a config attribute
# (num_labels=3, use_cache=False...) overrides the config, as from_pretrained does when it reads the config.
_FROM_PRETRAINED_OWN = {
    "adapter_kwargs", "adapter_name", "allow_all_kernels", "attn_implementation", "cache_dir", "commit_message",
    "config", "create_pr", "device_map", "device_mesh", "disable_mmap", "distributed_config", "dtype",
    "experts_implementation", "force_download", "fusion_config", "generation_config", "gguf_file",
    "ignore_mismatched_sizes", "kernel_config", "key_mapping", "local_files_only", "max_memory",
    "offload_buffers", "offload_folder", "output_loading_info", "proxies", "quantization_config", "revision",
    "state_dict", "subfolder", "token", "torch_dtype", "tp_plan", "tp_size", "tqdm_class", "trust_remote_code",
    "use_kernels", "use_safetensors", "variant", "weights_only",
}


def apply_config_overrides(config: Any, kwargs: dict[str, Any]) -> Any:
    """Move kwargs that name config attributes onto a copy of ``config`` (mutates ``kwargs``)."""
    overrides = {k: kwargs.pop(k) for k in list(kwargs) if k not in _FROM_PRETRAINED_OWN and hasattr(config, k)}
    if not overrides:
        return config
    import copy

    config = copy.deepcopy(config)
    for key, value in overrides.items():
        current = getattr(config, key)
        if isinstance(value, dict) and hasattr(current, "to_dict") and hasattr(current, "__class__"):
            value = current.__class__(**{**current.to_dict(), **value})
        setattr(config, key, value)
    return config
