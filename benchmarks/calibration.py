"""Calibration (issue 26): every prediction the plugin makes, against what really happens.

Run as ``python benchmarks/run.py --only calibration [--check] [--quick]`` (or this file alone). The
measurements are real: the virtual fleet charges every storage a real model allocates to its card (peaks
included), on the CPU and in CI; on a machine with a GPU (``--device cuda``, what ``auto`` and run.py without
``--quick`` pick there) the rows run on the real card: load rows in fp16/bf16/int8/nf4 on ``cuda:0``, the
training rows as configured (dropout on), and the CUDA context against the fit check's default.

Rows (one table: prediction, measurement, ratio, target, ok):
- ``fit``: the fit check's bytes per device for a cell (``cell_need``) vs ``memory_allocated`` of each card
  right after the load (target: never under, at most 10% over);
- ``footprint``: ``expected_footprint`` vs ``get_memory_footprint()`` vs the bytes allocated (exact);
- ``plan``: ``plan_device_map`` vs the real load's ``hf_device_map`` under budgets that force a split and
  offload, for the 4 strategies (equal);
- ``train``: ``estimate_training_memory`` vs the peak over two AdamW steps, per term where the terms can be
  told apart (weights, gradients + optimizer state, the whole peak); target within 15%. The loss is the
  model's own cross-entropy (labels), or the output's mean square for a model without a head (BERT). On the
  fleet the forward's tensors are charged at the aten level too (the fleet's mode sees torch's Python calls
  only, so the storage under a view it returns, e.g. ``F.linear``'s output for a 3-d input with a bias, went
  uncounted); and dropout is off and T5's attention eager, since the CPU's kernels save other tensors than
  CUDA's (a 4-byte dropout mask where CUDA keeps 1 byte; SDPA falling back to the math path under attention
  dropout or a trained bias, keeping s x s scores); the estimate is given the same config;
- ``context`` (a real card only): the CUDA context (what the driver reports used after a second process's
  init minus after the first's) vs the fit check's default ``--llm-cuda-context`` (500 MiB).

Models: the built-ins, and two realistic shapes with random weights built once into the cache folder:
GPT-2 124M (fp32) and a Llama of ~1.1B parameters stored in bf16 (load-time rows only; ``--quick`` skips
both).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
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
    def __init__(self, out: str | None = None) -> None:
        self.rows: list[dict] = []
        self.out = out  # where the rows are written as JSON after each one (what a run cut short leaves)

    def add(self, what: str, predicted: float, measured: float, target: str, ok: bool, note: str = "") -> None:
        if isinstance(predicted, str) or isinstance(measured, str):
            ratio = 1.0 if ok else 0.0
        else:
            ratio = predicted / measured if measured else float("inf") if predicted else 1.0
        self.rows.append({"name": what, "predicted": predicted, "measured": measured, "ratio": round(ratio, 4),
                          "target": target, "ok": ok, "note": note})
        if self.out:
            Path(self.out).write_text(json.dumps(self.rows, indent=1))

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


def fit_and_footprint_rows(table: Table, name: str, path: Path, precision: str, device: str = "fleet") -> None:
    """The fit check's need per card, and the footprint, against a balanced load on a 2-card fleet (or a load
    on ``cuda:0`` of the real card)."""
    import gc

    import torch

    from pytest_llmload import expected_footprint, load_model, make_spec, virtual_gpus
    from pytest_llmload._internal.planning.fit_check import cell_need

    cards, device_map = (2, "balanced") if device == "fleet" else (1, "cuda:0")
    label = f"{name} {precision}" if device == "cuda" else name
    spec = make_spec(str(path), device_map, precision)
    with virtual_gpus("2x24GiB") if device == "fleet" else contextlib.nullcontext():
        gc.collect()
        torch.cuda.empty_cache()
        free = {i: torch.cuda.mem_get_info(i)[0] for i in range(cards)}
        need = cell_need(spec, {**free, "cpu": 64 * 2**30})
        before = [torch.cuda.memory_allocated(i) for i in range(cards)]
        model = load_model(str(path), device_map=device_map, precision=precision)
        allocated = [torch.cuda.memory_allocated(i) - before[i] for i in range(cards)]
        for index in range(cards):
            predicted, measured = need.get(index, 0), allocated[index]
            ok = (predicted == measured == 0) or within(predicted, measured, 1.0, 1.10)
            table.add(f"fit {label} cuda:{index}", predicted, measured, "1.00-1.10", ok)
        expected = expected_footprint(model, precision).total
        reported = model.get_memory_footprint()
        table.add(f"footprint {label} vs get_memory_footprint", expected, reported, "1.000",
                  expected == reported)
        rounding = sum(-storage % 512 for storage in _storage_sizes(model))
        explained = expected + rounding == sum(allocated)
        table.add(f"footprint {label} vs allocated", expected, sum(allocated), "exact or explained",
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


def training_config(path: Path, device: str = "fleet"):
    """The config the training rows run (and the estimate reads): on the fleet dropout off and T5's attention
    eager, where the CPU's kernels save other tensors than CUDA's (see the module docstring)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path))
    if device == "fleet":
        for key, value in config.to_dict().items():
            if ("dropout" in key or "pdrop" in key) and isinstance(value, float) and value > 0:
                setattr(config, key, 0.0)
        if getattr(config, "relative_attention_num_buckets", None):  # T5: SDPA's math path under a trained bias
            config._attn_implementation = "eager"
    return config


