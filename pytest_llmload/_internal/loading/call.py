"""Loading models and tokenizers through the real ``from_pretrained``, under a device map and a precision.

torch and transformers are imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_llmload.errors import LLMLoadUsageError, ModelLoadError
from pytest_llmload._internal.config.specs import (
    QUANTIZED_PRECISIONS,
    DeviceMapSpec,
    ModelSpec,
    parse_device_map,
    parse_max_memory,
    parse_model,
    is_whole_number,
)

_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
_ACCELERATOR_FREE = {"cpu", "disk", "meta"}


@dataclass
class LoadCall:
    """What ``from_pretrained`` will be called with, and who owns what the load leaves behind.

    Made by :func:`prepare_load`, the one load path of :func:`load_model`, the session cache and the
    fixtures. The offload folder it made (if any) is its own: removed when a load fails, and when the
    loaded model is garbage collected (or at once with :meth:`release`).
    """

    model: ModelSpec
    cls: Any
    source: str
    kwargs: dict[str, Any]
    precision: str
    device_map: Any = None
    notes: list[str] = field(default_factory=list)
    offload_folder: str | None = None
    allow_pickle: bool = False
    kernels: Any = None  # the _compat.transformers.KernelPlan of this load
    _remove_folder: Any = field(default=None, repr=False)
    _finalizer: Any = field(default=None, repr=False)

    def run(self):
        """Call ``from_pretrained``; any failure is one :class:`ModelLoadError` line naming the model.

        A failed load gives back what it allocated before the error reaches the caller: the message is
        made inside the ``except`` and raised outside it, so no traceback keeps the half-built model alive.
        """
        from pytest_llmload._internal.loading.quiet_logs import quiet_loading

        message = None
        try:
            with quiet_loading():
                loaded = self.cls.from_pretrained(self.source, **self.kwargs)
                if self.kernels is not None and self.kernels.kernelize_after:
                    from pytest_llmload._internal.compat.transformers import kernelize

                    kernelize(loaded, getattr(loaded, "hf_device_map", None) or self.device_map)
        except BaseException as exc:
            self.release()
            if not isinstance(exc, Exception) or isinstance(exc, LLMLoadUsageError):
                raise
            message = _load_error(self.model, self.source, exc, self.allow_pickle)
            del exc
        if message is not None:
            loaded = None
            from pytest_llmload._internal.loading.cache import release_memory

            release_memory()
            raise ModelLoadError(message)
        if self._remove_folder is not None:
            self._finalizer = weakref.finalize(loaded, self._remove_folder, self.offload_folder)
        return loaded

    def release(self) -> None:
        """Remove the offload folder this load made, now (its model is no longer needed)."""
        if self._finalizer is not None:
            self._finalizer()
        elif self._remove_folder is not None:
            self._remove_folder(self.offload_folder)
        self._remove_folder = None


def resolve_source(model: ModelSpec) -> str:
    """The path or hub id that ``from_pretrained`` gets for ``model`` (building a built-in on first use)."""
    if model.kind == "builtin":
        from pytest_llmload._internal.loading.builtins import builtin_path

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
        from pytest_llmload._internal.loading.safety import check_json_file

        # Not a FIFO, not nested without bound; whether it is JSON at all, AutoConfig says below.
        check_json_file(Path(source) / "config.json", "checkpoint file", parse=False)
    else:
        from pytest_llmload._internal.loading.safety import hub_reachable

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
    from pytest_llmload._internal.compat.transformers import causal_lm_mappings

    for mapping in causal_lm_mappings():
        if type(config) in mapping:
            return mapping[type(config)]
    return transformers.AutoModel


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
    if precision in QUANTIZED_PRECISIONS and _on_virtual_gpus(device_map, devices):
        return (
            f"{precision} does not run on virtual GPUs (bitsandbytes' parameter classes cannot hold a virtual "
            "card's tensor); use device_map 'cpu' for bitsandbytes' CPU backend, or a real GPU"
        )
    return None


def _virtual_gpus_running() -> bool:
    from pytest_llmload._internal.hardware import virtual_gpus_now

    return virtual_gpus_now()


def _on_virtual_gpus(device_map: Any, devices: set) -> bool:
    """Would this map put modules on the cards of a running virtual GPU fleet?"""
    if not _virtual_gpus_running():
        return False
    if isinstance(device_map, dict):
        return bool(devices - _ACCELERATOR_FREE)
    return device_map not in _ACCELERATOR_FREE


def prepare_load(
    model: Any,
    *,
    device_map: Any = None,
    precision: str | None = None,
    max_memory: Any = None,
    model_class: Any = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    hub_kernels: bool = False,
    config: Any = None,
    offload_parent: str | None = None,
    **kwargs: Any,
) -> LoadCall:
    """Everything ``from_pretrained`` will be called with, checked, without loading a weight.

    The config is read once here (or given, already read) and handed to ``from_pretrained``. A load
    that may put weights on disk gets an offload folder of its own, in ``offload_parent`` (the session
    cache's folder) or in a new folder that only this process owns. Loads are hermetic: ``use_kernels=False``
    unless ``hub_kernels`` (``--llm-hub-kernels``) asks for transformers' own default, and never on a
    virtual fleet (hub kernels are CUDA code; a virtual card computes on the CPU).
    """
    from pytest_llmload._internal.loading.precision import (
        apply_config_overrides,
        quantization_config_for,
        reconcile_precision,
    )

    spec = parse_model(model)
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

    config = config if config is not None else load_config(spec, trust_remote_code=trust_remote_code)
    config = apply_config_overrides(config, kwargs)
    cls = model_class_for(config, model_class)
    source = resolve_source(spec)
    notes: list[str] = []
    if tensor_parallel:
        from pytest_llmload._internal.distributed import tp_load_kwargs

        kwargs = {**tp_load_kwargs(spec.text, config, cls), **kwargs}  # distributed_config over the world

    from pytest_llmload._internal.compat.transformers import KernelPlan

    virtual = _virtual_gpus_running()
    own = {k for k in ("use_kernels", "kernel_config", "kernels_mode") if k in kwargs}
    kernels = KernelPlan(hub_kernels, virtual=virtual, callers_own=bool(own))
    if virtual and kwargs.get("use_kernels"):
        notes.append("use_kernels=False: hub kernels never apply on virtual GPUs")
    call: dict[str, Any] = {"trust_remote_code": trust_remote_code, "config": config, **kernels.kwargs}
    if _is_local(spec):
        from pytest_llmload._internal.loading.safety import check_checkpoint_files

        check_checkpoint_files(source)
        call["local_files_only"] = True
    else:
        from pytest_llmload._internal.loading.safety import hub_reachable

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
        from pytest_llmload._internal.compat.bitsandbytes import import_bitsandbytes

        try:
            import_bitsandbytes(hub_kernels=kernels.requested or None)  # quietly, before transformers' quantizer
        except ImportError:
            pass  # transformers says what is missing
    if precision in QUANTIZED_PRECISIONS and kwargs.get("quantization_config") is None:
        devices = map_devices(resolved_map)
        overrides = {}
        if devices & {"cpu", "disk"} and devices - _ACCELERATOR_FREE:
            overrides["llm_int8_enable_fp32_cpu_offload"] = True
            notes.append("fp32-cpu-offload: modules on cpu/disk stay in fp32")
        call["quantization_config"] = quantization_config_for(precision, **overrides)
    if resolved_map is not None:
        call["device_map"] = resolved_map
    if budget:
        call["max_memory"] = budget
    call.update(kwargs)
    if virtual:
        call["use_kernels"] = False

    remove = None
    if "offload_folder" not in call and needs_offload_folder(call.get("device_map"), call.get("max_memory")):
        if offload_parent is not None:
            import tempfile

            call["offload_folder"] = tempfile.mkdtemp(prefix="offload-", dir=offload_parent)
            remove = _remove_tree
        else:
            from pytest_llmload._internal.loading.ownership import remove_owned_folder, session_folder

            call["offload_folder"] = session_folder()
            remove = remove_owned_folder
    return LoadCall(spec, cls, source, call, precision, resolved_map, notes, call.get("offload_folder"),
                    allow_pickle, kernels, remove)


def _remove_tree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def load_model(
    model: Any,
    *,
    device_map: Any = None,
    precision: str | None = None,
    max_memory: Any = None,
    model_class: Any = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    hub_kernels: bool = False,
    config: Any = None,
    **kwargs: Any,
):
    """Load ``model`` (``builtin:NAME``, a directory or a hub id) with ``from_pretrained``.

    ``precision`` is one of auto, fp32, fp16, bf16, int8, nf4, fp4; ``device_map`` anything
    ``--llm-device-map`` accepts (default: none, i.e. transformers' own default placement).
    Disk entries get a temporary offload folder, removed when the model is garbage collected.
    Safetensors weights only, unless ``allow_pickle=True``; checkpoint code only with ``trust_remote_code``;
    no hub kernels (``use_kernels=False``) unless ``hub_kernels=True``.
    :func:`prepare_load` tells what the load will do (resolved map, notes, offload folder) without loading.
    """
    call = prepare_load(model, device_map=device_map, precision=precision, max_memory=max_memory,
                        model_class=model_class, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                        hub_kernels=hub_kernels, config=config, **kwargs)
    return call.run()


def needs_offload_folder(device_map: Any, max_memory: Any = None) -> bool:
    """Whether a load may put weights on disk: a strategy or a budget can spill, a map can name disk."""
    if device_map is None:
        return False
    return (isinstance(device_map, str) and device_map != "tp") or "disk" in map_devices(device_map) or bool(max_memory)


def _load_error(spec: ModelSpec, source: str, exc: BaseException, allow_pickle: bool) -> str:
    from pytest_llmload._internal.compat.transformers import kernel_failure

    message = _first_line(exc)
    where = f"model {spec.text!r}" if spec.kind != "path" else f"checkpoint {source}"
    kernel = kernel_failure(exc)
    if kernel is not None:
        repo, said = kernel
        return (f"cannot load {where}: hub kernel {repo} could not be loaded ({said}); hub kernels were asked for "
                "(--llm-hub-kernels / llm_hub_kernels, or use_kernels / kernel_config): leave them off to test "
                "the model's own code")
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
        from pytest_llmload._internal.loading.safety import check_tokenizer_files

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
