"""Calibration (issue 26): every prediction the plugin makes, against what really happens.

Run as ``python benchmarks/run.py --only calibration [--check] [--quick]`` (or this file alone). The
measurements are real: the virtual fleet charges every storage a real model allocates to its card (peaks
included), on the CPU and in CI; on a machine with a GPU, ``--device cuda`` measures the real card.

Rows (one table: prediction, measurement, ratio, target, ok):
- ``fit``: the fit check's bytes per device for a cell (``cell_need``) vs ``memory_allocated`` of each card
  right after the load (target: never under, at most 10% over);
- ``footprint``: ``expected_footprint`` vs ``get_memory_footprint()`` vs the bytes allocated (exact);
- ``plan``: ``plan_device_map`` vs the real load's ``hf_device_map`` under budgets that force a split and
  offload, for the 4 strategies (equal);
- ``train``: ``estimate_training_memory`` vs the peak over two AdamW steps, per term where the terms can be
  told apart (weights, gradients + optimizer state, the whole peak); target within 15%.

Models: the built-ins, and two realistic shapes with random weights built once into the cache folder:
GPT-2 124M (fp32) and a Llama of ~1.1B parameters stored in bf16 (load-time rows only; ``--quick`` skips
both).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

MiB = 2**20


def cache_folder() -> Path:
    from pytest_llmload._internal.loading.builtins import cache_root

    folder = Path(cache_root()) / "calibration"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def realistic_checkpoints() -> dict[str, tuple[Path, str]]:
    """GPT-2 124M (fp32) and a ~1.1B Llama (bf16, TinyLlama's shape), random weights, built once."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    made = {}
    for name, build, dtype in (
        ("gpt2-124m", lambda: GPT2LMHeadModel(GPT2Config()), torch.float32),
        ("llama-1.1b", lambda: LlamaForCausalLM(LlamaConfig(
            hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
            num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)), torch.bfloat16),
    ):
        folder = cache_folder() / name
        if not (folder / "config.json").exists():
            torch.manual_seed(0)
            with torch.device("meta"):
                model = build()
            model = model.to_empty(device="cpu").to(dtype)
            for parameter in model.parameters():
                torch.nn.init.normal_(parameter, std=0.02)
            model.tie_weights()  # to_empty gave tied weights storages of their own: one again, as configured
            model.save_pretrained(folder)
            del model
        made[name] = (folder, "fp32" if dtype == torch.float32 else "bf16")
    return made


def builtin_checkpoints() -> dict[str, tuple[Path, str]]:
    from pytest_llmload import BUILTIN_MODELS, builtin_path

    return {name: (builtin_path(name), "fp32") for name in BUILTIN_MODELS}


class Table:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, what: str, predicted: float, measured: float, target: str, ok: bool, note: str = "") -> None:
        if isinstance(predicted, str) or isinstance(measured, str):
            ratio = 1.0 if ok else 0.0
        else:
            ratio = predicted / measured if measured else float("inf") if predicted else 1.0
        self.rows.append({"name": what, "predicted": predicted, "measured": measured, "ratio": round(ratio, 4),
                          "target": target, "ok": ok, "note": note})

    def print(self) -> None:
        from pytest_llmload._internal.tables import format_table

        print(format_table(["row", "prediction", "measurement", "ratio", "target", "ok", "note"], [
            (r["name"], _bytes(r["predicted"]), _bytes(r["measured"]), f"{r['ratio']:.3f}", r["target"],
             "ok" if r["ok"] else "MISSED", r["note"]) for r in self.rows]))


def _bytes(value) -> str:
    if isinstance(value, str):
        return value
    return f"{int(value):,}"


def within(predicted: float, measured: float, low: float, high: float) -> bool:
    return measured > 0 and low <= predicted / measured <= high


# -- the rows ------------------------------------------------------------------------------------------------


def fit_and_footprint_rows(table: Table, name: str, path: Path, precision: str) -> None:
    """The fit check's need per card, and the footprint, against a balanced load on a 2-card fleet."""
    import torch

    from pytest_llmload import expected_footprint, load_model, make_spec, virtual_gpus
    from pytest_llmload._internal.planning.fit_check import cell_need

    spec = make_spec(str(path), "balanced", precision)
    with virtual_gpus("2x24GiB"):
        free = {i: torch.cuda.mem_get_info(i)[0] for i in range(2)}
        need = cell_need(spec, {**free, "cpu": 64 * 2**30})
        before = [torch.cuda.memory_allocated(i) for i in range(2)]
        model = load_model(str(path), device_map="balanced", precision=precision)
        allocated = [torch.cuda.memory_allocated(i) - before[i] for i in range(2)]
        for index in range(2):
            predicted, measured = need.get(index, 0), allocated[index]
            ok = (predicted == measured == 0) or within(predicted, measured, 1.0, 1.10)
            table.add(f"fit {name} cuda:{index}", predicted, measured, "1.00-1.10", ok)
        expected = expected_footprint(model, precision).total
        reported = model.get_memory_footprint()
        table.add(f"footprint {name} vs get_memory_footprint", expected, reported, "1.000",
                  expected == reported)
        rounding = sum(-storage % 512 for storage in _storage_sizes(model))
        explained = expected + rounding == sum(allocated)
        table.add(f"footprint {name} vs allocated", expected, sum(allocated), "exact or explained",
                  explained, f"+{rounding:,} B: {len(_storage_sizes(model))} storages rounded up to 512 B"
                  if rounding else "")
        del model