def measure_training(path: Path, config, precision: str, checkpointing: bool, lora: dict | None, *, seq_len: int,
                     batch: int = 1, device: str = "fleet", steps: int = 2) -> dict[str, int]:
    """Bytes on the card over ``steps`` AdamW steps: the weights, the state after them (gradients and moments),
    the peak; and of the last step's forward and backward, what the forward left (``stored``) and the peak
    (``activations``), both above the state. On the fleet the forward's tensors are charged at the aten level
    (``AutogradOnCards``, the fleet's own backward mode)."""
    import torch

    from pytest_llmload import load_model, virtual_gpus

    extra = {"attn_implementation": config._attn_implementation} if config._attn_implementation else {}
    with virtual_gpus("1x24GiB") if device == "fleet" else contextlib.nullcontext():
        if device == "fleet":
            from pytest_llmload._internal.virtual.tensor import AutogradOnCards as charged
        else:
            charged = contextlib.nullcontext
        torch.manual_seed(0)
        base = torch.cuda.memory_allocated(0)  # (a real card may hold what an earlier row left in its cache)
        model = load_model(str(path), device_map={"": 0}, precision=precision, config=config, **extra)
        if lora is not None:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=lora["r"]))
        if checkpointing:
            from pytest_llmload._internal.compat.transformers import enable_activation_checkpointing

            enable_activation_checkpointing(model)
        model.train()
        weights = torch.cuda.memory_allocated(0) - base
        # foreach=True: torch's default on CUDA; on virtual cards (a Tensor subclass) it would pick the for-loop,
        # whose temporaries are one parameter's, not the moments' size
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=True)
        ids = torch.randint(0, config.get_text_config().vocab_size, (batch, seq_len), device="cuda")
        head = model.get_output_embeddings() is not None
        kwargs = {"labels": ids} if head else {}
        peak = stored = activations = 0
        for _ in range(steps):
            start = torch.cuda.memory_allocated(0)
            torch.cuda.reset_peak_memory_stats(0)
            with charged():
                out = model(input_ids=ids, **kwargs)
                loss = out.loss if head else out.last_hidden_state.float().pow(2).mean()
            stored = torch.cuda.memory_allocated(0) - start
            loss.backward()
            activations = torch.cuda.max_memory_allocated(0) - start
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)
            del out, loss  # the last step's outputs are no state
            peak = max(peak, torch.cuda.max_memory_allocated(0) - base)
        state = torch.cuda.memory_allocated(0) - base - weights  # gradients (kept) + optimizer state
        del model, optimizer
        if device == "cuda":
            torch.cuda.empty_cache()
    return {"weights": weights, "state": state, "peak": peak, "stored": stored, "activations": activations}


def training_rows(table: Table, name: str, path: Path, *, seq_len: int, device: str = "fleet") -> None:
    """estimate_training_memory vs two AdamW steps on one card: weights, gradients + optimizer state, the
    whole peak, and the activations of the second step (what its forward and backward add above the state)."""
    from pytest_llmload import estimate_training_memory

    cases = [("full fp32", "fp32", False, None), ("bf16 weights", "bf16", False, None),
             ("checkpointing", "fp32", True, None), ("LoRA r=8", "fp32", False, {"r": 8})]
    config = training_config(path, device)
    for label, precision, checkpointing, lora in cases:
        estimate = estimate_training_memory(config, precision=precision, batch_size=1, seq_len=seq_len,
                                            gradient_checkpointing=checkpointing, lora=lora,
                                            device_map={"": 0}, cuda_context=0)
        m = measure_training(path, config, precision, checkpointing, lora, seq_len=seq_len, device=device)
        table.add(f"train {name} {label}: weights", estimate.weights, m["weights"], "0.85-1.15",
                  within(estimate.weights, m["weights"], 0.85, 1.15))
        table.add(f"train {name} {label}: gradients+optimizer", estimate.gradients + estimate.optimizer,
                  m["state"], "0.85-1.15", within(estimate.gradients + estimate.optimizer, m["state"], 0.85, 1.15))
        table.add(f"train {name} {label}: activations", estimate.activations, m["activations"], "0.85-1.15",
                  within(estimate.activations, m["activations"], 0.85, 1.15),
                  f"stored {estimate.activations_stored:,} / {m['stored']:,}")
        predicted = estimate.total - estimate.cuda_context
        table.add(f"train {name} {label}: peak", predicted, m["peak"], "0.85-1.15",
                  within(predicted, m["peak"], 0.85, 1.15))


