"""Golden outputs, the values and their comparison: what a value is (a tensor, a dict of tensors, token ids,
text), its device class, the default tolerances per precision, and the failure text that says what differs.

The files next to a test module are ``session/golden_files.py``; the pytest side is ``session/goldens.py``.
"""

from __future__ import annotations

import collections.abc
import numbers
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

from pytest_llmload.errors import LLMLoadUsageError

# (atol, rtol) by precision: |got - golden| <= atol + rtol * |golden|. Across device classes and library
# upgrades fp32 logits move by ~1e-6, half precision by a few ulps of its ~3 digits, bitsandbytes 8-bit logits
# by up to 0.5 between compute capabilities (huggingface/peft#1998), 4-bit more.
GOLDEN_TOLERANCE = {
    "fp64": (1e-7, 1e-7), "fp32": (1e-5, 1e-5), "fp16": (1e-2, 1e-2), "bf16": (5e-2, 5e-2),
    "fp8": (0.5, 0.1), "int8": (0.5, 0.1), "nf4": (1.0, 0.2), "fp4": (1.0, 0.2),
}
DTYPE_PRECISION = {"float64": "fp64", "float32": "fp32", "float16": "fp16", "bfloat16": "bf16",
                   "float8_e4m3fn": "fp8", "float8_e5m2": "fp8"}
# Significant digits that give each float dtype back exactly from its decimal text in the JSON file.
DIGITS = {"float32": 9, "float16": 5, "bfloat16": 4}
STORED_TOPK = 5  # top tokens kept per generated position (more when a check asks for a larger topk)
INLINE_LIMIT = 4096  # tensors with more elements go to the safetensors file beside the JSON

ACCEPTED = ("a tensor, a dict of tensors, token ids (an integer tensor, a list of ints, generate()'s output "
            "with return_dict_in_generate=True, or {'ids': ..., 'scores': ...}) or text (a str or list of str)")
NEEDS_SCORES = ("generate(..., output_scores=True, return_dict_in_generate=True)'s output, or "
                "{'ids': ids, 'scores': scores}")


@dataclass
class Observed:
    """A value in the form it is stored and compared in (tensors detached, on the CPU)."""

    kind: str  # "tensor", "tensors", "ids" or "text"
    tensors: dict[str, Any] = field(default_factory=dict)  # tensor: {"": t}; tensors: the dict's items
    rows: list = field(default_factory=list)  # ids: one list of ints per sequence; text: the strings
    batched: bool = False  # a batch (2-D ids, a list of str), not one sequence
    topk: list | None = None  # ids: per row, per scored position, the top token ids, best first
    scored_from: int = 0  # ids: the first position the scores cover (the prompt is not scored)
    device: Any = None  # where a tensor value lived; None: the cell's device decides


def usage(where: str, text: str) -> LLMLoadUsageError:
    return LLMLoadUsageError(f"{where}: {text}")


def check_arguments(where: str, name: Any, atol: Any, rtol: Any, topk: Any) -> tuple:
    """(atol, rtol, topk) as float, float, int (None stays None); a value not accepted is one line."""
    if not isinstance(name, str) or not name.strip():
        raise usage(where, f"name {name!r} is not accepted; expected a non-empty string, e.g. 'logits'")
    for label, number in (("atol", atol), ("rtol", rtol)):
        if number is None:
            continue
        if isinstance(number, bool) or not isinstance(number, numbers.Real) or not number >= 0 \
                or number == float("inf"):
            raise usage(where, f"{label}={number!r} is not accepted; expected a finite number >= 0, or None "
                               "for the precision's default")
    if topk is not None and (isinstance(topk, bool) or not isinstance(topk, numbers.Integral)
                             or topk < 1):
        raise usage(where, f"topk={topk!r} is not accepted; expected a whole number >= 1, or None (exact ids)")
    return (None if atol is None else float(atol), None if rtol is None else float(rtol),
            None if topk is None else int(topk))


def _tensor_type():
    torch = sys.modules.get("torch")  # a value can only be a tensor when torch was imported
    return torch.Tensor if torch is not None else ()


