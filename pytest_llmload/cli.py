"""llmload: plan device maps and estimate training memory from a model's config.

Only the config is read (a hub id, a checkpoint folder, its config.json, or builtin:NAME):
no weights are loaded. Also runs as python -m pytest_llmload.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any, Sequence

from pytest_llmload.errors import LLMLoadError

_EPILOG = """examples:
  llmload plan meta-llama/Llama-2-7b-hf --gpus 4x24GiB --strategy balanced_low_0 --precision int8
  llmload validate ./my-model @map.json --gpus 2
  llmload estimate ./my-model/config.json --precision int8 --lora-r 8 --batch-size 4 --seq-len 2048

Errors are one line on stderr, "llmload COMMAND: ...", with exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, with argument errors as one line (``llmload estimate: argument --lora-r: ...``) and exit 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: {message}\n")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show (flags, options without a default)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or not action.option_strings or action.default in (None, False, argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


class _TopFormatter(_Formatter, argparse.RawDescriptionHelpFormatter):
    """The top-level help keeps the line breaks of its description and examples."""


# -- argument types: each turns a bad value into one argparse line, without importing torch --------


def _checked(parse):
    def convert(text: str):
        try:
            return parse(text)
        except LLMLoadError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__.lstrip("_")
    return convert


def _positive_int(text: str) -> int:
    """A whole number >= 1 in ASCII digits (``int()`` takes '٨' as 8)."""
    from pytest_llmload._internal.config.numbers import is_whole_number

    value = text.strip()
    if not is_whole_number(value) or len(value) > 12 or int(value) < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a whole number >= 1")
    return int(value)


def _model(text: str) -> str:
    """A model reference, checked; a path to a ``config.json`` stands for its folder (only the config is read)."""
    from pytest_llmload._internal.config.specs import parse_model

    path = os.path.expanduser(text)
    if os.path.basename(path) == "config.json" and os.path.lexists(path) and not os.path.isdir(path):
        from pytest_llmload._internal.loading.safety import require_regular

        require_regular(path, "checkpoint file")  # a FIFO, a device, a symlink loop: said, never opened
    if os.path.isfile(path):
        if os.path.basename(path) != "config.json":
            raise LLMLoadError(f"model path {text!r} is a file: expected a checkpoint directory, its config.json, "
                               "a hub id or builtin:NAME")
        text = os.path.dirname(os.path.abspath(path))
    parse_model(text)
    return text


def _precision(text: str) -> str:
    from pytest_llmload._internal.config.specs import parse_precision

    return parse_precision(text)


def _fleet(text: str) -> list[int]:
    from pytest_llmload._internal.planning.planner import parse_fleet

    return parse_fleet(text)


def _gpu_count(text: str) -> int:
    """``validate --gpus``: a count (``4``) or a fleet (``4x24GiB``: its size is what counts)."""
    from pytest_llmload._internal.config.numbers import MAX_CARDS, is_whole_number, parse_count

    if is_whole_number(text.strip()):
        return parse_count(text, "--gpus", minimum=0, maximum=MAX_CARDS)
    return len(_fleet(text))


def _max_memory(text: str) -> dict:
    from pytest_llmload._internal.config.specs import parse_max_memory

    budget = parse_max_memory(text)
    if not budget:
        raise LLMLoadError(f"invalid max memory {text!r}: expected e.g. '0=20GiB,1=20GiB,cpu=64GiB'")
    return budget


def _size(text: str) -> int:
    from pytest_llmload._internal.config.numbers import parse_size

    return parse_size(text)


def _device_map(text: str):
    from pytest_llmload._internal.config.specs import parse_device_map

    return parse_device_map(text)


def _targets(text: str) -> Any:
    if text.strip() == "all-linear":
        return "all-linear"
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise LLMLoadError(f"invalid LoRA targets {text!r}: expected module names such as q_proj,v_proj or all-linear")
    return names


