"""A model's files: its source (a path, a hub id, a built-in), config, class and tokenizer.

torch and transformers are imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import re
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
        check_config_values(model, f"config {type(model).__name__}")
        return model
    if hasattr(model, "config") and isinstance(getattr(model, "config"), PretrainedConfig):
        return model.config
    spec = parse_model(model)
    source = resolve_source(spec)
    where = f"config.json of {spec.text!r}"
    local_only, offline_reason = _is_local(spec), ""
    if local_only:
        from pytest_llmload._internal.loading.safety import check_json_file

        # Not a FIFO, not nested without bound; whether it is JSON at all, AutoConfig says below.
        check_json_file(Path(source) / "config.json", "checkpoint file", parse=False)
        # Its sizes as written, before transformers' own checks trip on them (num_attention_heads=0: a modulo).
        check_config_values(_raw_config(Path(source) / "config.json"), where)
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
    check_config_values(config, where)
    return config


# -- the sizes a config defines a model with -----------------------------------------------------------

MAX_DIMENSION = 2**24  # real checkpoints: hidden and MLP sizes in the tens of thousands, vocabularies ~300,000
_DIMENSION_KEYS = frozenset({
    "hidden_size", "n_embd", "d_model", "intermediate_size", "n_inner", "d_ff", "ffn_dim", "encoder_ffn_dim",
    "decoder_ffn_dim", "moe_intermediate_size", "vocab_size", "num_attention_heads", "n_head", "num_heads",
    "encoder_attention_heads", "decoder_attention_heads", "num_key_value_heads", "head_dim", "d_kv"})
_LAYER_KEY = re.compile(r"^(num_(hidden_|encoder_|decoder_)?layers|n_layers?|(encoder|decoder)_layers)$")
_PLAN_KEYS = ("base_model_tp_plan", "base_model_pp_plan", "base_model_ep_plan", "base_model_fsdp_plan")


def check_config_values(config: Any, where: str) -> None:
    """Raise :class:`ModelLoadError` (``invalid WHERE: FIELD=VALUE: what is accepted``) if a field that sizes
    the model cannot build one: layer counts below 1, hidden/MLP/vocabulary/head sizes outside 1 to
    :data:`MAX_DIMENSION` (or not whole numbers), key-value heads that do not divide the attention heads,
    parallelism plans that are not objects. ``config`` is a ``PretrainedConfig`` or config.json's content;
    sub-configs (``text_config``, ...) are checked alike. The one check of config values: every planner,
    estimate, fit check and load reads its config through :func:`load_config`, which calls it."""
    pending = [("", _config_values(config))]
    while pending:
        prefix, values = pending.pop(0)  # the top level first
        for key, value in values.items():
            if isinstance(value, dict) and key not in _PLAN_KEYS:
                pending.append((f"{prefix}{key}.", value))
                continue
            problem = _value_problem(str(key), value, values)
            if problem:
                name, text = f"{prefix}{key}", repr(value)
                name = name if name.isprintable() else repr(name)  # one line, whatever the JSON keys hold
                text = text if len(text) <= 60 else text[:57] + "..."
                raise ModelLoadError(f"invalid {where}: {name}={text}: {problem}")


def _config_values(config: Any) -> dict:
    if isinstance(config, dict):
        return config
    from transformers import PretrainedConfig

    values = config.to_dict()
    for key in _PLAN_KEYS:  # left out of to_dict
        values[key] = getattr(config, key, None)
    for key, sub in vars(config).items():
        if isinstance(sub, PretrainedConfig):
            values[key] = _config_values(sub)
    return values


def _value_problem(key: str, value: Any, values: dict) -> str | None:
    if key in _PLAN_KEYS:
        return None if value is None or isinstance(value, dict) else "expected an object of module names to plans, or null"
    whole = isinstance(value, int) and not isinstance(value, bool)
    if value is None or not (_LAYER_KEY.match(key) or key in _DIMENSION_KEYS):
        return None
    if _LAYER_KEY.match(key):
        return None if whole and value >= 1 else "expected a whole number >= 1"
    if not (whole and 1 <= value <= MAX_DIMENSION):
        return f"expected a whole number from 1 to {MAX_DIMENSION}"
    heads = values.get("num_attention_heads")
    if key == "num_key_value_heads" and isinstance(heads, int) and heads >= 1 and heads % value:
        return f"expected a divisor of num_attention_heads={heads}"
    return None


def _raw_config(file: Path) -> dict:
    """config.json's content, or ``{}`` where it is not a JSON object (AutoConfig then says what it is)."""
    from pytest_llmload._internal.loading.safety import read_json

    try:
        content = read_json(file)
    except (OSError, ValueError):  # safety.DamagedFile is a ValueError
        return {}
    return content if isinstance(content, dict) else {}


def _validation_error(exc: BaseException) -> bool:
    """Whether ``exc`` is one of the config validators' errors (huggingface_hub's strict dataclasses), whose
    message says the field on its first line and the reason on the next ones."""
    return any(cls.__name__ == "StrictDataclassError" for cls in type(exc).__mro__)


def _config_error(spec: ModelSpec, exc: BaseException, trust_remote_code: bool, offline_reason: str = "") -> str:
    message = _first_line(exc)
    if "trust_remote_code" in str(exc) and not trust_remote_code:
        return (
            f"model {spec.text!r} needs code from the checkpoint; "
            "pass --llm-trust-remote-code (trust_remote_code=True) if you trust it"
        )
    if _validation_error(exc):
        joined = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        return f"invalid config.json of {spec.text!r}: {joined}"
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