def observe(where: str, value: Any, topk: int | None) -> Observed:
    """``value`` as an :class:`Observed`; anything not accepted is one line naming it and what is accepted."""
    tensor = _tensor_type()
    if isinstance(value, str) or (isinstance(value, (list, tuple)) and value
                                  and all(isinstance(v, str) for v in value)):
        observed = Observed("text", rows=[value] if isinstance(value, str) else list(value),
                            batched=not isinstance(value, str))
    elif hasattr(value, "sequences") and isinstance(value.sequences, tensor):  # generate()'s output
        scores = getattr(value, "scores", None)
        observed = _ids(where, value.sequences, scores if scores is not None else getattr(value, "logits", None),
                        topk)
    elif isinstance(value, collections.abc.Mapping) and "ids" in value and set(value) <= {"ids", "scores"}:
        observed = _ids(where, value["ids"], value.get("scores"), topk)
    elif isinstance(value, collections.abc.Mapping):
        if not value:
            raise usage(where, f"value is an empty dict; expected {ACCEPTED}")
        for key, item in value.items():
            if not isinstance(key, str) or not isinstance(item, tensor):
                shown = f"the key {key!r}" if not isinstance(key, str) else f"value[{key!r}] is {_type_name(item)}"
                raise usage(where, f"a dict value must map str keys to tensors; {shown}; expected {ACCEPTED}")
        observed = Observed("tensors", tensors={k: _plain(where, v, k) for k, v in value.items()},
                            device=_device(next((v for v in value.values() if v.device.type != "cpu"),
                                                next(iter(value.values())))))
    elif isinstance(value, tensor) and not value.is_floating_point() and value.dtype != _bool_dtype() \
            and not value.is_complex():
        observed = _ids(where, value, None, topk)
    elif isinstance(value, tensor):
        observed = Observed("tensor", tensors={"": _plain(where, value, None)}, device=_device(value))
    elif isinstance(value, (list, tuple)) and value and _is_int_rows(value):
        observed = _ids(where, value, None, topk)
    else:
        raise usage(where, f"value is {_type_name(value)}; expected {ACCEPTED}")
    if topk is not None and observed.kind != "ids":
        raise usage(where, f"topk={topk} applies to generated token ids; the value is a {observed.kind}")
    return observed


def _type_name(value: Any) -> str:
    kind = type(value)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    if isinstance(value, (list, tuple, dict)) and not value:
        return f"an empty {name}"
    return f"{'an' if name[0].lower() in 'aeiou' else 'a'} {name}"


def _bool_dtype():
    return sys.modules["torch"].bool


def _is_int_rows(value) -> bool:
    def ints(row) -> bool:
        return bool(row) and all(isinstance(t, int) and not isinstance(t, bool) for t in row)

    return ints(value) or all(isinstance(r, (list, tuple)) and ints(r) for r in value)


def _device(tensor) -> Any:
    virtual = sys.modules.get("pytest_llmload._internal.virtual.tensor")
    if virtual is not None and isinstance(tensor, virtual.VirtualTensor):
        return "virtual"
    return tensor.device


def _plain(where: str, tensor, key: str | None):
    if tensor.is_complex() or tensor.device.type == "meta":
        what = "complex" if tensor.is_complex() else "on the meta device (no data)"
        raise usage(where, f"{'value' if key is None else f'value[{key!r}]'} is a {what} tensor; golden tensors "
                           "hold real values (take .real/.imag, or compute on a device with data)")
    return tensor.detach().cpu().contiguous()


def _ids(where: str, ids: Any, scores: Any, topk: int | None) -> Observed:
    tensor = _tensor_type()
    device = None
    if isinstance(ids, tensor):
        if ids.is_floating_point() or ids.is_complex() or ids.dim() not in (1, 2):
            raise usage(where, f"token ids must be an integer tensor of shape (length,) or (batch, length); got "
                               f"a {ids.dim()}-D {ids.dtype} tensor")
        device = _device(ids)
        batched, rows = ids.dim() == 2, ids.detach().cpu().tolist()
    elif isinstance(ids, (list, tuple)) and ids and _is_int_rows(ids):
        batched = isinstance(ids[0], (list, tuple))
        rows = [list(r) for r in ids] if batched else list(ids)
    else:
        raise usage(where, f"token ids are {_type_name(ids)}; expected an integer tensor or a list of ints")
    rows = rows if batched else [rows]
    observed = Observed("ids", rows=rows, batched=batched, device=device)
    if scores is None:
        if topk is not None:
            raise usage(where, f"topk={topk} needs the scores of each generated position: pass {NEEDS_SCORES}")
        return observed
    torch = sys.modules["torch"]
    if isinstance(scores, (list, tuple)) and scores and all(isinstance(s, tensor) for s in scores):
        scores = torch.stack([s.detach().cpu().float().reshape(-1, s.shape[-1]) for s in scores], dim=1)
    elif isinstance(scores, tensor) and scores.dim() in (2, 3):
        scores = scores.detach().cpu().float()
        scores = scores if scores.dim() == 3 else scores.unsqueeze(0)
    else:
        raise usage(where, f"scores are {_type_name(scores)}; expected generate()'s scores (a tuple of (batch, vocab) "
                           "tensors, one per generated token) or a (batch, generated, vocab) tensor")
    if scores.shape[0] != len(rows) or scores.shape[1] > min(len(r) for r in rows):
        raise usage(where, f"scores of shape {tuple(scores.shape)} do not fit {len(rows)} sequence(s) of "
                           f"{min(len(r) for r in rows)} ids; expected (batch, generated tokens, vocab)")
    vocab = scores.shape[-1]
    if topk is not None and topk >= vocab:
        raise usage(where, f"topk={topk} is not below the vocabulary's {vocab} tokens: every token would be in the "
                           f"top-{topk} and nothing compared; pass a topk below {vocab}, or None for exact ids")
    keep = min(max(topk or 0, STORED_TOPK), vocab)
    observed.topk = scores.topk(keep, dim=-1).indices.tolist()
    observed.scored_from = len(rows[0]) - scores.shape[1]
    return observed


