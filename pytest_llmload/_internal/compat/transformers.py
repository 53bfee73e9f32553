"""transformers: hub kernels, the private planning functions, and the fleet's patch targets.

Every transformers name that is private or changed between the tested releases is reached from here.
"""

from __future__ import annotations

import functools
import inspect
import re
import sys
from typing import Any

from pytest_llmload._internal.compat import installed, missing_internal, resolve

# transformers >= 5.25 kernelizes every load onto an accelerator with kernels from the Hub unless
# from_pretrained gets use_kernels=False (or USE_HUB_KERNELS says no); earlier 5.x default to False.
HUB_KERNELS_DEFAULT_ON_SINCE = (5, 25)

# (module, attribute) the virtual fleet replaces while it runs (virtual/patches.py says why).
FLEET_PATCHES = (
    ("transformers.modeling_utils", "caching_allocator_warmup"),
    ("transformers.core_model_loading", "_materialize_copy"),
)


def _version() -> tuple[int, int]:
    found = installed("transformers") or "0.0"
    parts = re.findall(r"\d+", found)[:2]
    return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0


@functools.lru_cache(maxsize=1)
def _default_use_kernels_is_none() -> bool:
    """Whether ``from_pretrained`` pops ``use_kernels`` with ``None`` (5.25: on unless ``USE_HUB_KERNELS``
    says no) rather than ``False``; read from its source once, the release where it changed as the fallback."""
    from transformers import PreTrainedModel

    try:
        source = inspect.getsource(PreTrainedModel.from_pretrained)
    except (OSError, TypeError):
        return _version() >= HUB_KERNELS_DEFAULT_ON_SINCE
    found = re.search(r"""pop\(\s*["']use_kernels["']\s*,\s*(\w+)\s*\)""", source)
    return found.group(1) == "None" if found else _version() >= HUB_KERNELS_DEFAULT_ON_SINCE


def hub_kernels_by_default() -> bool:
    """Would a plain ``from_pretrained`` kernelize a load (transformers' own default here)?"""
    if not _default_use_kernels_is_none():
        return False
    enabled = resolve("transformers.integrations.hub_kernels._kernels_enabled")
    return bool(enabled()) if callable(enabled) else bool(enabled)


class KernelPlan:
    """What a load passes for hub kernels, and whether it kernelizes the loaded model itself.

    Off (the default) and on a virtual fleet: ``use_kernels=False``, nothing kernelized, nothing fetched.
    On: transformers' own default; where that default kernelizes, the model is loaded with
    ``use_kernels=False`` and kernelized right after with GPU entries given as ``torch.device`` (transformers
    5.25's ``kernelize`` calls ``.type`` on a device map's value and fails on the plain GPU numbers that
    ``device_map`` documents; see tests/test_hermetic.py's upstream xfail).
    """

    def __init__(self, hub_kernels: bool, *, virtual: bool, callers_own: bool = False) -> None:
        self.requested = hub_kernels
        # a caller's own use_kernels / kernel_config / kernels_mode go to transformers as given (not on a fleet)
        self.kernelize_after = hub_kernels and not virtual and not callers_own and hub_kernels_by_default()
        self.kwargs: dict[str, Any] = {} if (hub_kernels or callers_own) and not virtual and not self.kernelize_after \
            else {"use_kernels": False}


def kernelize(model: Any, device_map: Any) -> None:
    """Kernelize a loaded model as ``from_pretrained`` does by default (the plan's ``kernelize_after``)."""
    import torch

    if isinstance(device_map, dict):
        accelerator = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
        kind = accelerator.type if accelerator is not None else "cuda"
        device_map = {k: torch.device(kind, v) if isinstance(v, int) and not isinstance(v, bool) else v
                      for k, v in device_map.items()}
    params = inspect.signature(model.set_use_kernels).parameters
    if "device_map" in params and isinstance(device_map, dict):
        model.set_use_kernels(True, device_map=device_map)
    else:
        model.set_use_kernels(True)


_KERNEL_REPO = re.compile(r"[Kk]ernel(?: repository)? '?([\w.\-]+/[\w.\-]+)'?|(kernels-community/[\w.\-]+)")


