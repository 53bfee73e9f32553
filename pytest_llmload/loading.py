"""Loading models and tokenizers through the real ``from_pretrained``, under a device map and a precision.

torch and transformers are imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import os
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import LLMLoadUsageError, ModelLoadError
from .specs import (
    QUANTIZED_PRECISIONS,
    DeviceMapSpec,
    ModelSpec,
    parse_device_map,
    parse_max_memory,
    parse_model,
    is_whole_number,
    parse_precision,
)

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
_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
_ACCELERATOR_FREE = {"cpu", "disk", "meta"}


@dataclass
class LoadInfo:
    """What a load did beyond what the caller asked: resolved map, notes, offload folder."""

    device_map: Any = None
    notes: list[str] = field(default_factory=list)
    offload_folder: str | None = None


def resolve_source(model: ModelSpec) -> str:
    """The path or hub id that ``from_pretrained`` gets for ``model`` (building a built-in on first use)."""
    if model.kind == "builtin":
        from .builtin import builtin_path

        return str(builtin_path(model.source))
    return model.source


def _is_local(model: ModelSpec) -> bool:
    return model.kind in ("builtin", "path")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0].strip()


def load_config(model: Any, *, trust_remote_code: bool = False):
    """The ``PretrainedConfig`` of an id, path, ``builtin:`` name, config or model object."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return model
    if hasattr(model, "config") and isinstance(getattr(model, "config"), PretrainedConfig):
        return model.config
    spec = parse_model(model)
    source = resolve_source(spec)
    local_only, offline_reason = _is_local(spec), ""
    if local_only:
        from .safety import check_json_file

        # Not a FIFO, not nested without bound; whether it is JSON at all, AutoConfig says below.
        check_json_file(Path(source) / "config.json", "checkpoint file", parse=False)
    else:
        from .safety import hub_reachable

        reachable, offline_reason = hub_reachable()
        local_only = not reachable
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, local_files_only=local_only)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line naming the model
        raise ModelLoadError(_config_error(spec, exc, trust_remote_code, offline_reason)) from None
    if getattr(config, "auto_map", None) and not trust_remote_code:
        raise ModelLoadError(
            f"model {spec.text!r} needs code from the checkpoint (auto_map in config.json); "
            "pass --llm-trust-remote-code (trust_remote_code=True) if you trust it"
        )
    return config


def _config_error(spec: ModelSpec, exc: BaseException, trust_remote_code: bool, offline_reason: str = "") -> str:
    message = _first_line(exc)
    if "trust_remote_code" in str(exc) and not trust_remote_code:
        return (
            f"model {spec.text!r} needs code from the checkpoint; "
            "pass --llm-trust-remote-code (trust_remote_code=True) if you trust it"
        )
    if spec.kind == "hub" and offline_reason:
        return (
            f"cannot load model {spec.text!r}: the hub is not reachable ({offline_reason}) and it is not in "
            "the local cache; download it once with network (or set HF_HUB_OFFLINE=1 where it is cached), "
            "or point --llm-model at a local directory"
        )
    if spec.kind == "hub":
        return (
            f"cannot load model {spec.text!r} from the hub or the local cache: {message} "
            "(to run offline, download it first or point --llm-model at a local directory)"
        )
    config_file = Path(resolve_source(spec)) / "config.json"
    return f"cannot read {config_file}: {message}"


def model_class_for(config, override: Any = None):
    """The class to load with: ``override`` (a class or a transformers name), else the checkpoint's own
    architecture (``config.architectures[0]``), else the causal-LM or base class of the config's type."""
    import transformers

    if override is not None:
        if isinstance(override, str):
            cls = getattr(transformers, override, None)
            if cls is None or not hasattr(cls, "from_pretrained"):
                raise LLMLoadUsageError(
                    f"unknown model class {override!r}: expected a transformers class name such as "
                    "'AutoModelForCausalLM' or 'AutoModelForSequenceClassification'"
                )
            return cls
        return override
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    # A config without architectures (built in code): the causal-LM class of its type, else the base model.
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING

    for mapping in (MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING):
        if type(config) in mapping:
            return mapping[type(config)]
    return transformers.AutoModel


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