def device_class(device: Any) -> str:
    """``cpu``, ``cuda-sm80``, ``cuda-sm90``, ``rocm-gfx942``, ``virtual`` (the virtual fleet), ``mps``, ..."""
    if device == "virtual":
        return "virtual"
    kind = getattr(device, "type", str(device).split(":")[0])
    if kind != "cuda":
        return kind
    from pytest_llmload._internal.virtual import active_fleet

    if active_fleet() is not None:
        return "virtual"
    import torch

    if getattr(torch.version, "hip", None):
        arch = getattr(torch.cuda.get_device_properties(device), "gcnArchName", "") or "unknown"
        return f"rocm-{arch.split(':')[0]}"
    major, minor = torch.cuda.get_device_capability(device)
    return f"cuda-sm{major}{minor}"


def tolerance(dtype: str, precision: tuple[str, str] | None, atol: float | None,
              rtol: float | None) -> tuple[float, float, str]:
    """(atol, rtol, how they were chosen). ``precision``: the cell's or model's (name, where from); else the
    tensor's dtype decides. Integer and bool tensors compare exactly unless given tolerances."""
    if dtype.startswith(("int", "uint", "bool")):
        default, because = (0.0, 0.0), f"exact for {dtype} values"
    else:
        name, source = precision or (DTYPE_PRECISION.get(dtype, "fp32"), f"the tensor's dtype {dtype}")
        default = GOLDEN_TOLERANCE.get(name, GOLDEN_TOLERANCE["fp32"])
        because = f"the default for {name}: {source}"
    given = [label for label, v in (("atol", atol), ("rtol", rtol)) if v is not None]
    how = because if not given else f"{' and '.join(given)} given" + ("" if len(given) == 2 else f", else {because}")
    return (default[0] if atol is None else float(atol)), (default[1] if rtol is None else float(rtol)), how


# -- comparison: each gives the lines of a failure, or None when the value matches ---------------------------

def compare_tensor(label: str, got, want, atol: float, rtol: float, how: str) -> list[str] | None:
    import torch

    if tuple(got.shape) != tuple(want.shape):
        return [f"{label}: shape {tuple(got.shape)}, the golden's is {tuple(want.shape)} ({_dtype(got)} vs "
                f"{_dtype(want)})"]
    g, w = got.double(), want.double()
    diff = (g - w).abs()
    # infinities match only themselves (same sign), NaN only NaN; the tolerance applies between finite values
    finite = torch.isfinite(g) & torch.isfinite(w)
    ok = (g == w) | (finite & (diff <= atol + rtol * torch.where(finite, w.abs(), 0.0))) | (
        torch.isnan(g) & torch.isnan(w))
    bad = ~ok
    if not bad.any():
        return None
    worst = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    worst = torch.where(bad, worst, torch.zeros_like(worst))
    lines = [f"{label}: {int(bad.sum())} of {bad.numel()} values out of tolerance"]
    positions = [int(worst.flatten().argmax())] + [int(i) for i in torch.nonzero(bad.flatten())[:3, 0]]
    for number, flat in enumerate(dict.fromkeys(positions)):
        where = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), g.shape)) if g.dim() else ()
        values = f"got {float(g.flatten()[flat]):.6g}, golden {float(w.flatten()[flat]):.6g}"
        lines.append(f"  max abs diff {float(diff.flatten()[flat]):.3g} at {where}: {values}" if number == 0 else
                     f"  also at {where}: abs diff {float(diff.flatten()[flat]):.3g}, {values}")
    lines.append(f"  tolerance: |got - golden| <= atol + rtol * |golden| with atol {atol:g}, rtol {rtol:g} ({how})")
    if _dtype(got) != _dtype(want):
        lines.append(f"  dtype: got {_dtype(got)}, the golden is {_dtype(want)}")
    return lines


