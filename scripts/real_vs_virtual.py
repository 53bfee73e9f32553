"""One workload on the real card and on a virtual card of its size, in one process: what differs.

For each built-in: bytes allocated on the card by the load, the peak of one forward above that, the logits;
then CUDA's out-of-memory and device-mix messages. Prints one JSON object (and writes it to the path given
as the first argument, if any). Without a CUDA GPU only the virtual side runs.
"""

from __future__ import annotations

import gc
import json
import sys

import torch

from pytest_llmload import load_model, virtual_gpus

MODELS = ("tiny-llama", "tiny-gpt2", "tiny-mixtral")
IDS = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"


def workload() -> dict:
    out: dict = {"device": torch.cuda.get_device_name(0), "total": torch.cuda.get_device_properties(0).total_memory}
    for name in MODELS:
        gc.collect()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(0)
        model = load_model(f"builtin:{name}", device_map="cuda:0", precision="fp32")
        loaded = torch.cuda.memory_allocated(0) - before
        torch.cuda.reset_peak_memory_stats(0)
        base = torch.cuda.memory_allocated(0)
        with torch.no_grad():
            logits = model(IDS.to("cuda:0")).logits
        peak = torch.cuda.max_memory_allocated(0) - base
        out[name] = {"allocated_after_load": loaded, "forward_peak_above_load": peak,
                     "footprint": model.get_memory_footprint(), "logits": logits.float().cpu()}
        del model, logits
    try:
        torch.empty(2 * out["total"], dtype=torch.uint8, device="cuda:0")
    except Exception as exc:  # noqa: BLE001 - the message is the measurement
        out["oom"] = _first_line(exc)
    try:
        torch.ones(4, device="cuda:0") + torch.ones(4)
    except Exception as exc:  # noqa: BLE001
        out["device_mix"] = _first_line(exc)
    return out


def main() -> int:
    result: dict = {}
    real = None
    if torch.cuda.is_available():
        real = workload()
        total = real["total"]
        gc.collect()
        torch.cuda.empty_cache()
    else:
        total = 2**30
    capability = "%d.%d" % torch.cuda.get_device_capability(0) if real else "8.0"
    with virtual_gpus(f"1x{total}B@{capability}"):
        virtual = workload()
    for name in MODELS:
        row = {"virtual": {k: v for k, v in virtual[name].items() if k != "logits"}}
        if real:
            row["real"] = {k: v for k, v in real[name].items() if k != "logits"}
            row["logits_max_abs_diff"] = float((real[name]["logits"] - virtual[name]["logits"]).abs().max())
        result[name] = row
    for key in ("oom", "device_mix"):
        result[key] = {"virtual": virtual.get(key), "real": real.get(key) if real else None}
    result["cards"] = {"virtual": virtual["device"], "real": real["device"] if real else None, "total": total}
    text = json.dumps(result, indent=1)
    print(text)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
