"""Benchmark pytest-llmload against the bare alternative, side by side, as ratios of medians.

    python benchmarks/run.py            # full sizes (a GPT-2-small-sized checkpoint, ~124M parameters)
    python benchmarks/run.py --quick    # tiny sizes: a smoke run that keeps the script from rotting
    python benchmarks/run.py --json     # machine-readable
    python benchmarks/run.py --check    # exit 1 when a target is missed

Each figure is measured --repeat times (loads 5x, start-up 4x as often: they are short and noisy),
interleaved with its baseline where there is one; the table
shows min/median/max and the ratio of medians against the baseline. The machine is shared and noisy:
read ratios, not absolute seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def run(cmd, env=None, cwd=None) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=cwd)
    elapsed = time.perf_counter() - start
    if proc.returncode not in (0,):
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return elapsed


def child_peak_rss(cmd, env=None, cwd=None) -> tuple[int, str]:
    """Peak RSS of one child process (bytes), via wait4's rusage."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, cwd=cwd)
    _, status, usage = os.wait4(proc.pid, 0)
    out = proc.stdout.read()
    err = proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n{out[-3000:]}\n{err[-3000:]}")
    return usage.ru_maxrss * 1024, out


def stats(values):
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "runs": len(values)}


class Bench:
    def __init__(self, args):
        self.args = args
        self.rows = []
        self.work = Path(tempfile.mkdtemp(prefix="llmload-bench-"))

    def add(self, name, unit, values, baseline=None, target=None, target_text="", note=""):
        row = {"name": name, "unit": unit, **stats(values)}
        if baseline is not None:
            row["baseline"] = stats(baseline)
            row["ratio"] = row["median"] / row["baseline"]["median"]
        if target is not None:
            value = row.get("ratio", row["median"])
            row["target"] = target_text
            row["met"] = bool(target(value))
        row["note"] = note
        self.rows.append(row)
        if not self.args.json:
            print(self.format_row(row), flush=True)

    @staticmethod
    def format_row(row):
        def fmt(v):
            return f"{v:.3f}" if isinstance(v, float) else str(v)

        text = f"{row['name']:<46} {fmt(row['min']):>9} {fmt(row['median']):>9} {fmt(row['max']):>9} {row['unit']:<5}"
        if "ratio" in row:
            text += f" base {fmt(row['baseline']['median']):>8}  ratio {row['ratio']:.3f}"
        if "target" in row:
            text += f"  target {row['target']} {'ok' if row['met'] else 'MISSED'}"
        if row["note"]:
            text += f"  ({row['note']})"
        return text


# -- the checkpoint --------------------------------------------------------------------------------------


def write_checkpoint(bench) -> Path:
    """A GPT-2-small-sized checkpoint with random weights (tiny with --quick), and its tokenizer."""
    code = textwrap.dedent(f"""
        import torch, sys
        from transformers import GPT2Config, GPT2LMHeadModel
        from pytest_llmload import BUILTIN_MODELS
        from pytest_llmload._internal.loading.builtins import build_tokenizer
        quick = {bench.args.quick!r}
        config = GPT2Config(n_embd=64 if quick else 768, n_layer=2 if quick else 12, n_head=4 if quick else 12,
                            vocab_size=320 if quick else 50257, n_positions=256 if quick else 1024)
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config)
        model.save_pretrained(sys.argv[1])
        build_tokenizer(BUILTIN_MODELS["tiny-gpt2"]).save_pretrained(sys.argv[1])
        print(sum(p.numel() for p in model.parameters()))
    """)
    path = bench.work / "gpt2-small"
    out = subprocess.run([PY, "-c", code, str(path)], capture_output=True, text=True, check=True)
    bench.parameters = int(out.stdout.strip().splitlines()[-1])
    return path


# -- 1. start-up ---------------------------------------------------------------------------------------