def _dtype(tensor) -> str:
    return str(tensor.dtype).replace("torch.", "")


def compare_text(label: str, got: Observed, want: dict) -> list[str] | None:
    if len(got.rows) != len(want["rows"]):
        return [f"{label}: {len(got.rows)} string(s), the golden has {len(want['rows'])}"]
    for index, (g, w) in enumerate(zip(got.rows, want["rows"])):
        if g != w:
            at = next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w)))
            which = f" (string {index})" if len(got.rows) > 1 else ""
            return [f"{label}{which}: the text first differs at character {at}",
                    f"  got:    {_clip(g, at)}", f"  golden: {_clip(w, at)}", "  tolerance: exact"]
    return None


def _clip(text: str, at: int, width: int = 80) -> str:
    start = max(0, at - width // 2)
    clipped = repr(text[start:start + width])[1:-1]
    return ("..." if start else "") + clipped + ("..." if start + width < len(text) else "")


def compare_ids(label: str, got: Observed, want: dict, topk: int | None,
                decode: Callable[[list[int]], str] | None) -> list[str] | None:
    """Token ids compare exactly; with ``topk=k`` a sequence may first differ at a scored position only where
    the golden's top-k there holds the new token (a near tie that flipped), and is not compared after it
    (the two continue from different prefixes)."""
    rule = "exact ids" if topk is None else (f"topk={topk}: a token may differ from the golden only where the "
                                             f"golden's top-{topk} at that position holds it")
    rows, stored = want["rows"], want.get("topk")
    if topk is not None and stored is None:
        return [f"{label}: topk={topk} needs the golden's top tokens, and it was recorded without scores; record "
                f"it again with {NEEDS_SCORES}"]
    kept = max((len(position) for row in stored or [] for position in row), default=0)
    if topk is not None and kept and topk > kept:
        return [f"{label}: topk={topk} is more than the {kept} top tokens the golden keeps per position; "
                f"record it again with topk={topk}"]
    if len(got.rows) != len(rows):
        return [f"{label}: {len(got.rows)} sequence(s), the golden has {len(rows)}", f"  tolerance: {rule}"]
    for index, (g, w) in enumerate(zip(got.rows, rows)):
        at = next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), None)
        which = f"sequence {index}" if len(rows) > 1 else "the sequence"
        if at is None and len(g) == len(w):
            continue
        if at is None:
            return [f"{label}: {which} has {len(g)} tokens, the golden's has {len(w)} (the same up to "
                    f"{min(len(g), len(w))})", *_texts(g, w, decode), f"  tolerance: {rule}"]
        step = at - want.get("scored_from", 0)
        theirs = stored[index][step] if stored is not None and 0 <= step < len(stored[index]) else None
        if topk is not None and theirs is not None and g[at] in theirs[:topk]:
            continue  # a near tie flipped: allowed, and what follows is not comparable
        mine = got.topk[index][at - got.scored_from] if got.topk and 0 <= at - got.scored_from < len(
            got.topk[index]) else None
        where = f"position {at}" + ("" if stored is None else f" (generated token {step + 1})" if step >= 0
                                    else " (in the prompt)")
        lines = [f"{label}: {which} first differs at {where}", *_texts(g, w, decode),
                 f"  at position {at}: got token {_token(g[at], decode)}, golden token {_token(w[at], decode)}"]
        k = topk or STORED_TOPK
        lines.append(f"  golden top-{k} there: " + (", ".join(_token(t, decode) for t in theirs[:k])
                                                     if theirs is not None else "not recorded (no scores)"))
        lines.append(f"  got top-{k} there: " + (", ".join(_token(t, decode) for t in mine[:k])
                                                  if mine is not None else "not given (no scores)"))
        lines.append(f"  tolerance: {rule}")
        return lines
    return None


def _texts(got: list[int], want: list[int], decode) -> list[str]:
    if decode is None:
        return [f"  got ids:    {got}", f"  golden ids: {want}"]
    return [f"  got:    {decode(got)!r}", f"  golden: {decode(want)!r}", f"  got ids:    {got}",
            f"  golden ids: {want}"]


def _token(token: int, decode) -> str:
    return f"{token} {decode([token])!r}" if decode is not None else str(token)
