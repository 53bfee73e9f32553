"""``llmload``: plan device maps and estimate memory from the command line (also ``python -m pytest_llmload``)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from .errors import LLMLoadError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmload", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    plan = commands.add_parser("plan", help="the device map from_pretrained would build on a fleet of GPUs")
    plan.add_argument("model", help="hub id, local directory or builtin:NAME (only the config is read)")
    plan.add_argument("--gpus", help="the fleet, e.g. 4x24GiB or 24GiB,48GiB (default: none, CPU only)")
    plan.add_argument("--strategy", default="auto", help="auto, balanced, balanced_low_0 or sequential")
    plan.add_argument("--precision", default="auto", help="auto, fp32, fp16, bf16, int8, nf4 or fp4")
    plan.add_argument("--max-memory", help="budgets as from_pretrained takes them, e.g. 0=20GiB,1=20GiB,cpu=64GiB")
    plan.add_argument("--cpu-memory", help="host RAM of the planned machine (default: this machine's available)")
    plan.add_argument("--trust-remote-code", action="store_true")
    plan.add_argument("--json", action="store_true", help="print JSON instead of a table")

    validate = commands.add_parser("validate", help="every problem of a custom device map")
    validate.add_argument("model")
    validate.add_argument("device_map", help="a JSON object or @file.json")
    validate.add_argument("--gpus", type=int, help="number of GPUs the map is meant for (default: those here)")
    validate.add_argument("--json", action="store_true")

    estimate = commands.add_parser("estimate", help="memory for training, per part (weights, grads, optimizer...)")
    estimate.add_argument("model")
    estimate.add_argument("--precision", default="auto")
    estimate.add_argument("--optimizer", default="adamw", help="adamw, adamw8bit, sgd, sgd-momentum or none")
    estimate.add_argument("--batch-size", type=int, default=1)
    estimate.add_argument("--seq-len", type=int, default=512)
    estimate.add_argument("--gradient-checkpointing", action="store_true")
    estimate.add_argument("--lora-r", type=int, help="train LoRA adapters of this rank instead of all weights")
    estimate.add_argument("--lora-targets", default="q_proj,v_proj", help="LoRA target modules (comma-separated)")
    estimate.add_argument("--device-map", help="a device map (JSON or @file) to split the total per device")
    estimate.add_argument("--json", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "plan":
            return _plan(args)
        if args.command == "validate":
            return _validate(args)
        return _estimate(args)
    except LLMLoadError as exc:
        print(f"llmload {args.command}: {exc}", file=sys.stderr)
        return 2


def _plan(args) -> int:
    from .planning import plan_device_map

    plan = plan_device_map(
        args.model, args.strategy, gpus=args.gpus, precision=args.precision,
        max_memory=args.max_memory, cpu_memory=args.cpu_memory, trust_remote_code=args.trust_remote_code,
    )
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.table())
    return 0


def _validate(args) -> int:
    from .specs import parse_device_map
    from .validation import validate_device_map

    spec = parse_device_map(args.device_map)
    problems = validate_device_map(args.model, spec.as_user_value(), gpus=args.gpus)
    if args.json:
        print(json.dumps({"problems": problems}, indent=2))
    else:
        print("\n".join(f"- {p}" for p in problems) if problems else "device map is sound")
    return 1 if problems else 0


def _estimate(args) -> int:
    from .memory import estimate_training_memory
    from .specs import parse_device_map

    lora = {"r": args.lora_r, "target_modules": args.lora_targets.split(",")} if args.lora_r else None
    device_map = parse_device_map(args.device_map).as_user_value() if args.device_map else None
    estimate = estimate_training_memory(
        args.model, precision=args.precision, optimizer=args.optimizer, batch_size=args.batch_size,
        seq_len=args.seq_len, gradient_checkpointing=args.gradient_checkpointing, lora=lora,
        device_map=device_map,
    )
    print(json.dumps(estimate.to_dict(), indent=2) if args.json else estimate.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
