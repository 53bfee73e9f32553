"""A model's files: its source (a path, a hub id, a built-in), config, class and tokenizer.

torch and transformers are imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pytest_llmload._internal.config.specs import ModelSpec, parse_model
from pytest_llmload.errors import LLMLoadUsageError, ModelLoadError


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