def kernel_failure(exc: BaseException) -> tuple[str, str] | None:
    """``(kernel repo, what it said)`` when ``exc`` (or what caused it) is a hub kernel failing to load."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc)
        module = type(exc).__module__ or ""
        match = _KERNEL_REPO.search(text)
        if match or module.startswith("kernels"):
            repo = (match.group(1) or match.group(2)) if match else "a hub kernel"
            said = " ".join(s for s in re.split(r"(?<=[.;])\s+", text.strip().splitlines()[0] if text.strip() else "")
                            if "trust_remote_code" not in s)
            return repo, said.strip() or type(exc).__name__
        exc = exc.__cause__ or exc.__context__
    return None


def fleet_patch_targets() -> list[tuple[Any, str]]:
    """The loaded transformers modules' attributes the fleet patches; one missing fails the fleet's start."""
    if "transformers" not in sys.modules:
        return []
    import importlib

    targets = []
    for module_name, attribute in FLEET_PATCHES:
        module = importlib.import_module(module_name)
        if not hasattr(module, attribute):
            raise missing_internal("virtual GPUs need", "transformers", f"{module_name}.{attribute}")
        targets.append((module, attribute))
    return targets


def clear_availability_caches() -> None:
    """transformers caches ``is_torch_cuda_available()`` and friends; they must see a fleet start and stop."""
    import_utils = sys.modules.get("transformers.utils.import_utils")
    if import_utils is None:
        return
    for name in dir(import_utils):
        if name.startswith("is_torch"):
            clear = getattr(getattr(import_utils, name), "cache_clear", None)
            if clear is not None:
                clear()


def planning_functions(quantized: bool = False):
    """``(_get_device_map, compute_module_sizes, _get_dtype, get_hf_quantizer or None)``: the private
    functions ``from_pretrained`` plans with. ``get_hf_quantizer`` is imported only for int8/4-bit (its
    module imports every quantizer: seconds)."""
    names = ["transformers.integrations.accelerate._get_device_map",
             "transformers.integrations.accelerate.compute_module_sizes",
             "transformers.modeling_utils._get_dtype"]
    if quantized:
        from pytest_llmload._internal.compat.bitsandbytes import import_bitsandbytes

        try:
            import_bitsandbytes()  # quietly and hermetically, before the quantizer modules import it
        except ImportError:
            pass
        names.append("transformers.quantizers.auto.get_hf_quantizer")
    found = []
    for name in names:
        obj = resolve(name)
        if obj is None:
            raise missing_internal("the planner needs", "transformers", name)
        found.append(obj)
    return (*found[:3], found[3] if quantized else None)


def init_context(cls: Any, dtype: Any, quantized: bool, config: Any) -> list:
    """``cls.get_init_context(...)``: 3 arguments in 5.0, then ``allow_all_kernels``, then ``config`` (5.25)."""
    params = list(inspect.signature(cls.get_init_context).parameters)
    args: list[Any] = [dtype, quantized, False]
    if "allow_all_kernels" in params:
        args.append(None)
    kwargs = {"config": config} if "config" in params else {}
    return cls.get_init_context(*args, **kwargs)


def accelerate_integration():
    """``transformers.integrations.accelerate``: where from_pretrained plans (``infer_auto_device_map``)."""
    module = resolve("transformers.integrations.accelerate")
    if module is None or not hasattr(module, "infer_auto_device_map"):
        raise missing_internal("the planner needs", "transformers",
                               "transformers.integrations.accelerate.infer_auto_device_map")
    return module


def free_memory_function() -> tuple[Any, str]:
    """``(module, name)`` of the function from_pretrained asks for free memory per device: ``accelerate_max_memory``
    where the module has it, else ``get_max_memory`` (the name older 5.x releases call)."""
    module = accelerate_integration()
    for name in ("accelerate_max_memory", "get_max_memory"):
        if callable(getattr(module, name, None)):
            return module, name
    raise missing_internal("the planner needs", "transformers", "transformers.integrations.accelerate.get_max_memory")


def causal_lm_mappings() -> tuple[Any, Any]:
    """transformers' config-type -> class mappings for causal LMs and base models."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING

    return MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING


def checkpointing_method() -> str:
    """The name of ``PreTrainedModel``'s method that turns activation checkpointing on: the new
    ``activation_checkpointing_enable`` (5.2x; ``gradient_checkpointing_enable`` is a deprecated alias) or
    ``gradient_checkpointing_enable`` (5.17 and earlier)."""
    from transformers import PreTrainedModel

    return ("activation_checkpointing_enable" if hasattr(PreTrainedModel, "activation_checkpointing_enable")
            else "gradient_checkpointing_enable")


def enable_activation_checkpointing(model: Any, *, use_reentrant: bool | None = None) -> None:
    """Turn activation checkpointing on, with whichever method and keyword this transformers has (a peft
    model passes the call on to its base model)."""
    name = checkpointing_method()
    kwargs_name = name.replace("_enable", "_kwargs")
    kwargs = {kwargs_name: {"use_reentrant": use_reentrant}} if use_reentrant is not None else {}
    getattr(model, name)(**kwargs)


# the logger transformers' device-map planning writes its budgets to (planning/reasons.py reads them)
PLANNING_LOGGER = "transformers.integrations.accelerate"


def plan_dtype(get_dtype: Any, dtype: Any, config: Any, hf_quantizer: Any) -> tuple[Any, Any]:
    """``_get_dtype`` as ``from_pretrained`` calls it with no checkpoint files: ``(config, dtype)``."""
    return get_dtype(dtype, None, config, None, None, True, hf_quantizer)


def plan_quantizer(get_hf_quantizer: Any, config: Any, quantization_config: Any, device_map: Any) -> tuple[Any, Any]:
    """``get_hf_quantizer`` as ``from_pretrained`` calls it for a local load: ``(hf_quantizer, config)``.

    The config of a model already loaded quantized holds a ``BitsAndBytesConfig`` object where a checkpoint's
    config.json holds a dict; transformers 5.17 reads it as a dict (``AttributeError: 'BitsAndBytesConfig'
    object has no attribute 'get'``), so the planner is given the dict, on a copy of the config."""
    held = getattr(config, "quantization_config", None)
    if held is not None and not isinstance(held, dict) and hasattr(held, "to_dict"):
        import copy

        config = copy.copy(config)
        config.quantization_config = held.to_dict()
    import warnings

    with warnings.catch_warnings():  # the planner's own call: the model's quantization config is the one used
        warnings.filterwarnings("ignore", message="You passed `quantization_config`", category=UserWarning)
        hf_quantizer, config, _ = get_hf_quantizer(config, quantization_config, device_map, True, {})
    return hf_quantizer, config


def quantize_on_meta(hf_quantizer: Any, network: Any, dtype: Any, device_map: Any) -> None:
    """The quantizer's ``preprocess_model`` on a model built on the meta device (no checkpoint, no kernels)."""
    hf_quantizer.preprocess_model(model=network, dtype=dtype, device_map=device_map, checkpoint_files=None,
                                  use_kernels=False)