def context_rows(table: Table) -> None:
    """The CUDA context on the real card: the driver's used memory while a second process holds a context (what
    that process's torch reserved taken off) minus while only a first one does, against the fit check's default;
    and what a first matmul adds (cuBLAS's workspace), for information."""
    from pytest_llmload._internal.planning.fit_check import DEFAULT_CUDA_CONTEXT

    code = ("import sys, torch\n"
            "def used():\n"
            "    free, total = torch.cuda.mem_get_info()\n"
            "    print(total - free, torch.cuda.memory_reserved(), flush=True)\n"
            "torch.zeros(1, device='cuda')\n"
            "used()\n"
            "a = torch.ones(256, 256, device='cuda'); (a @ a).sum().item()\n"
            "used()\n"
            "sys.stdin.read()\n")
    first = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        one = [[int(v) for v in first.stdout.readline().split()] for _ in range(2)]
        second = subprocess.run([sys.executable, "-c", code], input="", capture_output=True, text=True, timeout=120)
        two = [[int(v) for v in line.split()] for line in second.stdout.splitlines()]
    finally:
        first.communicate("", timeout=60)
    context = two[0][0] - two[0][1] - one[1][0]  # the first process: its context, its tensors, its matmul's
    cublas = (two[1][0] - two[1][1]) - (two[0][0] - two[0][1])
    table.add("context: CUDA context vs --llm-cuda-context default", DEFAULT_CUDA_CONTEXT, context,
              ">= 1.00 (covers it)", DEFAULT_CUDA_CONTEXT >= context, f"a first matmul adds {cublas:,} B (cuBLAS)")


def default_device() -> str:
    """``cuda`` where torch sees a real GPU and no virtual fleet runs, else ``fleet``."""
    import torch

    from pytest_llmload._internal.virtual import active_fleet

    return "cuda" if active_fleet() is None and torch.cuda.is_available() else "fleet"


def run(quick: bool = False, device: str = "fleet", out: str | None = None) -> Table:
    """The table: on the fleet (2 virtual cards) or on the real card (``device="cuda"``: the CUDA context, load
    rows of the two realistic shapes in fp16/bf16/int8/nf4 on ``cuda:0``, the training rows)."""
    device = default_device() if device == "auto" else device
    table = Table(out)
    if device == "cuda":
        context_rows(table)  # first: before this process holds a context of its own
    models = builtin_checkpoints()
    load_only = {}
    if not quick:
        realistic = realistic_checkpoints()
        models["gpt2-124m"] = realistic["gpt2-124m"]
        load_only["llama-1.1b"] = realistic["llama-1.1b"]
    if device == "cuda":
        for name, (path, _) in {**models, **load_only}.items():
            for precision in ("fp16", "bf16", "int8", "nf4") if name in ("gpt2-124m", "llama-1.1b") else ():
                fit_and_footprint_rows(table, name, path, precision, device)
    else:
        for name, (path, precision) in {**models, **load_only}.items():
            fit_and_footprint_rows(table, name, path, precision)
        for name, (path, precision) in models.items():
            plan_rows(table, name, path, precision)
    for name, (path, _) in models.items():
        if name != "tiny-mixtral":  # its router's top-k makes the activation term depend on the tokens
            training_rows(table, name, path, seq_len=32 if quick else 128, device=device)
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="built-ins only, short sequences")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--check", action="store_true", help="exit 1 if a row misses its target")
    parser.add_argument("--device", choices=("auto", "fleet", "cuda"), default="auto",
                        help="the virtual fleet, or the real card (auto: the real card where torch sees one)")
    parser.add_argument("--out", help="also write the rows as JSON to this path (after each row)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    table = run(quick=args.quick, device=args.device, out=args.out)
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