def local_process_index() -> int:
    """The process's index on its node under ``accelerate launch`` or ``torchrun`` (0 otherwise)."""
    for var in ("LOCAL_RANK", "ACCELERATE_LOCAL_PROCESS_INDEX", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK"):
        if is_whole_number(os.environ.get(var, "")):
            return int(os.environ[var])
    return 0


def resolve_device_map(spec: DeviceMapSpec) -> Any:
    """The value ``from_pretrained`` gets: ``process`` becomes this process's own device."""
    if spec.kind == "process":
        import torch

        if torch.cuda.is_available():
            return {"": local_process_index() % torch.cuda.device_count()}
        return {"": "cpu"}
    return spec.as_user_value()


def map_devices(device_map: Any) -> set:
    return set(device_map.values()) if isinstance(device_map, dict) else set()


def quantized_map_problem(precision: str, device_map: Any) -> str | None:
    """Why a bitsandbytes precision cannot honour ``device_map`` as asked, or None.

    bitsandbytes keeps modules placed on cpu/disk in fp32 when other modules are on a GPU
    (``llm_int8_enable_fp32_cpu_offload``). Without any GPU in the map that would leave nothing
    quantized, so such a cell is refused rather than silently loaded as a float model.
    """
    devices = map_devices(device_map)
    if precision in QUANTIZED_PRECISIONS and "disk" in devices and not (devices - _ACCELERATOR_FREE):
        return (
            f"{precision} on a map of only cpu and disk would keep every module in fp32 "
            "(bitsandbytes' llm_int8_enable_fp32_cpu_offload), so nothing would be quantized; "
            "use device_map 'cpu' for quantized loads without a GPU"
        )
    return None


def load_model(
    model: Any,
    *,
    device_map: Any = None,
    precision: str | None = None,
    max_memory: Any = None,
    model_class: Any = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    info: LoadInfo | None = None,
    config: Any = None,
    **kwargs: Any,
):
    """Load ``model`` (``builtin:NAME``, a directory or a hub id) with ``from_pretrained``.

    ``precision`` is one of auto, fp32, fp16, bf16, int8, nf4, fp4; ``device_map`` anything
    ``--llm-device-map`` accepts (default: none, i.e. transformers' own default placement).
    Disk entries get a temporary offload folder, removed when the model is garbage collected.
    Safetensors weights only, unless ``allow_pickle=True``; checkpoint code only with ``trust_remote_code``.
    """
    spec = parse_model(model)
    info = info if info is not None else LoadInfo()
    precision = reconcile_precision(precision, kwargs) or "auto"
    budget = parse_max_memory(max_memory)

    map_spec = parse_device_map(device_map) if device_map is not None else None
    tensor_parallel = map_spec is not None and map_spec.kind == "tp"
    if tensor_parallel:
        map_spec = None  # transformers places the shards: tp and a device_map are mutually exclusive
    resolved_map = resolve_device_map(map_spec) if map_spec is not None else None
    problem = quantized_map_problem(precision, resolved_map)
    if problem and kwargs.get("quantization_config") is None:
        raise LLMLoadUsageError(problem)
    info.device_map = resolved_map

    # The config is read once here (or given, already read) and handed to from_pretrained, not re-read.
    config = config if config is not None else load_config(spec, trust_remote_code=trust_remote_code)
    config = apply_config_overrides(config, kwargs)
    cls = model_class_for(config, model_class)
    source = resolve_source(spec)
    if tensor_parallel:
        from .dist import tp_load_kwargs

        kwargs = {**tp_load_kwargs(spec.text, config, cls), **kwargs}  # distributed_config over the world

    call: dict[str, Any] = {"trust_remote_code": trust_remote_code, "config": config}
    if _is_local(spec):
        from .safety import check_checkpoint_files

        check_checkpoint_files(source)
        call["local_files_only"] = True
    else:
        from .safety import hub_reachable

        if not hub_reachable()[0]:
            call["local_files_only"] = True
    if not allow_pickle:
        call["use_safetensors"] = True
    if precision in _DTYPES:
        import torch

        call["dtype"] = getattr(torch, _DTYPES[precision])
    elif precision == "auto":
        call["dtype"] = "auto"
    if precision in QUANTIZED_PRECISIONS or kwargs.get("quantization_config") is not None:
        from .hardware import import_bitsandbytes

        try:
            import_bitsandbytes()  # quietly, before transformers' quantizer imports it
        except ImportError:
            pass  # transformers says what is missing
    if precision in QUANTIZED_PRECISIONS and kwargs.get("quantization_config") is None:
        devices = map_devices(resolved_map)
        overrides = {}
        if devices & {"cpu", "disk"} and devices - _ACCELERATOR_FREE:
            overrides["llm_int8_enable_fp32_cpu_offload"] = True
            info.notes.append("fp32-cpu-offload: modules on cpu/disk stay in fp32")
        call["quantization_config"] = quantization_config_for(precision, **overrides)
    if resolved_map is not None:
        call["device_map"] = resolved_map
    if budget:
        call["max_memory"] = budget
    call.update(kwargs)

    own_folder = None
    if "offload_folder" not in call and needs_offload_folder(call.get("device_map"), call.get("max_memory")):
        from .safety import remove_owned_folder, session_folder

        own_folder = session_folder()
        call["offload_folder"] = own_folder
    info.offload_folder = call.get("offload_folder")
    try:
        with quiet_loading():
            loaded = cls.from_pretrained(source, **call)
    except BaseException as exc:
        if own_folder is not None:
            remove_owned_folder(own_folder)
        if isinstance(exc, Exception) and not isinstance(exc, LLMLoadUsageError):
            raise ModelLoadError(_load_error(spec, source, exc, allow_pickle)) from None
        raise
    if own_folder is not None:
        weakref.finalize(loaded, remove_owned_folder, own_folder)
    return loaded


@contextmanager
def quiet_loading():
    """No "Loading weights" progress bars in every captured stderr, and no deprecation noise from
    importing bitsandbytes (pytest-llmload chooses when that import happens, so it keeps it quiet)."""
    import logging

    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    catcher = _LoadReportCatcher()
    handlers = logging.getLogger("transformers").handlers
    for handler in handlers:
        handler.addFilter(catcher)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.script_method.*", category=DeprecationWarning)
            yield
    finally:
        for handler in handlers:
            handler.removeFilter(catcher)
        if bars:
            hf_logging.enable_progress_bar()
    for report in catcher.reports:  # in the test's warnings, not on a worker's raw stderr after the summary
        warnings.warn(report, UserWarning, stacklevel=3)


class _LoadReportCatcher:
    """A logging filter that takes transformers' LOAD REPORT (missing/unexpected keys) off the stream."""

    def __init__(self) -> None:
        self.reports: list[str] = []

    def filter(self, record) -> bool:
        message = record.getMessage()
        if "LOAD REPORT" not in message:
            return True
        import re

        self.reports.append("transformers: " + re.sub(r"\x1b\[[0-9;]*m", "", message).strip())
        return False


def needs_offload_folder(device_map: Any, max_memory: Any = None) -> bool:
    """Whether a load may put weights on disk: a strategy or a budget can spill, a map can name disk."""
    if device_map is None:
        return False
    return (isinstance(device_map, str) and device_map != "tp") or "disk" in map_devices(device_map) or bool(max_memory)


def _load_error(spec: ModelSpec, source: str, exc: BaseException, allow_pickle: bool) -> str:
    message = _first_line(exc)
    where = f"model {spec.text!r}" if spec.kind != "path" else f"checkpoint {source}"
    if not allow_pickle and _only_pickle_weights(source):
        return (
            f"{where} has only pickle weights (pytorch_model.bin), and unpickling can run code; "
            "pass --llm-allow-pickle (allow_pickle=True) if you trust it, or convert it to safetensors"
        )
    return f"cannot load {where}: {type(exc).__name__}: {message}"


def _only_pickle_weights(source: str) -> bool:
    path = Path(source)
    if not path.is_dir():
        return False
    names = [p.name for p in path.iterdir()]
    has_pickle = any(n.endswith((".bin", ".pt", ".pth")) for n in names)
    return has_pickle and not any(n.endswith(".safetensors") or n.endswith(".safetensors.index.json") for n in names)


def load_tokenizer(model: Any, *, trust_remote_code: bool = False, **kwargs: Any):
    """The tokenizer stored beside ``model``'s weights (same directory or hub id)."""
    from transformers import AutoTokenizer

    spec = parse_model(model)
    source = resolve_source(spec)
    if _is_local(spec):
        from .safety import check_tokenizer_files

        check_tokenizer_files(source)
        kwargs.setdefault("local_files_only", True)
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(
            f"cannot load the tokenizer of {spec.text!r} from {source}: {type(exc).__name__}: {_first_line(exc)}"
        ) from None


def effective_device_map(model) -> dict[str, Any]:
    """``model.hf_device_map`` where transformers set one, else ``{"": device}`` of its parameters.

    transformers 5 sets no ``hf_device_map`` for a single-device load.
    """
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        return dict(device_map)
    import itertools

    device = next((t.device for t in itertools.chain(model.parameters(), model.buffers())), None)
    if device is None:
        return {"": "cpu"}
    if device.type == "cuda":
        return {"": device.index if device.index is not None else 0}
    return {"": device.type if device.index is None else f"{device.type}:{device.index}"}
