"""peft: its default LoRA targets per model type (a private table), and the k-bit preparation."""

from __future__ import annotations

import functools
from typing import Any

_PEFT_MAPPING = "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING"  # in peft.utils.constants, 0.14 to 0.21


@functools.lru_cache(maxsize=None)
def lora_target_mapping() -> dict[str, Any]:
    """peft's default LoRA targets per ``model_type``, read from its source (importing peft takes seconds
    and imports bitsandbytes); the imported module is used when peft is already loaded."""
    import sys

    module = sys.modules.get("peft.utils.constants")
    if module is not None:
        return dict(getattr(module, _PEFT_MAPPING, {}))
    import ast
    import importlib.util
    from pathlib import Path

    try:
        spec = importlib.util.find_spec("peft")
        folder = Path(list(spec.submodule_search_locations or [])[0])
        tree = ast.parse((folder / "utils" / "constants.py").read_text())
    except (ImportError, AttributeError, IndexError, TypeError, OSError, SyntaxError, ValueError):
        return {}
    mapping: dict[str, Any] = {}
    for node in tree.body:
        if not isinstance(node, ast.Assign) or len(node.targets) != 1:
            continue
        target = node.targets[0]
        try:
            if isinstance(target, ast.Name) and target.id == _PEFT_MAPPING:
                mapping = dict(ast.literal_eval(node.value))
            elif (isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name)
                  and target.value.id == _PEFT_MAPPING):
                mapping[ast.literal_eval(target.slice)] = ast.literal_eval(node.value)
        except (ValueError, TypeError, SyntaxError):
            continue
    return mapping


def prepare_model_for_kbit_training(model: Any, **kwargs: Any) -> Any:
    from peft import prepare_model_for_kbit_training as prepare

    return prepare(model, **kwargs)