def plan_rows(table: Table, name: str, path: Path, precision: str) -> None:
    """plan_device_map vs the real load's hf_device_map, under budgets that force a split and offload."""
    import torch

    from pytest_llmload import expected_footprint, load_model, plan_device_map, virtual_gpus

    with virtual_gpus("2x24GiB"):
        total = expected_footprint(str(path), precision).total
    budget = max(total * 2 // 5, 64 * 2**10)  # each card holds ~40%: the rest goes to the CPU
    max_memory = {0: budget, 1: budget, "cpu": 64 * 2**30}
    for strategy in ("auto", "balanced", "balanced_low_0", "sequential"):
        plan = plan_device_map(str(path), strategy, precision=precision, max_memory=max_memory,
                               gpus=["24GiB", "24GiB"], cpu_memory="64GiB")
        with virtual_gpus("2x24GiB"):
            model = load_model(str(path), device_map=strategy, precision=precision, max_memory=max_memory)
            real = dict(getattr(model, "hf_device_map", None) or {})
            del model
            torch.cuda.empty_cache()
        planned = {k: v for k, v in plan.device_map.items()}
        same = _canonical(planned) == _canonical(real)
        table.add(f"plan {name} {strategy}", f"{len(planned)} entries", f"{len(real)} entries", "equal", same,
                  "" if same else f"plan {_first_difference(planned, real)}")


def _storage_sizes(model) -> list[int]:
    """Bytes of each distinct storage of the model's parameters and buffers (tied weights once)."""
    sizes, seen = [], set()
    for tensor in [*model.parameters(), *model.buffers()]:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            sizes.append(storage.nbytes())
    return sizes


def _canonical(device_map: dict) -> dict:
    return {k: (v if not isinstance(v, str) or not v.isdigit() else int(v)) for k, v in device_map.items()}


def _first_difference(planned: dict, real: dict) -> str:
    for key in sorted(set(planned) | set(real)):
        if planned.get(key) != real.get(key):
            return f"{key}: planned {planned.get(key)!r}, loaded {real.get(key)!r}"
    return ""


def training_rows(table: Table, name: str, path: Path, *, seq_len: int) -> None:
    """estimate_training_memory vs two AdamW steps on one virtual card: weights, gradients + optimizer
    state, and the whole peak."""
    import torch

    from pytest_llmload import estimate_training_memory, load_model, virtual_gpus

    cases = [("full fp32", "fp32", False, None), ("bf16 weights", "bf16", False, None),
             ("checkpointing", "fp32", True, None), ("LoRA r=8", "fp32", False, {"r": 8})]
    for label, precision, checkpointing, lora in cases:
        estimate = estimate_training_memory(str(path), precision=precision, batch_size=1, seq_len=seq_len,
                                            gradient_checkpointing=checkpointing, lora=lora,
                                            device_map={"": 0}, cuda_context=0)
        with virtual_gpus("1x24GiB"):
            torch.manual_seed(0)
            model = load_model(str(path), device_map={"": 0}, precision=precision)
            if lora is not None:
                from peft import LoraConfig, get_peft_model

                model = get_peft_model(model, LoraConfig(r=lora["r"]))
            if checkpointing:
                from pytest_llmload._internal.compat.transformers import enable_activation_checkpointing

                enable_activation_checkpointing(model)
            model.train()
            weights = torch.cuda.memory_allocated(0)
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=1e-4)
            vocab = model.config.get_text_config().vocab_size
            ids = torch.randint(0, vocab, (1, seq_len), device="cuda")
            torch.cuda.reset_peak_memory_stats(0)
            kwargs = {"decoder_input_ids": ids} if model.config.is_encoder_decoder else {}
            for _ in range(2):
                out = model(input_ids=ids, **kwargs)
                logits = out.logits if hasattr(out, "logits") else out.last_hidden_state
                logits.float().pow(2).mean().backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=False)
            del out, logits  # the last step's outputs are no state
            state = torch.cuda.memory_allocated(0) - weights  # gradients (kept) + optimizer state
            peak = torch.cuda.max_memory_allocated(0)
            del model, optimizer
        table.add(f"train {name} {label}: weights", estimate.weights, weights, "0.85-1.15",
                  within(estimate.weights, weights, 0.85, 1.15))
        table.add(f"train {name} {label}: gradients+optimizer", estimate.gradients + estimate.optimizer, state,
                  "0.85-1.15", within(estimate.gradients + estimate.optimizer, state, 0.85, 1.15))
        predicted = estimate.total - estimate.cuda_context
        table.add(f"train {name} {label}: peak", predicted, peak, "0.85-1.15", within(predicted, peak, 0.85, 1.15))


def run(quick: bool = False) -> Table:
    table = Table()
    models = builtin_checkpoints()
    load_only = {}
    if not quick:
        realistic = realistic_checkpoints()
        models["gpt2-124m"] = realistic["gpt2-124m"]
        load_only["llama-1.1b"] = realistic["llama-1.1b"]
    for name, (path, precision) in {**models, **load_only}.items():
        fit_and_footprint_rows(table, name, path, precision)
    for name, (path, precision) in models.items():
        plan_rows(table, name, path, precision)
    for name, (path, _) in models.items():
        if name != "tiny-mixtral":  # its router's top-k makes the activation term depend on the tokens
            training_rows(table, name, path, seq_len=32 if quick else 128)
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="built-ins only, short sequences")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--check", action="store_true", help="exit 1 if a row misses its target")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    table = run(quick=args.quick)
    if args.json:
        print(json.dumps(table.rows, indent=2))
    else:
        table.print()
    missed = [r["name"] for r in table.rows if not r["ok"]]
    if missed and not args.json:
        print(f"{len(missed)} of {len(table.rows)} rows missed their target", file=sys.stderr)
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