def _parser() -> argparse.ArgumentParser:
    from pytest_llmload._internal.config.specs import DEVICE_MAP_STRATEGIES

    parser = _Parser(prog="llmload", description=__doc__, epilog=_EPILOG, formatter_class=_TopFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=_Parser)
    model_help = "hub id, checkpoint directory, its config.json, or builtin:NAME (only the config is read)"
    trust_help = "allow a checkpoint whose config asks for its own code (auto_map); only for code you trust"
    precisions = "auto, fp32, fp16, bf16, int8, nf4 or fp4"

    plan = commands.add_parser(
        "plan", help="the device map from_pretrained would build on a fleet of GPUs", formatter_class=_Formatter,
        description="The device map from_pretrained(..., device_map=STRATEGY) would build, computed with "
                    "transformers' own planning code on the model built on the meta device.")
    plan.add_argument("model", help=model_help)
    plan.add_argument("--gpus", type=_checked(_fleet), metavar="FLEET",
                      help="the GPUs to plan for and the free memory of each, e.g. 4x24GiB or 24GiB,48GiB "
                           "(default: the GPUs of this machine, or none when only --cpu-memory is given); "
                           "with --max-memory it says which GPUs exist and their sizes")
    plan.add_argument("--strategy", default="auto", choices=DEVICE_MAP_STRATEGIES, help="the device_map strategy")
    plan.add_argument("--precision", default="auto", type=_checked(_precision), help=precisions)
    plan.add_argument("--max-memory", type=_checked(_max_memory), metavar="BUDGETS",
                      help="budgets as from_pretrained takes them, e.g. 0=20GiB,1=20GiB,cpu=64GiB "
                           "(default: none, the free memory of the GPUs)")
    plan.add_argument("--cpu-memory", type=_checked(_size), metavar="SIZE",
                      help="host RAM of the planned machine (default: this machine's available RAM)")
    plan.add_argument("--trust-remote-code", action="store_true", help=trust_help)
    plan.add_argument("--json", action="store_true", help="print JSON instead of a table")

    validate = commands.add_parser(
        "validate", help="every problem of a custom device map", formatter_class=_Formatter,
        description="Every problem of a custom device map for a model: gaps, unknown modules, split blocks, "
                    "tied weights apart, devices that do not exist. Exit status 1 when there are problems.")
    validate.add_argument("model", help=model_help)
    validate.add_argument("device_map", metavar="DEVICE_MAP", type=_checked(_device_map),
                          help="a JSON object of module name -> device, or @file.json")
    validate.add_argument("--gpus", type=_checked(_gpu_count), metavar="N",
                          help="how many GPUs the map is meant for, a count or a fleet such as 4x24GiB "
                               "(default: the GPUs of this machine)")
    validate.add_argument("--trust-remote-code", action="store_true", help=trust_help)
    validate.add_argument("--json", action="store_true", help="print JSON instead of a list")

    estimate = commands.add_parser(
        "estimate", help="memory for training, per part (weights, gradients, optimizer state, activations)",
        formatter_class=_Formatter,
        description="Memory one training step needs, from the config: weights, gradients, optimizer state, "
                    "activations and CUDA context, with totals per device. It prints what it assumed.")
    estimate.add_argument("model", help=model_help)
    estimate.add_argument("--precision", default="auto", type=_checked(_precision),
                          help=precisions + " (int8/4-bit need --lora-r)")
    estimate.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw8bit", "sgd", "sgd-momentum",
                                                                   "none"],
                          help="adamw keeps two fp32 moments per trained parameter")
    estimate.add_argument("--batch-size", type=_positive_int, default=1, help="sequences per step")
    estimate.add_argument("--seq-len", type=_positive_int, default=512, help="tokens per sequence")
    estimate.add_argument("--gradient-checkpointing", action="store_true",
                          help="store only each layer's input and recompute the rest in backward")
    estimate.add_argument("--lora-r", type=_positive_int, metavar="R",
                          help="train LoRA adapters of this rank instead of all weights (default: full fine-tuning)")
    estimate.add_argument("--lora-targets", type=_checked(_targets), metavar="NAMES",
                          help="modules LoRA wraps, comma-separated, or all-linear "
                               "(default: peft's default for the model type, e.g. q_proj,v_proj for Llama, "
                               "query,value for BERT)")
    estimate.add_argument("--device-map", type=_checked(_device_map), metavar="MAP",
                          help="where the model lives: a device (0, cpu), a JSON map or @file.json, or a strategy "
                               "(auto, balanced...) planned on --gpus (default: the whole model on one GPU, cuda:0)")
    estimate.add_argument("--gpus", type=_checked(_fleet), metavar="FLEET",
                          help="the GPUs to plan a strategy --device-map on, e.g. 2x24GiB")
    estimate.add_argument("--cuda-context", type=_checked(_size), default="500MiB", metavar="SIZE",
                          help="memory each GPU's CUDA context takes before any tensor")
    estimate.add_argument("--trust-remote-code", action="store_true", help=trust_help)
    estimate.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.commands = {"plan": plan, "validate": validate, "estimate": estimate}  # type: ignore[attr-defined]
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; the exit status: 0, 1 (``validate`` found problems) or 2 (a usage error)."""
    parser = _parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # said by the command's parser, so the line names the command
            parser.commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:  # --help (0) or an argument error (2), already printed
        return exc.code if isinstance(exc.code, int) else 2
    try:
        args.model = _model(args.model)
        if args.command == "plan":
            return _plan(args)
        if args.command == "validate":
            return _validate(args)
        return _estimate(args)
    except LLMLoadError as exc:
        _fail(args.command, _cli_wording(exc))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (| head): nothing more to say to it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:  # noqa: BLE001 - a bug of ours or upstream: still one line, unless asked for more
        if os.environ.get("LLMLOAD_TRACEBACK"):
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        _fail(args.command, f"internal error: {type(exc).__name__}: {first} (please report it; "
                            "LLMLOAD_TRACEBACK=1 shows where)")
    return 2


def _fail(command: str, message: str) -> None:
    print(f"llmload {command}: {message}", file=sys.stderr)


def _cli_wording(exc: Exception) -> str:
    """The library's messages name pytest options and keywords; here the CLI's own flags."""
    from pytest_llmload._internal.planning.training_memory import LoraTargetsError

    if isinstance(exc, LoraTargetsError):
        return _lora_targets_message(exc)
    text = (str(exc).strip().splitlines() or [""])[0]
    text = re.sub(r"--llm-trust-remote-code( \(trust_remote_code=True\))?", "--trust-remote-code", text)
    return text.replace("point --llm-model at a local directory", "give a local checkpoint directory as MODEL")


def _lora_targets_message(exc) -> str:
    from pytest_llmload._internal.planning.training_memory import default_lora_targets

    layers = ", ".join(exc.layer_names)
    default = default_lora_targets(type("Config", (), {"model_type": exc.model_type})())
    example = default if isinstance(default, list) else [n for n in exc.layer_names if n != "..."][:2]
    if exc.targets is None:
        return (f"no default LoRA targets for model type {exc.model_type!r} (peft has none): give --lora-targets "
                f"with some of its layers ({layers})")
    targets = exc.targets if isinstance(exc.targets, str) else ",".join(exc.targets)
    return (f"--lora-targets {targets} match no layer of this {exc.model_type or 'model'} model (its layers: "
            f"{layers}): give --lora-targets with some of them, e.g. --lora-targets {','.join(example)}")


def _plan(args) -> int:
    from pytest_llmload._internal.planning.planner import balanced_low_0_problem, plan_device_map

    if args.strategy == "balanced_low_0" and args.max_memory:
        problem = balanced_low_0_problem(args.max_memory)
        if problem:
            raise LLMLoadError(problem)
    plan = plan_device_map(
        args.model, args.strategy, gpus=args.gpus, precision=args.precision,
        max_memory=args.max_memory, cpu_memory=args.cpu_memory, trust_remote_code=args.trust_remote_code,
    )
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.table())
    return 0


def _validate(args) -> int:
    from pytest_llmload._internal.planning.planner import meta_model
    from pytest_llmload._internal.planning.validation import validate_device_map

    spec = args.device_map
    if spec.kind == "tp":
        raise LLMLoadError("'tp' is decided at load time by the model's tensor-parallel plan, not a map to "
                           "validate (validate checks custom maps)")
    if spec.kind in ("strategy", "process"):
        raise LLMLoadError(f"{spec.value!r} is decided at load time, not a map to validate: see it with "
                           f"llmload plan MODEL --strategy {spec.value} --gpus ... (validate checks custom maps)"
                           if spec.kind == "strategy" else
                           "'process' is decided at load time, not a map to validate (validate checks custom maps)")
    network, _ = meta_model(args.model, "fp32", trust_remote_code=args.trust_remote_code)
    network.tie_weights()  # as validate_device_map does for an id
    problems = validate_device_map(network, spec.as_user_value(), gpus=args.gpus)
    if args.json:
        print(json.dumps({"problems": problems}, indent=2))
    else:
        print("\n".join(f"- {p}" for p in problems) if problems else "device map is sound")
    return 1 if problems else 0


def _estimate(args) -> int:
    from pytest_llmload._internal.config.specs import QUANTIZED_PRECISIONS

    if args.precision in QUANTIZED_PRECISIONS and args.lora_r is None:
        raise LLMLoadError(f"{args.precision} weights cannot be trained directly: add --lora-r 8 to train LoRA "
                           "adapters of rank 8 on them, or choose --precision fp32, fp16 or bf16")
    if args.lora_targets is not None and args.lora_r is None:
        raise LLMLoadError("--lora-targets needs --lora-r (the adapters' rank, e.g. --lora-r 8)")
    spec = args.device_map
    notes: list[str] = []
    if spec is not None and spec.kind == "process":
        raise LLMLoadError("--device-map process puts one copy on each process's own GPU: estimate one process "
                           "with --device-map 0")
    if spec is not None and spec.kind == "tp":
        raise LLMLoadError("--device-map tp shards the weights over the launched processes, which estimate does "
                           "not model: estimate one whole copy with --device-map 0 (an upper bound per rank)")
    if spec is not None and spec.kind == "strategy":
        if not args.gpus:
            raise LLMLoadError(f"--device-map {spec.value} is planned by from_pretrained from the GPUs it finds: "
                               "give them with --gpus (e.g. --gpus 2x24GiB), or give a device or a custom map")
        from pytest_llmload._internal.planning.planner import plan_device_map

        plan = plan_device_map(args.model, spec.value, gpus=args.gpus, precision=args.precision,
                               trust_remote_code=args.trust_remote_code)
        device_map: Any = plan.device_map
        notes.append(f"device map planned by {spec.value} on {len(args.gpus)} GPU(s) for the weights alone: "
                     "gradients, optimizer state and activations come on top, so the devices need more than "
                     "the plan gives them")
        notes += [f"plan: {note}" for note in plan.notes]
    elif args.gpus:
        raise LLMLoadError("--gpus plans a strategy --device-map (auto, balanced, balanced_low_0, sequential); "
                           "with a device or a custom map, leave it out")
    elif spec is None:
        device_map = {"": 0}
        notes.append("no --device-map: assumed the whole model on one GPU (cuda:0); give --device-map to split it "
                     "over devices, --device-map cpu for no GPU")
    else:
        device_map = spec.as_user_value()

    from pytest_llmload._internal.planning.training_memory import estimate_training_memory

    lora = None
    if args.lora_r is not None:
        lora = {"r": args.lora_r, "target_modules": args.lora_targets}
    estimate = estimate_training_memory(
        args.model, precision=args.precision, optimizer=args.optimizer, batch_size=args.batch_size,
        seq_len=args.seq_len, gradient_checkpointing=args.gradient_checkpointing, lora=lora,
        device_map=device_map, cuda_context=args.cuda_context, trust_remote_code=args.trust_remote_code,
    )
    estimate.notes[:0] = notes
    print(json.dumps(estimate.to_dict(), indent=2) if args.json else estimate.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