def bench_startup(bench):
    suite = bench.work / "plain-suite"
    suite.mkdir()
    count = 30 if bench.args.quick else 300
    for i in range(count // 10):
        (suite / f"test_plain_{i}.py").write_text("".join(f"def test_{j}():\n    assert {j} == {j}\n\n" for j in range(10)))
    (suite / "pytest.ini").write_text("[pytest]\n")
    # Bytecode as a user's machine has it: this machine sets PYTHONDONTWRITEBYTECODE, which makes every start
    # compile the plugin's sources; the .pyc files go to a folder of the benchmark's own, not into the tree.
    env = {"PYTHONDONTWRITEBYTECODE": "", "PYTHONPYCACHEPREFIX": str(bench.work / "pycache")}  # "": unset
    run([PY, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"], env=env, cwd=suite)  # writes them
    with_plugin, without = [], []
    for _ in range(bench.args.repeat * 4):
        with_plugin.append(run([PY, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"], env=env,
                               cwd=suite))
        without.append(run([PY, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-p", "no:llmload"],
                           env=env, cwd=suite))
    bench.add(f"start-up: collect {count} plain tests", "s", with_plugin, without, lambda r: r <= 1.02, "<= 1.02")


# -- 2. load cost ----------------------------------------------------------------------------------------

LOAD_SCRIPT = """
import sys, time, json, warnings
warnings.filterwarnings("ignore")
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
from pytest_llmload import load_model
from pytest_llmload import ModelCache
from pytest_llmload import make_spec
path, precision, repeat = sys.argv[1], sys.argv[2], int(sys.argv[3])
kwargs = {"dtype": torch.float32} if precision == "fp32" else {
    "quantization_config": BitsAndBytesConfig(load_in_8bit=True), "device_map": "cpu"}
device_map = None if precision == "fp32" else "cpu"
results = {"bare": [], "load_model": [], "llm_model": [], "safetensors": []}
from safetensors.torch import load_file
for _ in range(repeat):
    t = time.perf_counter(); sd = load_file(path + "/model.safetensors"); [v.clone() for v in sd.values()]; results["safetensors"].append(time.perf_counter() - t); del sd
    t = time.perf_counter(); m = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, local_files_only=True, **kwargs); results["bare"].append(time.perf_counter() - t); del m
    t = time.perf_counter(); m = load_model(path, precision=precision, device_map=device_map); results["load_model"].append(time.perf_counter() - t); del m
    cache = ModelCache(1)
    t = time.perf_counter(); m = cache.get(make_spec(path, device_map or "auto", precision)); results["llm_model"].append(time.perf_counter() - t); del m; cache.close()
print(json.dumps(results))
"""


def bench_load(bench, checkpoint):
    for precision in ("fp32", "int8"):
        # loads of a warm checkpoint take tens of ms: alternate many times in one process to see past noise
        out = subprocess.run([PY, "-c", LOAD_SCRIPT, str(checkpoint), precision, str(5 * bench.args.repeat + 1)],
                             capture_output=True, text=True, check=True).stdout
        data = {k: v[1:] for k, v in json.loads(out.strip().splitlines()[-1]).items()}  # first round warms up
        size = f"{bench.parameters / 1e6:.0f}M"
        bench.add(f"load {size} {precision}: load_model vs from_pretrained", "s", data["load_model"], data["bare"],
                  lambda r: r <= 1.05, "<= 1.05")
        bench.add(f"load {size} {precision}: llm_model cell vs from_pretrained", "s", data["llm_model"], data["bare"],
                  lambda r: r <= 1.05, "<= 1.05", note="session cache + fit check + report")
        bench.add(f"load {size} {precision}: from_pretrained vs safetensors floor", "s", data["bare"],
                  data["safetensors"], note="floor: safetensors.torch.load_file + reading every tensor once")


# -- 3. reuse ------------------------------------------------------------------------------------------


def bench_reuse(bench, checkpoint):
    """60 tests over 3 cells: the plugin vs the same suite with a hand-written session fixture (what a user
    writes without the plugin), both under pytest; and vs a bare script (no pytest at all), for scale."""
    body = textwrap.dedent("""
        import pytest, torch

        @pytest.mark.parametrize("i", range(20))
        def test_forward(llm_model, i):
            with torch.no_grad():
                llm_model(torch.tensor([[1, 2, 3, 4]]))
    """)
    suite = bench.work / "reuse-suite"
    suite.mkdir()
    (suite / "pytest.ini").write_text("[pytest]\n")
    (suite / "test_reuse.py").write_text(body)
    manual = bench.work / "reuse-manual"
    manual.mkdir()
    (manual / "pytest.ini").write_text("[pytest]\n")
    (manual / "test_reuse.py").write_text(body)
    (manual / "conftest.py").write_text(textwrap.dedent(f"""
        import pytest, torch
        from transformers import AutoModelForCausalLM

        @pytest.fixture(scope="session", params=[torch.float32, torch.float16, torch.bfloat16])
        def llm_model(request):
            model = AutoModelForCausalLM.from_pretrained({str(checkpoint)!r}, dtype=request.param, device_map="auto",
                                                         use_safetensors=True, local_files_only=True)
            yield model
            del model
    """))
    bare = bench.work / "bare_reuse.py"
    bare.write_text(textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForCausalLM
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            model = AutoModelForCausalLM.from_pretrained({str(checkpoint)!r}, dtype=dtype, device_map="auto",
                                                         use_safetensors=True, local_files_only=True)
            for i in range(20):
                with torch.no_grad():
                    model(torch.tensor([[1, 2, 3, 4]]))
            del model
    """))
    suite_times, manual_times, bare_times, loads = [], [], [], set()
    for _ in range(bench.args.repeat):
        report = suite / "report.json"
        suite_times.append(run([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--llm-model={checkpoint}",
                                "--llm-precision=fp32", "--llm-precision=fp16", "--llm-precision=bf16",
                                f"--llm-report={report}"], cwd=suite))
        loads.add(sum(c["loads"] for c in json.loads(report.read_text())["cells"]))
        manual_times.append(run([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:llmload"], cwd=manual))
        bare_times.append(run([PY, str(bare)]))
    bench.add("reuse: 60 tests/3 cells vs hand-written fixture", "s", suite_times, manual_times, lambda r: r <= 1.25,
              "<= 1.25", note=f"loads per run: {sorted(loads)} (must be [3])")
    bench.add("reuse: 60 tests/3 cells vs bare script (no pytest)", "s", suite_times, bare_times,
              note="includes pytest's own start-up and per-test cost")
    bench.reuse_loads = sorted(loads)


# -- 4. release ----------------------------------------------------------------------------------------


def bench_release(bench, checkpoint):
    suite = bench.work / "release-suite"
    suite.mkdir()
    (suite / "pytest.ini").write_text("[pytest]\n")
    (suite / "test_cells.py").write_text("def test_cell(llm_model):\n    pass\n")
    cells = [(p, d) for p in ("fp32", "fp16", "bf16") for d in ("cpu", "auto")]
    six = [f"--llm-model={checkpoint}", "--llm-precision=fp32", "--llm-precision=fp16", "--llm-precision=bf16",
           "--llm-device-map=cpu", "--llm-device-map=auto", "--llm-cache-size=1"]
    singles, cycles = [], []
    for _ in range(max(bench.args.repeat // 2, 1)):
        # the baseline is the costliest single cell, each loaded alone in its own process
        alone = [child_peak_rss([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--llm-model={checkpoint}",
                                 f"--llm-precision={p}", f"--llm-device-map={d}"], cwd=suite)[0] / 2**20
                 for p, d in cells]
        singles.append(max(alone))
        cycles.append(child_peak_rss([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", *six], cwd=suite)[0] / 2**20)
    bench.add("release: peak RSS, 6 cells, cache of 1 vs costliest cell alone", "MiB", cycles, singles,
              lambda r: r <= 1.5, "<= 1.5")


# -- 5. planner ----------------------------------------------------------------------------------------

PLAN_SCRIPT = """
import sys, time, json, resource
from transformers import LlamaConfig
from pytest_llmload import plan_device_map
config = LlamaConfig(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                     num_attention_heads=64, num_key_value_heads=8)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
times = []
for _ in range(int(sys.argv[2])):
    t = time.perf_counter()
    plan = plan_device_map(config, "auto", gpus="8x80GiB", precision=sys.argv[1], cpu_memory="512GiB")
    times.append(time.perf_counter() - t)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"times": times, "rss_growth": (after - before) * 1024, "model_bytes": plan.model_bytes,
                  "devices": len(plan.bytes_per_device)}))
"""


def bench_planner(bench):
    for precision in ("bf16", "int8"):
        out = subprocess.run([PY, "-c", PLAN_SCRIPT, precision, str(bench.args.repeat)], capture_output=True,
                             text=True, check=True).stdout
        data = json.loads(out.strip().splitlines()[-1])
        bench.add(f"planner: 70B on 8x80GiB, {precision}", "s", data["times"], target=lambda v: v < 2.0,
                  target_text="< 2 s", note=f"model {data['model_bytes'] / 2**30:.1f} GiB on {data['devices']} devices, "
                                             f"peak RSS growth {data['rss_growth'] / 2**20:.0f} MiB")


# -- 6. strategies -------------------------------------------------------------------------------------

STRATEGY_SCRIPT = """
import sys, time, json
from hypothesis import given, settings, HealthCheck
from transformers import LlamaConfig
from pytest_llmload.strategies import device_maps, module_tree
config = LlamaConfig(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=32000)
module_tree(config)
rates = []
for _ in range(int(sys.argv[1])):
    count = [0]
    @settings(max_examples=int(sys.argv[2]), database=None, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(device_maps(config, devices=(0, 1, 2, 3, "cpu")))
    def draw(m):
        count[0] += 1
    t = time.perf_counter(); draw(); rates.append(count[0] / (time.perf_counter() - t))
print(json.dumps(rates))
"""


def bench_strategies(bench):
    examples = 100 if bench.args.quick else 500
    out = subprocess.run([PY, "-c", STRATEGY_SCRIPT, str(bench.args.repeat), str(examples)], capture_output=True,
                         text=True, check=True).stdout
    rates = json.loads(out.strip().splitlines()[-1])
    bench.add("strategies: maps/s for a 32-layer config", "1/s", rates, target=lambda v: v >= 200,
              target_text=">= 200/s", note=f"{examples} examples per run, through @given")


# -- 7. virtual GPUs -----------------------------------------------------------------------------------

VIRTUAL_SCRIPT = """
import sys, time, json, torch
import pytest_llmload
from pytest_llmload import virtual_gpus

source, fleet_spec, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(1)  # both sides on one thread: on a shared machine idle intra-op threads spin and blur ratios
config = pytest_llmload.load_config(source)
def two_card_map():
    if config.model_type == "gpt2":
        n = config.n_layer
        return {"transformer.wte": 0, "transformer.wpe": 0, "transformer.drop": 0,
                **{f"transformer.h.{i}": int(i >= n // 2) for i in range(n)}, "transformer.ln_f": 1, "lm_head": 0}
    n = config.num_hidden_layers
    return {"model.embed_tokens": 0, **{f"model.layers.{i}": int(i >= n // 2) for i in range(n)},
            "model.norm": 1, "model.rotary_emb": 1, "lm_head": 1}
ids = torch.randint(0, min(config.vocab_size, 300), (1, int(sys.argv[4])))
cpu = pytest_llmload.load_model(source, precision="fp32")
with virtual_gpus(fleet_spec):
    virtual = pytest_llmload.load_model(source, device_map=two_card_map(), precision="fp32")
    assert {p.device.index for p in virtual.parameters()} == {0, 1}
from accelerate import dispatch_model
hooked = pytest_llmload.load_model(source, precision="fp32")  # the CPU model with the split's accelerate hooks
dispatch_model(hooked, {module: "cpu" for module in two_card_map()}, force_hooks=True)
out = {"cpu_forward": [], "hooked_forward": [], "virtual_forward": [], "cpu_load": [], "virtual_load": [],
       "max_diff": 0.0}
per_sample = int(sys.argv[6])  # forwards per timed sample: a tiny model's forward is too short to time alone
for _ in range(rounds):
    with torch.no_grad():
        t = time.perf_counter()
        for _ in range(per_sample):
            ref = cpu(ids).logits
        out["cpu_forward"].append((time.perf_counter() - t) / per_sample)
        t = time.perf_counter()
        for _ in range(per_sample):
            hooked(ids)
        out["hooked_forward"].append((time.perf_counter() - t) / per_sample)
        with virtual_gpus(fleet_spec):
            x = ids.cuda()
            t = time.perf_counter()
            for _ in range(per_sample):
                got = virtual(x).logits
            out["virtual_forward"].append((time.perf_counter() - t) / per_sample)
            out["max_diff"] = max(out["max_diff"], (got.cpu() - ref).abs().max().item())
if sys.argv[5] == "load":
    for _ in range(rounds):
        t = time.perf_counter(); pytest_llmload.load_model(source, precision="fp32"); out["cpu_load"].append(time.perf_counter() - t)
        with virtual_gpus(fleet_spec):
            t = time.perf_counter(); pytest_llmload.load_model(source, device_map=two_card_map(), precision="fp32")
            out["virtual_load"].append(time.perf_counter() - t)
print(json.dumps(out))
"""

VIRTUAL_RSS_SCRIPT = """
import sys, torch, pytest_llmload
from pytest_llmload import virtual_gpus
source, fleet_spec = sys.argv[1], sys.argv[2]
ids = torch.randint(0, 300, (1, 32))
if fleet_spec == "cpu":
    model = pytest_llmload.load_model(source, precision="fp32")
    with torch.no_grad():
        model(ids)
else:
    with virtual_gpus(fleet_spec), torch.no_grad():
        model = pytest_llmload.load_model(source, device_map="balanced", precision="fp32")
        assert len({p.device.index for p in model.parameters()}) == 2
        model(ids.cuda())
"""


def bench_virtual(bench, checkpoint):
    """The virtual GPU fleet against the same work on the CPU: forward on a 2-card split, loads, peak RSS."""
    fleet = "2x64MiB" if bench.args.quick else "2x1GiB"
    rounds = 3 * bench.args.repeat + 1
    for label, source, tokens, load, target, per_sample in (
        (f"{bench.parameters / 1e6:.0f}M", str(checkpoint), 64, "load", 1.5, 1),
        ("tiny-llama", "builtin:tiny-llama", 16, "no-load", 3.0, 20),
    ):
        out = subprocess.run([PY, "-c", VIRTUAL_SCRIPT, source, fleet, str(rounds), str(tokens), load, str(per_sample)],
                             capture_output=True, text=True, check=True).stdout
        data = {k: v[1:] if isinstance(v, list) else v for k, v in json.loads(out.strip().splitlines()[-1]).items()}
        bench.add(f"virtual: {label} forward, 2-card split vs CPU", "s", data["virtual_forward"], data["cpu_forward"],
                  lambda r, t=target: r <= t, f"<= {target}", note=f"{tokens} tokens, {per_sample} forward(s) a sample, max logit diff {data['max_diff']}")
        bench.add(f"virtual: {label} forward, 2-card split vs CPU + same hooks", "s", data["virtual_forward"],
                  data["hooked_forward"], note="baseline: the CPU model with the split's accelerate hooks")
        if load == "load":
            bench.add(f"virtual: {label} load on 2 cards vs CPU load", "s", data["virtual_load"], data["cpu_load"],
                      lambda r: r <= 2.0, "<= 2")
    cpu_rss, virtual_rss = [], []
    for _ in range(max(bench.args.repeat // 2, 1)):
        cpu_rss.append(child_peak_rss([PY, "-c", VIRTUAL_RSS_SCRIPT, str(checkpoint), "cpu"])[0] / 2**20)
        virtual_rss.append(child_peak_rss([PY, "-c", VIRTUAL_RSS_SCRIPT, str(checkpoint), fleet])[0] / 2**20)
    bench.add(f"virtual: peak RSS, {bench.parameters / 1e6:.0f}M load+forward on 2 cards vs CPU", "MiB",
              virtual_rss, cpu_rss, lambda r: r <= 1.1, "<= 1.1", note="a virtual card holds no second copy")


# -- 8. tensor parallel and the lockstep check ---------------------------------------------------------

TP_SCRIPT = r"""
import json, os, sys, time
import torch
from pytest_llmload import load_model

path, device_map, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
ids = torch.randint(4, 300, (1, 128), generator=torch.Generator().manual_seed(0))
result = {"load": [], "forward": []}
for _ in range(rounds):
    start = time.perf_counter()
    model = load_model(path, device_map=device_map)
    result["load"].append(time.perf_counter() - start)
    with torch.no_grad():
        model(ids)  # warm
        start = time.perf_counter()
        for _ in range(3):
            model(ids)
        result["forward"].append((time.perf_counter() - start) / 3)
    del model
if device_map == "tp":
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _get_default_store
    from pytest_llmload._internal.distributed import Lockstep, launched_world
    guard = Lockstep(dist.PrefixStore("llmload-bench/", _get_default_store()), launched_world(), 60)
    costs = []
    for i in range(300):
        dist.barrier()  # both ranks start together: the cost of the check itself, not of waiting for a slow rank
        start = time.perf_counter()
        assert guard.checkin(f"tests/test_x.py::test_{i}") is None
        costs.append(time.perf_counter() - start)
    result["lockstep"] = costs
    dist.destroy_process_group()
    if int(os.environ["RANK"]) != 0:
        sys.exit(0)
print(json.dumps(result))
"""


def write_llama_checkpoint(bench) -> Path:
    """A Llama checkpoint the size of GPT-2 small (~124M parameters, tied embeddings): GPT-2 has no TP plan."""
    code = textwrap.dedent(f"""
        import torch, sys
        from transformers import LlamaConfig, LlamaForCausalLM
        quick = {bench.args.quick!r}
        config = LlamaConfig(hidden_size=64 if quick else 768, intermediate_size=128 if quick else 2048,
                             num_hidden_layers=2 if quick else 12, num_attention_heads=4 if quick else 12,
                             num_key_value_heads=4 if quick else 12, vocab_size=320 if quick else 50257,
                             max_position_embeddings=256 if quick else 1024, tie_word_embeddings=True)
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        model.save_pretrained(sys.argv[1])
        print(sum(p.numel() for p in model.parameters()))
    """)
    path = bench.work / "llama-gpt2-sized"
    out = subprocess.run([PY, "-c", code, str(path)], capture_output=True, text=True, check=True)
    return path, int(out.stdout.strip().splitlines()[-1])


def bench_tp(bench):
    """tp over 2 ranks (torchrun, gloo, one thread each) vs one process with both cores, and the lockstep
    check's cost per test (both ranks released together by a barrier, so waiting is not counted)."""
    checkpoint, parameters = write_llama_checkpoint(bench)
    rounds = str(bench.args.repeat + 1)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    single = subprocess.run([PY, "-c", TP_SCRIPT, str(checkpoint), "cpu", rounds], capture_output=True, text=True,
                            check=True, env={**env, "OMP_NUM_THREADS": "2"}, timeout=900).stdout
    script = bench.work / "tp_bench.py"
    script.write_text(TP_SCRIPT)
    launched = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               str(script), str(checkpoint), "tp", rounds],
                              capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"}, timeout=900)
    if launched.returncode != 0:
        raise RuntimeError(f"tp benchmark failed:\n{launched.stdout[-3000:]}\n{launched.stderr[-3000:]}")
    base = {k: v[1:] for k, v in json.loads(single.strip().splitlines()[-1]).items()}  # first round warms up
    tp = {k: (v[1:] if k != "lockstep" else v) for k, v in json.loads(launched.stdout.strip().splitlines()[-1]).items()}
    size = f"{parameters / 1e6:.0f}M"
    bench.add(f"tp {size}: load, 2 ranks vs 1 process", "s", tp["load"], base["load"],
              note="gloo on 2 cores; for the record, no target")
    bench.add(f"tp {size}: forward 1x128, 2 ranks vs 1 process", "s", tp["forward"], base["forward"],
              note="gloo on 2 cores; for the record, no target")
    bench.add("tp: lockstep check per test (rank 0)", "ms", [c * 1000 for c in tp["lockstep"]],
              target=lambda v: v < 5, target_text="< 5 ms", note="300 check-ins through the store")



# -- 9. scale: loads per cell under xdist, whole-process load overhead, the CLI's start-up --------------

XDIST_SUITE = """
import pytest

@pytest.mark.parametrize("n", range(10))
def test_cell(llm_model, n):
    pass
"""


def bench_xdist(bench):
    """4 cells x 10 tests: loads across the run with -n 2 and -n 4 (target: exactly 4), wall time vs -n 0."""
    suite = bench.work / "xdist-suite"
    suite.mkdir()
    (suite / "test_cells.py").write_text(XDIST_SUITE)
    (suite / "pytest.ini").write_text("[pytest]\n")
    cells = ["--llm-model=builtin:tiny-llama", "--llm-model=builtin:tiny-gpt2", "--llm-precision=fp32",
             "--llm-precision=fp16"]
    walls: dict[str, list[float]] = {"0": [], "2": [], "4": []}
    loads: dict[str, int] = {}
    for _ in range(max(1, bench.args.repeat // 2)):
        for workers in walls:
            report = suite / f"report-{workers}.json"
            walls[workers].append(run([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", workers, *cells,
                                       f"--llm-report={report}"], cwd=suite))
            loads[workers] = sum(c["loads"] for c in json.loads(report.read_text())["cells"])
    for workers in ("2", "4"):
        bench.add(f"xdist -n {workers}: loads of 4 cells x 10 tests", "loads", [loads[workers]],
                  target=lambda v: v == 4, target_text="== 4")
        bench.add(f"xdist -n {workers}: wall time vs -n 0", "s", walls[workers], walls["0"],
                  note="2 cores: workers share them; the figure is for the record")


PROCESS_LOAD = {
    "bare": "import sys, torch; from transformers import AutoModelForCausalLM; "
            "AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32, use_safetensors=True, "
            "local_files_only=True)",
    "load_model": "import sys; from pytest_llmload import load_model; load_model(sys.argv[1], precision='fp32')",
}


def bench_load_process(bench, checkpoint):
    """A whole process that runs load_model vs one that runs bare from_pretrained (what users pay per process)."""
    times: dict[str, list[float]] = {k: [] for k in PROCESS_LOAD}
    for _ in range(bench.args.repeat * 2):
        for name, code in PROCESS_LOAD.items():
            times[name].append(run([PY, "-c", code, str(checkpoint)]))
    bench.add(f"load process {bench.parameters / 1e6:.0f}M fp32: load_model vs from_pretrained", "s",
              times["load_model"], times["bare"], lambda r: r <= 1.03, "<= 1.03")


def bench_cli(bench):
    """``llmload --help``: seconds, and no torch/transformers imported."""
    code = ("import sys, runpy; sys.argv = ['llmload', '--help']\n"
            "try:\n    runpy.run_module('pytest_llmload', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('HEAVY', sorted(m for m in ('torch', 'transformers') if m in sys.modules), file=sys.stderr)")
    times = []
    heavy = ""
    for _ in range(bench.args.repeat * 2):
        start = time.perf_counter()
        proc = subprocess.run([PY, "-c", code], capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        heavy = proc.stderr.strip().splitlines()[-1]
    bench.add("llmload --help", "s", times, target=lambda v: v < 0.5, target_text="< 0.5 s",
              note=heavy.replace("HEAVY", "imported:"))


LEAK_SUITE = """
import pytest, torch

@pytest.mark.parametrize("n", range({count}))
def test_step(n):
    x = torch.ones(256, device="cuda:0") * n
    assert x.shape == (256,)
"""


def bench_leaks(bench):
    """``--llm-leak-check=tests`` vs ``off`` on a suite of tiny GPU tests (a virtual card): the per-test cost
    of the check when nothing leaked (target < 2 ms)."""
    suite = bench.work / "leak-suite"
    suite.mkdir()
    count = 30 if bench.args.quick else 400
    (suite / "test_steps.py").write_text(LEAK_SUITE.format(count=count))
    (suite / "pytest.ini").write_text("[pytest]\n")
    times: dict[str, list[float]] = {"tests": [], "off": []}
    for _ in range(bench.args.repeat):
        for mode in times:
            times[mode].append(run([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--llm-virtual-gpus=1x64MiB",
                                    f"--llm-leak-check={mode}"], cwd=suite))
    import statistics as st

    per_test = [(a - b) * 1000 / count for a, b in zip(times["tests"], times["off"])]
    bench.add(f"leak check per test ({count} clean GPU tests)", "ms", per_test, target=lambda v: v < 2,
              target_text="< 2 ms", note=f"median run {st.median(times['tests']):.2f} s vs {st.median(times['off']):.2f} s off")


def bench_calibration(bench):
    """Every prediction against what a load really allocates (benchmarks/calibration.py): one table, on the
    real card where torch sees one and no fleet runs (``--quick``, the CI smoke run: always the virtual fleet)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import calibration

    table = calibration.run(quick=bench.args.quick, device="fleet" if bench.args.quick else "auto")
    if not bench.args.json:
        table.print()
    for row in table.rows:
        bench.rows.append({"name": f"calibration: {row['name']}", "predicted": row["predicted"],
                           "measured": row["measured"], "ratio": row["ratio"], "target": row["target"],
                           "met": row["ok"]})


STEPS = (("startup", bench_startup), ("load", bench_load), ("reuse", bench_reuse), ("release", bench_release),
         ("planner", bench_planner), ("strategies", bench_strategies), ("virtual", bench_virtual),
         ("tp", bench_tp), ("xdist", bench_xdist), ("process", bench_load_process), ("cli", bench_cli),
         ("leaks", bench_leaks), ("calibration", bench_calibration))  # run order
_CHECKPOINT_STEPS = {"load", "reuse", "release", "virtual", "process"}  # steps that time the shared checkpoint


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, fewer runs (a smoke test)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument("--repeat", type=int, help="runs per figure (default 5; 2 with --quick)")
    names = [name for name, _ in STEPS]
    parser.add_argument("--only", help=f"comma-separated: {','.join(names)}")
    args = parser.parse_args(argv)
    args.repeat = args.repeat or (2 if args.quick else 5)
    bench = Bench(args)
    wanted = set(args.only.split(",")) if args.only else set(names)
    unknown = sorted(wanted - set(names))
    if unknown:
        parser.error(f"unknown --only step(s) {','.join(unknown)!r}; expected some of {','.join(names)}")
    if not args.json:
        print(f"{'figure':<46} {'min':>9} {'median':>9} {'max':>9} unit", flush=True)
    checkpoint = write_checkpoint(bench) if wanted & _CHECKPOINT_STEPS else None
    for name, step in STEPS:  # the ones that time loads get the shared checkpoint
        if name in wanted:
            if name in _CHECKPOINT_STEPS:
                step(bench, checkpoint)
            else:
                step(bench)
    import shutil

    shutil.rmtree(bench.work, ignore_errors=True)
    if args.json:
        print(json.dumps({"quick": args.quick, "repeat": args.repeat, "rows": bench.rows}, indent=2))
    missed = [r["name"] for r in bench.rows if r.get("met") is False]
    if args.check and missed:
        if not args.json:
            print(f"missed targets: {', '.join(missed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
