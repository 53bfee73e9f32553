"""Loading models and tokenizers through the real ``from_pretrained``, under a device map and a precision.

torch and transformers are imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import gc
import sys
import weakref
from dataclasses import dataclass, field
from typing import Any

from pytest_llmload._internal.config.specs import (
    QUANTIZED_PRECISIONS,
    ModelSpec,
    parse_device_map,
    parse_max_memory,
    parse_model,
)
from pytest_llmload._internal.loading.files import (
    _first_line,
    _is_local,
    _only_pickle_weights,
    load_config,
    model_class_for,
    resolve_source,
)
from pytest_llmload._internal.loading.placement import placement, resolve_device_map, virtual_gpus_running
from pytest_llmload.errors import LLMLoadUsageError, ModelLoadError

_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def release_memory() -> None:
    """Collect garbage and give cached CUDA blocks back to the driver (where CUDA is in use)."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


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
    kernels: Any = None  # the compat.transformers.KernelPlan of this load
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
    where = placement(precision, map_spec, tuple(sorted(budget.items(), key=lambda kv: str(kv[0]))) if budget else None)
    problem = where.quantized_problem(precision)
    if problem and kwargs.get("quantization_config") is None:
        raise LLMLoadUsageError(problem)

    config = config if config is not None else load_config(spec, trust_remote_code=trust_remote_code)
    config = apply_config_overrides(config, kwargs)
    cls = model_class_for(config, model_class)
    source = resolve_source(spec)
    notes: list[str] = []
    if tensor_parallel:
        from pytest_llmload._internal.distributed.world import tp_load_kwargs

        kwargs = {**tp_load_kwargs(spec.text, config, cls), **kwargs}  # distributed_config over the world

    from pytest_llmload._internal.compat.transformers import KernelPlan

    virtual = virtual_gpus_running()
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
        overrides = {}
        if where.fp32_offload:
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
    if "offload_folder" not in call and where.needs_offload:
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


