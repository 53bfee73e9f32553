"""Assertions on loaded models that find the bugs users hit, and say what is wrong in plain words.

Registered for pytest's assertion rewriting by ``pytest_llmload/__init__.py``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable

from .devices import execution_order_hops, input_device, normalize_device, resolve
from .sizes import format_size, parse_size

# Default tolerance of assert_outputs_close, as a share of the reference's largest magnitude.
# Measured on the built-in models against fp32 (worst case x ~2): fp16 0.1%, bf16 0.8%, int8 1.6%,
# nf4 21%, fp4 31%. 4-bit on tiny random models is coarse; on trained models it is much closer.
RELATIVE_TOLERANCE = {"fp32": 1e-5, "fp16": 1e-2, "bf16": 4e-2, "int8": 8e-2, "nf4": 0.5, "fp4": 0.6}
_SIZE_WORDS = {"max": "limit", "min": "floor"}


def _fail(headline: str, *details: str) -> None:
    raise AssertionError("\n".join([headline, *[d for d in details if d]]))


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    rows = [header, *rows]
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    return "\n".join("  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


# -- placement -------------------------------------------------------------------------------------


def _effective_map(model) -> dict[str, Any]:
    from .loading import effective_device_map

    return effective_device_map(model)


def _execution_order(model, device_map: dict[str, Any]) -> list[str]:
    position = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(device_map, key=lambda entry: position.get(entry, len(position)))


def device_hops(model) -> int:
    """How many times a forward pass crosses from one device to the next, in the map's execution order.

    With naive model parallelism only one device works at a time and each hop is a transfer, so a map
    that zig-zags (layer 0 on GPU 0, layer 1 on GPU 1, layer 2 on GPU 0) is slower than it needs to be.
    """
    device_map = _effective_map(model)
    return execution_order_hops([device_map[e] for e in _execution_order(model, device_map)])


def assert_device_map(model, expected: Any = None, *, devices: Iterable[Any] | Any = None,
                      exact: bool = False, max_hops: int | None = None) -> None:
    """Assert where ``model`` is placed.

    ``expected`` maps modules or prefixes to devices (``{"model.layers.0": 0, "lm_head": "cpu"}``), or
    is a set of devices that must be used; ``devices=`` gives that set beside a dict. A single device
    (``"cpu"``, ``0``, ``torch.device("cuda", 0)``) is the set of that one device. Devices compare by
    meaning (``0 == "cuda:0" == torch.device("cuda", 0)``). A module in ``expected`` that the model does
    not have fails the assertion. With ``exact``, every parameter must be where the expected map puts it
    and no other device may be used. ``max_hops`` bounds :func:`device_hops`.
    """
    from .errors import LLMLoadUsageError

    if _is_device(expected):
        expected = {expected}
    if isinstance(expected, (set, frozenset, list, tuple)):
        if devices is not None:
            raise LLMLoadUsageError("assert_device_map: give the set of devices once, as expected= or as devices=")
        devices, expected = expected, None
    if expected is not None and not isinstance(expected, dict):
        raise LLMLoadUsageError(
            f"assert_device_map: expected={expected!r} ({type(expected).__name__}) is not accepted; expected a dict "
            "of module -> device, a set of devices, or one device")
    if devices is not None:
        devices = [devices] if _is_device(devices) else devices
        if not isinstance(devices, (set, frozenset, list, tuple)):
            raise LLMLoadUsageError(
                f"assert_device_map: devices={devices!r} ({type(devices).__name__}) is not accepted; expected a "
                "device ('cpu', 0, 'cuda:1', a torch.device) or a set of them")
        wanted = sorted({_device_name(d, "devices") for d in devices})
    expected_names = {entry: _device_name(device, f"expected[{entry!r}]") for entry, device in (expected or {}).items()}
    for entry in expected_names:
        if not isinstance(entry, str):
            raise LLMLoadUsageError(f"assert_device_map: expected key {entry!r} is not a module name (a string)")

    actual = _effective_map(model)
    mismatches: list[tuple[str, str, str]] = []
    problems = []
    if expected:
        tensors = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
        known = {n for n, _ in model.named_modules()} | set(tensors) | {  # tied weights under every name
            n for n, _ in model.named_parameters(remove_duplicate=False)}
        missing_modules = [entry for entry in expected if entry not in known]
        for entry in missing_modules:
            problems.append(f"  {entry!r} names no module of {type(model).__name__}{_suggest(entry, known)}")
        present = {entry: device for entry, device in expected.items() if entry in known}
        checks = tensors if exact else list(present)
        for name in checks:
            entry, _ = resolve(present, name)
            if entry is None:
                if exact:
                    mismatches.append((name, "(not in expected)", _where(actual, name, tensors)))
                continue
            want_name = expected_names[entry]
            got = _where(actual, name, tensors)
            if got != want_name:
                mismatches.append((entry if not exact else name, want_name, got))
        if exact:
            mismatches = _collapse(mismatches)
    used = sorted({normalize_device(d) for d in actual.values()})
    if mismatches:
        problems.insert(0, _table(mismatches, ("module", "expected", "actual")))
    if devices is not None:
        missing = [d for d in wanted if d not in used]
        extra = [d for d in used if d not in wanted] if exact else []
        if missing or extra:
            problems.append(
                f"  devices used: {', '.join(used)}; expected {'exactly ' if exact else ''}{', '.join(wanted)}"
                + (f" (unused: {', '.join(missing)})" if missing else "")
                + (f" (unexpected: {', '.join(extra)})" if extra else "")
            )
    if max_hops is not None:
        hops = device_hops(model)
        if hops > max_hops:
            order = _execution_order(model, actual)
            path = " -> ".join(f"{e or '(model)'}@{normalize_device(actual[e])}" for e in order)
            problems.append(f"  {hops} device hops in execution order, at most {max_hops} allowed: {path}")
    if problems:
        _fail(f"device map of {type(model).__name__} is not as expected", *problems)


def _is_device(value: Any) -> bool:
    """One device (``"cpu"``, ``0``, a ``torch.device``) rather than a collection of them."""
    return (isinstance(value, (str, int)) and not isinstance(value, bool)) or (
        hasattr(value, "type") and hasattr(value, "index"))


def _device_name(device: Any, where: str) -> str:
    from .errors import LLMLoadUsageError

    from .specs import check_device

    try:
        return check_device(normalize_device(device))
    except ValueError:
        raise LLMLoadUsageError(
            f"assert_device_map: {where}: {device!r} is not a device; expected an index, a name such as "
            "'cuda:0' or 'cpu', or a torch.device") from None


def _suggest(name: str, known: set[str]) -> str:
    """A hint after "names no module": the blocks a numbered container has, or a near miss."""
    import difflib

    parent, _, last = name.rpartition(".")
    if last.isdigit() and parent in known:
        numbers = sorted(int(k[len(parent) + 1:]) for k in known
                         if k.startswith(parent + ".") and k[len(parent) + 1:].isdigit())
        if numbers:
            return f" ({parent} has {len(numbers)}: {numbers[0]}..{numbers[-1]})"
    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _where(device_map: dict[str, Any], name: str, tensors: list[str]) -> str:
    entry, device = resolve(device_map, name)
    if entry is not None:
        return normalize_device(device)
    below = {normalize_device(d) for k, d in device_map.items() if k.startswith(name + ".")}
    if not below and any(t.startswith(name + ".") or t == name for t in tensors):
        return "(not in map)"
    if not below:
        return "(no such module)"
    return " + ".join(sorted(below))


def _collapse(rows: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """Group parameter rows by module so a table shows ``model.layers.3`` once, not nine times."""
    grouped: dict[tuple[str, str, str], int] = {}
    for name, want, got in rows:
        key = (name.rsplit(".", 1)[0] if "." in name else name, want, got)
        grouped[key] = grouped.get(key, 0) + 1
    return [(m + (f" ({n} tensors)" if n > 1 else ""), w, g) for (m, w, g), n in grouped.items()]


# -- memory ----------------------------------------------------------------------------------------


def module_footprints(model, *, depth: int | None = None) -> dict[str, int]:
    """Bytes of parameters and buffers per module, counted as ``get_memory_footprint()`` counts them."""
    sizes: dict[str, int] = {}
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        module = name.rsplit(".", 1)[0] if "." in name else ""
        if depth is not None:
            module = ".".join(module.split(".")[:depth])
        sizes[module] = sizes.get(module, 0) + tensor.nelement() * tensor.element_size()
    return sizes


def _biggest(model, count: int = 5) -> str:
    sizes = module_footprints(model)
    top = sorted(sizes.items(), key=lambda kv: -kv[1])[:count]
    return _table([(m or "(root)", format_size(s)) for m, s in top], ("biggest modules", "bytes"))


def footprint_message(model, limit: int, footprint: int | None = None) -> str:
    footprint = model.get_memory_footprint() if footprint is None else footprint
    return (f"{type(model).__name__} has a memory footprint of {format_size(footprint)} ({footprint} bytes), "
            f"over the limit of {format_size(limit)} ({limit} bytes)")


def assert_memory_footprint(model, *, max: Any = None, min: Any = None) -> None:  # noqa: A002
    """Assert ``min <= model.get_memory_footprint() <= max``; sizes as bytes or strings (``"2 GiB"``)."""
    if max is None and min is None:
        raise TypeError("assert_memory_footprint needs max=, min= or both")
    footprint = model.get_memory_footprint()
    upper = parse_size(_total(max)) if max is not None else None
    lower = parse_size(_total(min)) if min is not None else None
    if upper is not None and footprint > upper:
        _fail(footprint_message(model, upper, footprint), _biggest(model))
    if lower is not None and footprint < lower:
        _fail(f"{type(model).__name__} has a memory footprint of {format_size(footprint)} ({footprint} bytes), "
              f"under the floor of {format_size(lower)} ({lower} bytes): is it missing weights, or quantized "
              f"when it should not be?", _biggest(model))


def _total(value: Any) -> Any:
    return value.total if isinstance(value, Footprint) else value


@dataclass(frozen=True)
class Footprint:
    """What a model costs in a precision, from its config: transformers' own size accounting.

    ``quantized`` is the bytes of the linear layers bitsandbytes converts in int8/4-bit (the same
    layers in every precision, so ratios compare like with like); ``other`` is everything else.
    """

    precision: str
    total: int
    quantized: int
    other: int
    modules: dict[str, int] = field(default_factory=dict, repr=False)


def _quantized_module_names(model: Any) -> set[str]:
    import bitsandbytes as bnb

    from .planning import meta_model

    network, _ = meta_model(model, "int8")
    return {n for n, m in network.named_modules() if isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))}


def expected_footprint(model: Any, precision: str) -> Footprint:
    """What ``get_memory_footprint()`` will report for ``model`` loaded in ``precision`` (from the config).

    Computed from the model's own modules and dtypes on the meta device, with the quantizer's sizes
    for int8/4-bit, so an assertion needs no magic number::

        int8, fp16 = expected_footprint(m, "int8"), expected_footprint(m, "fp16")
        assert int8.quantized <= 0.6 * fp16.quantized
        assert_memory_footprint(model, max=int8)
    """
    from .planning import module_sizes
    from .specs import parse_precision

    precision = parse_precision(precision)
    source = getattr(model, "config", model)
    sizes = module_sizes(source, precision)
    quantizable = _quantized_module_names(source)
    quantized = sum(sizes.get(name, 0) for name in quantizable)
    return Footprint(precision, sizes[""], quantized, sizes[""] - quantized, sizes)


# -- k-bit training --------------------------------------------------------------------------------


def _bnb_layers(model) -> dict[str, Any]:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return {}
    return {n: m for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))}


def _quantized_weight_ids(layers: dict[str, Any]) -> set[int]:
    return {id(m.weight) for m in layers.values()}


def default_inputs(model, batch: int = 2, length: int = 8) -> dict[str, Any]:
    """A small deterministic batch of token ids for ``model`` (with decoder ids for encoder-decoders)."""
    import torch

    config = model.config
    vocab = getattr(config, "vocab_size", None) or 100
    device = input_device(model)
    ids = (torch.arange(batch * length).reshape(batch, length) * 7 + 3) % max(vocab - 1, 1) + 1
    inputs = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids[:, : max(length // 2, 1)].to(device)
    return inputs


def _output_tensor(output) -> Any:
    for name in ("logits", "last_hidden_state"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


def _is_adapter(name: str) -> bool:
    return any(key in name for key in ("lora_", "modules_to_save", "adapter", "prompt_encoder", "ia3_", "vera_"))


def assert_int8_trainable(model, inputs: Any = None) -> None:
    """Assert that a quantized (int8 or 4-bit) model is set up for adapter training, and that it trains.

    Checks, in order: the model is really quantized; non-quantized parameters are fp32 (what
    ``prepare_model_for_kbit_training`` does); with gradient checkpointing, the input embeddings'
    outputs require grad or checkpointing is non-reentrant; there are trainable adapter parameters and
    every base weight is frozen; one forward and backward on a tiny batch gives finite gradients that
    are non-zero where they must be (LoRA B matrices; A gets no gradient while B is still zero), and
    none on frozen weights. Gradients are cleared afterwards. ``inputs`` (default: a small deterministic
    batch) takes the forms :func:`assert_outputs_close` takes.
    """
    import torch

    layers = _bnb_layers(model)
    if not layers:
        _fail("model is not quantized: no bitsandbytes Linear8bitLt or Linear4bit layer found",
              "  fix: load it with quantization_config=BitsAndBytesConfig(load_in_8bit=True) (or load_in_4bit=True), "
              "or precision='int8'/'nf4' in pytest-llmload")
    quantized_ids = _quantized_weight_ids(layers)
    named = list(model.named_parameters())

    half = [n for n, p in named if id(p) not in quantized_ids and p.dtype in (torch.float16, torch.bfloat16)]
    if half:
        _fail(f"{len(half)} non-quantized parameter(s) are not fp32 (e.g. {', '.join(half[:3])}); "
              "k-bit training is unstable in half precision",
              "  fix: call peft.prepare_model_for_kbit_training(model) before get_peft_model")

    checkpointing = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    if checkpointing:
        reentrant = any(_uses_reentrant(m) for m in checkpointing)
        if reentrant and not _embeddings_require_grad(model):
            _fail("gradient checkpointing is reentrant, but the input embeddings' outputs do not require grad: "
                  "no gradient reaches the adapters inside checkpointed layers",
                  "  fix: call peft.prepare_model_for_kbit_training(model) (it calls "
                  "model.enable_input_require_grads()), or activation_checkpointing_enable("
                  "activation_checkpointing_kwargs={'use_reentrant': False})")

    trainable = [(n, p) for n, p in named if p.requires_grad]
    adapters = [(n, p) for n, p in trainable if _is_adapter(n)]
    if not adapters:
        _fail("no trainable adapter parameters: a quantized model can only be fine-tuned through adapters",
              "  fix: model = peft.get_peft_model(model, LoraConfig(...)) after prepare_model_for_kbit_training")
    unfrozen = [n for n, _ in trainable if not _is_adapter(n)]
    if unfrozen:
        _fail(f"{len(unfrozen)} base parameter(s) are trainable (e.g. {', '.join(unfrozen[:3])}); "
              "only adapter weights should be", "  fix: call peft.prepare_model_for_kbit_training(model) "
              "before get_peft_model (it freezes the base model)")

    was_training = model.training
    model.train()
    model.zero_grad(set_to_none=True)
    try:
        batch = (_to(as_batch(model, inputs, "assert_int8_trainable"), input_device(model)) if inputs is not None
                 else default_inputs(model))
        output = model(**batch)
        loss = getattr(output, "loss", None)
        if loss is None:
            loss = _output_tensor(output).float().pow(2).mean()
        loss.backward()
        if not torch.isfinite(loss.detach()).all():
            _fail(f"the loss of one forward pass is not finite ({loss.item()})")
        missing, zero, bad = [], [], []
        for name, param in adapters:
            grad = param.grad
            must_move = "lora_A" not in name or _lora_b_is_nonzero(model, name)
            if grad is None:
                if must_move:
                    missing.append(name)
                continue
            if not torch.isfinite(grad).all():
                bad.append(name)
            elif must_move and not grad.abs().sum() > 0:
                zero.append(name)
        frozen_with_grad = [n for n, p in named if not p.requires_grad and p.grad is not None]
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if missing:
        _fail(f"{len(missing)} adapter parameter(s) got no gradient after backward (e.g. {', '.join(missing[:3])})",
              "  usual cause: reentrant gradient checkpointing without enable_input_require_grads; "
              "fix: call peft.prepare_model_for_kbit_training(model) before get_peft_model")
    if bad:
        _fail(f"non-finite gradients on {', '.join(bad[:3])}", "  usual cause: fp16 layer norms or an fp16 "
              "loss; fix: call peft.prepare_model_for_kbit_training(model)")
    if zero:
        _fail(f"{len(zero)} adapter parameter(s) got an all-zero gradient (e.g. {', '.join(zero[:3])})",
              "  usual cause: the adapters are not on the path from the inputs to the loss (wrong target_modules?)")
    if frozen_with_grad:
        _fail(f"frozen parameter(s) received gradients: {', '.join(frozen_with_grad[:3])}")


def _uses_reentrant(module) -> bool:
    func = getattr(module, "_gradient_checkpointing_func", None)
    keywords = getattr(func, "keywords", None) or {}
    return bool(keywords.get("use_reentrant", True))


def _embeddings_require_grad(model) -> bool:
    import torch

    embeddings = model.get_input_embeddings()
    device = embeddings.weight.device if embeddings.weight.device.type != "meta" else input_device(model)
    with torch.enable_grad():
        out = embeddings(torch.ones(1, 2, dtype=torch.long, device=device))
    return bool(out.requires_grad)


def _lora_b_is_nonzero(model, a_name: str) -> bool:
    b_name = a_name.replace("lora_A", "lora_B")
    for name, param in model.named_parameters():
        if name == b_name:
            return bool(param.detach().abs().sum() > 0)
    return False


def prepare_model_for_int8_training(model, **kwargs):
    """The seed notes' ``prepare_model_for_int8_training``, removed from peft in 0.10.

    Calls ``peft.prepare_model_for_kbit_training`` (same job: casts non-int8 parameters to fp32,
    makes the input embeddings' outputs require grad, enables gradient checkpointing).
    """
    warnings.warn("prepare_model_for_int8_training was removed from peft in 0.10; use "
                  "peft.prepare_model_for_kbit_training", DeprecationWarning, stacklevel=2)
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, **kwargs)


# -- outputs ---------------------------------------------------------------------------------------


def model_precision(model) -> str:
    """int8 / nf4 / fp4 for bitsandbytes models, else the float dtype of the parameters."""
    layers = _bnb_layers(model)
    if layers:
        layer = next(iter(layers.values()))
        quant_state = getattr(layer.weight, "quant_state", None)
        return getattr(quant_state, "quant_type", None) or ("int8" if "8bit" in type(layer).__name__ else "nf4")
    import torch

    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    for dtype, name in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):
        if dtype in dtypes:
            return name
    return "fp32"


def assert_outputs_close(model, reference, inputs: Any = None, *,
                         atol: float | None = None, rtol: float = 0.0) -> None:
    """Assert that ``model`` (split, offloaded, quantized) computes what ``reference`` computes.

    Compares logits (or ``last_hidden_state``) on ``inputs``: a tensor of token ids (``input_ids``), a
    dict of model inputs, or a tokenizer's ``BatchEncoding`` (default: a small deterministic batch); each
    model gets them on its :func:`input_device`.
    The default ``atol`` is a share of the reference's largest magnitude that depends on the looser
    precision of the two models (:data:`RELATIVE_TOLERANCE`: int8 is not fp32).
    """
    import torch

    batch = as_batch(reference, inputs, "assert_outputs_close") if inputs is not None else default_inputs(reference)
    with torch.no_grad():
        want = _output_tensor(reference(**_to(batch, input_device(reference)))).float().cpu()
        got = _output_tensor(model(**_to(batch, input_device(model)))).float().cpu()
    if got.shape != want.shape:
        _fail(f"outputs differ in shape: {tuple(got.shape)} vs reference {tuple(want.shape)}")
    precisions = (model_precision(model), model_precision(reference))
    if atol is None:
        share = max(RELATIVE_TOLERANCE.get(p, 1e-5) for p in precisions)
        atol = share * float(want.abs().max())
        how = f"default for {'/'.join(sorted(set(precisions)))}: {share:g} x max|reference|"
    else:
        how = "given"
    diff = (got - want).abs()
    allowed = atol + rtol * want.abs()
    if not torch.isfinite(got).all():
        position = tuple(int(i) for i in torch.nonzero(~torch.isfinite(got))[0])
        _fail(f"outputs are not finite, first at position {position}")
    over = diff > allowed
    if over.any():
        worst = int(torch.argmax(diff - allowed))
        position = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), diff.shape))
        _fail(f"outputs differ from the reference: {int(over.sum())} of {diff.numel()} values out of tolerance",
              f"  worst at position {position}: {got[position]:.6g} vs {want[position]:.6g} "
              f"(difference {diff[position]:.3g}, allowed {allowed[position]:.3g}; atol {how}, rtol {rtol:g})")


def _to(batch: dict[str, Any], device) -> dict[str, Any]:
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


_ACCEPTED_INPUTS = ("a tensor of token ids (input_ids), a dict of model inputs such as {'input_ids': ..., "
                    "'attention_mask': ...}, or a tokenizer's BatchEncoding")


def as_batch(model, inputs: Any, where: str) -> dict[str, Any]:
    """``inputs`` as keyword arguments of ``model``: a tensor is ``input_ids`` (one sequence if 1-D), a dict
    or ``BatchEncoding`` is used as it is; an encoder-decoder without decoder inputs gets the start of the
    input ids as ``decoder_input_ids``, as :func:`default_inputs` does. Anything else is a ``TypeError``."""
    import collections.abc

    import torch

    if isinstance(inputs, torch.Tensor):
        token_ids = not (inputs.is_floating_point() or inputs.is_complex() or inputs.dtype == torch.bool)
        if not token_ids or inputs.dim() not in (1, 2):
            raise TypeError(f"{where}: inputs is a {inputs.dim()}-D {inputs.dtype} tensor; a tensor is taken as "
                            "input_ids and must hold integer token ids, shaped (batch, length) or (length,)")
        batch: dict[str, Any] = {"input_ids": inputs if inputs.dim() == 2 else inputs.unsqueeze(0)}
    elif isinstance(inputs, collections.abc.Mapping):  # a dict, or a BatchEncoding (a UserDict)
        batch = dict(inputs.items())
        bad = [k for k in batch if not isinstance(k, str)]
        if bad or not batch:
            raise TypeError(f"{where}: inputs {'has the key ' + repr(bad[0]) if bad else 'is empty'}; "
                            f"expected {_ACCEPTED_INPUTS}")
    else:
        raise TypeError(f"{where}: inputs of type {type(inputs).__module__}.{type(inputs).__qualname__} "
                        f"are not accepted; expected {_ACCEPTED_INPUTS}")
    config = getattr(model, "config", None)
    ids = batch.get("input_ids")
    if (getattr(config, "is_encoder_decoder", False) and isinstance(ids, torch.Tensor) and ids.dim() == 2
            and not {"decoder_input_ids", "decoder_inputs_embeds", "labels"} & set(batch)):
        batch["decoder_input_ids"] = ids[:, : max(ids.shape[1] // 2, 1)]
    return batch
