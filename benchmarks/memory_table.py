"""Estimate vs measured training memory for the built-in models on the CPU (one AdamW step).

    python benchmarks/memory_table.py [--batch 2] [--seq 128]

Weights, gradients and optimizer state are counted from the tensors; activations are the bytes autograd
saves for backward; the peak RSS delta of the whole step is shown for scale (allocator and framework
overheads included, so it is not expected to equal the estimate's total).
"""

from __future__ import annotations

import argparse
import warnings

import torch

from pytest_llmload import load_model
from pytest_llmload import estimate_training_memory
from pytest_llmload import track_memory
from pytest_llmload._internal.planning.measure import saved_activation_bytes
from pytest_llmload import format_size


def row(name: str, checkpointing: bool, batch: int, seq: int) -> list[str]:
    model = load_model(f"builtin:{name}", device_map="cpu", precision="fp32")
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    estimate = estimate_training_memory(f"builtin:{name}", precision="fp32", batch_size=batch, seq_len=seq,
                                        gradient_checkpointing=checkpointing)
    ids = torch.randint(5, 300, (batch, seq), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids}
    if model.get_output_embeddings() is not None:
        inputs["labels"] = ids
    optimizer = torch.optim.AdamW(model.parameters())
    with track_memory() as usage:
        saved = saved_activation_bytes(model, inputs)
        if "labels" not in inputs:
            model(**inputs).last_hidden_state.pow(2).mean().backward()
        optimizer.step()
    grads = sum(p.grad.nelement() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    state = sum(t.nelement() * t.element_size() for s in optimizer.state.values() for k, t in s.items()
                if k in ("exp_avg", "exp_avg_sq"))
    return [name + (" +ckpt" if checkpointing else ""),
            f"{format_size(estimate.weights)} / {format_size(model.get_memory_footprint())}",
            f"{format_size(estimate.gradients)} / {format_size(grads)}",
            f"{format_size(estimate.optimizer)} / {format_size(state)}",
            f"{format_size(estimate.activations_stored)} / {format_size(saved)} ({estimate.activations_stored / saved - 1:+.0%})",
            format_size(estimate.total), format_size(usage.cpu_peak_delta)]


def main() -> None:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    header = ["model", "weights est/meas", "grads est/meas", "AdamW est/meas", "activations est/meas",
              "total est", "peak RSS delta"]
    rows = [header]
    for name in ("tiny-llama", "tiny-gpt2", "tiny-mixtral", "tiny-bert", "tiny-t5"):
        for checkpointing in (False, True):
            rows.append(row(name, checkpointing, args.batch, args.seq))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    print(f"batch {args.batch}, sequence {args.seq}, fp32, AdamW")
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


if __name__ == "__main__":
    main()
