#!/usr/bin/env bash
# The GPU verification in one run, at most 6 minutes on one card: the setup and the steps' limits add up to
# 350 s (10 kept for timeout's kill grace and the figures), and a deadline cuts a late step short rather than
# run over. Strict: a missing GPU or backend
# fails, never skips. On a machine without a GPU every step says so and is skipped (exit 0), so it can be
# checked anywhere; `bash scripts/gpu_check.sh --plan` prints the steps and their limits and runs nothing.
# Steps (limit in seconds):
#   gpu-tests 45          tests/test_gpu.py + tests/test_hardware.py under --llm-require-gpus;
#   calibration 85        benchmarks/calibration.py --device cuda: the fit need and footprint vs a load on
#                         cuda:0 for GPT-2 124M and a ~1.1B Llama in fp16/bf16/int8/nf4, the training estimate vs
#                         two AdamW steps on the card (dropout on), the CUDA context vs --llm-cuda-context's 500MiB;
#   examples 70           the examples suite on the card: --llm-device-map=auto/cuda:0/sequential x
#                         fp16/bf16/int8/nf4 under --llm-require-gpus;
#   hermetic 25           the examples with HF_ENDPOINT at a local counting server: 0 requests;
#   maps-emulation 35     a gpu+cpu+disk custom map (tiny-llama in fp32/fp16/bf16, logits vs the CPU's), and
#                         --llm-emulate-gpu=8GiB with limit_gpu_memory on the card (an inline test file: the
#                         inventory sees 8 GiB, an allocation past it is CUDA's OOM, requires_gpus skips, the
#                         marker fails a test over its limit);
#   fleet-beside-cuda 45  the virtual fleet in a process that also has real CUDA (tests/test_virtual_gpus.py);
#   real-vs-virtual 25    one workload on the real card and on a virtual card of its size.
# Into $OUT (or /tmp/gpu-check), 7 files: gpu-check.log (versions, each step's tail and exit code), a log per
# kind of step (tests, calibration, examples, maps-emulation, real-vs-virtual) and gpu-check.json (exit codes,
# seconds, the calibration rows, the real-vs-virtual figures).
#
# Where bitsandbytes is not installed, put its wheel in .whl/ first (for the device tool's machines:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2
# and carry .whl).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-check}
py=${PYTHON:-python3}
SETUP=20  # the installs, the versions and the GPU probe
BUDGET=360
NAMES=(gpu-tests calibration examples hermetic maps-emulation fleet-beside-cuda real-vs-virtual)
declare -A LIMIT=([gpu-tests]=45 [calibration]=85 [examples]=70 [hermetic]=25 [maps-emulation]=35
                  [fleet-beside-cuda]=45 [real-vs-virtual]=25)
deadline=$((SECONDS + BUDGET - 10))  # kept back: timeout's kill grace and the figures at the end

plan() {
    local total=$SETUP name
    echo "gpu_check plan (limits in seconds): setup $SETUP"
    for name in "${NAMES[@]}"; do
        echo "  $name ${LIMIT[$name]}"
        total=$((total + LIMIT[$name]))
    done
    echo "  total $total of $BUDGET ($((BUDGET - total)) kept for timeout's kill grace and the figures)"
}

if [[ ${1:-} == --plan ]]; then
    plan
    exit 0
fi
mkdir -p "$out"

declare -A rc secs
step() {  # step NAME LOG COMMAND...: its limit, cut to the time left; appends to $out/LOG.log
    local name=$1 log=$out/$2.log limit=${LIMIT[$1]}
    shift 2
    local left=$((deadline - SECONDS))
    ((left < limit)) && limit=$left
    echo "== $name (limit $limit s)"
    echo "== $name (limit $limit s)" >> "$log"
    if ((limit < 5)); then
        rc[$name]=124 secs[$name]=0
        echo "-- $name: no time left (rc=124)"
        return
    fi
    local start=$SECONDS
    timeout -k 5 "$limit" "$@" >> "$log" 2>&1
    rc[$name]=$? secs[$name]=$((SECONDS - start))
    tail -n 4 "$log"
    echo "-- $name: rc=${rc[$name]} in ${secs[$name]} s"
}

main() {
    plan
    if ! nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
       || ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        echo "gpu_check: no CUDA GPU here (nvidia-smi or torch.cuda.is_available() says so): every step skipped:"
        printf '  skipped: %s (needs a CUDA GPU)\n' "${NAMES[@]}"
        echo "gpu_check: run it on a GPU machine"
        return 0
    fi
    if ls .whl/*.whl >/dev/null 2>&1; then
        timeout 60 "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    # the plugin's entry point must exist for pytester's inner runs: install without network or build isolation
    timeout 60 "$py" -m pip install -q --no-deps --no-index --no-build-isolation --target /tmp/llmload . >/dev/null
    export PYTHONPATH=/tmp/llmload${PYTHONPATH:+:$PYTHONPATH}
    export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
    unset USE_HUB_KERNELS HF_HUB_OFFLINE TRANSFORMERS_OFFLINE
    "$py" .ci/versions.py gpu-check
    echo "setup took $SECONDS s (planned $SETUP)"

    local pytest_q=("$py" -m pytest -p no:cacheprovider -q -rfEs --no-header)
    step gpu-tests tests "${pytest_q[@]}" tests/test_gpu.py tests/test_hardware.py --llm-require-gpus
    step calibration calibration "$py" benchmarks/calibration.py --device cuda --out /tmp/gpu-check-calibration.json
    step examples examples "${pytest_q[@]}" examples --llm-require-gpus --llm-device-map=auto \
        --llm-device-map=cuda:0 --llm-device-map=sequential \
        --llm-precision=fp16 --llm-precision=bf16 --llm-precision=int8 --llm-precision=nf4
    step hermetic examples "$py" - <<'PY'
import http.server, os, subprocess, sys, threading
requests = []
class H(http.server.BaseHTTPRequestHandler):
    def _a(self):
        requests.append(f"{self.command} {self.path}"); self.send_response(404)
        self.send_header("Content-Length", "0"); self.end_headers()
    do_GET = do_HEAD = do_POST = _a
    def log_message(self, *a): pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
threading.Thread(target=server.serve_forever, daemon=True).start()
env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}"}
r = subprocess.run([sys.executable, "-m", "pytest", "examples", "-q", "-p", "no:cacheprovider", "--no-header",
                    "--llm-device-map=cuda:0", "--llm-precision=bf16"], env=env, capture_output=True, text=True)
print(r.stdout[-1500:], r.stderr[-800:])
print("requests to the hub:", len(requests), requests[:5])
sys.exit(r.returncode or (1 if requests else 0))
PY
    local kit
    kit=$(mktemp -d)
    cat > "$kit/test_gpu_kit.py" <<'PY'
"""gpu_check's own checks on the real card: a gpu+cpu+disk custom map; --llm-emulate-gpu and limit_gpu_memory."""
import os

import pytest
import torch

from pytest_llmload import effective_device_map, load_model

MAP = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": "cpu",
       "model.layers.2": "disk", "model.layers.3": 0, "model.norm": "cpu", "lm_head": 0}
IDS = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])


@pytest.mark.requires_gpus(1)
@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-4), ("fp16", 1e-2), ("bf16", 3e-2)])
def test_a_gpu_cpu_disk_map(precision, tolerance):
    reference = load_model("builtin:tiny-llama", device_map="cpu", precision="fp32")
    with torch.no_grad():
        expected = reference(IDS).logits
    model = load_model("builtin:tiny-llama", device_map=MAP, precision=precision)
    assert {str(d) for d in effective_device_map(model).values()} == {"0", "cpu", "disk"}
    assert torch.cuda.memory_allocated(0) > 0
    with torch.no_grad():
        logits = model(IDS.to("cuda:0")).logits.float().cpu()
    torch.testing.assert_close(logits, expected, atol=tolerance, rtol=tolerance)


INNER = '''
import pytest, torch
from pytest_llmload import probe_inventory
from pytest_llmload._internal.config.numbers import parse_size

SIZE = parse_size("{size}")


def test_the_inventory_sees_the_emulated_size():
    gpus = probe_inventory().gpus
    assert gpus and all(gpu.total_memory == SIZE for gpu in gpus), gpus


def test_an_allocation_past_it_is_cuda_oom():
    with pytest.raises(torch.OutOfMemoryError):
        torch.empty(SIZE + 2**28, dtype=torch.uint8, device="cuda:0")


@pytest.mark.requires_gpus(1, memory=f"{{2 * SIZE}}B")
def test_needs_a_bigger_card():
    pass


@pytest.mark.limit_gpu_memory("64MiB")
def test_over_its_limit():
    torch.empty(96 * 2**20, dtype=torch.uint8, device="cuda:0")


@pytest.mark.limit_gpu_memory("128MiB")
def test_under_its_limit():
    torch.empty(96 * 2**20, dtype=torch.uint8, device="cuda:0")
'''


def test_emulate_gpu_and_limit_gpu_memory(pytester):
    size = os.environ.get("GPU_KIT_EMULATE", "8GiB")  # (GPU_KIT_INNER_ARGS: a check of this file on a fleet)
    pytester.makepyfile(INNER.format(size=size))
    result = pytester.runpytest_subprocess(f"--llm-emulate-gpu={size}", "-rsf",
                                           *os.environ.get("GPU_KIT_INNER_ARGS", "").split())
    result.stdout.fnmatch_lines(["*emulated as * each (--llm-emulate-gpu)*",
                                 "*limited to 64.0 MiB of allocated GPU memory on cuda:0 but its peak was*"])
    result.assert_outcomes(passed=3, failed=1, skipped=1)
PY
    step maps-emulation maps-emulation "${pytest_q[@]}" -p pytester "$kit/test_gpu_kit.py" --llm-require-gpus
    step fleet-beside-cuda tests "${pytest_q[@]}" tests/test_virtual_gpus.py tests/test_load_path.py
    step real-vs-virtual real-vs-virtual "$py" scripts/real_vs_virtual.py /tmp/gpu-check-real-vs-virtual.json
    rm -rf "$kit"

    local codes="" seconds="" name
    for name in "${NAMES[@]}"; do
        codes+="\"$name\": ${rc[$name]:-127}, "
        seconds+="\"$name\": ${secs[$name]:-0}, "
    done
    "$py" - "$out" "{${codes%, }}" "{${seconds%, }}" "$SECONDS" <<'PY'
import json, os, sys
out, codes, seconds, total = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
figures = {"exit_codes": codes, "seconds": seconds, "total_seconds": total}
for key, path in (("calibration", "/tmp/gpu-check-calibration.json"),
                  ("real_vs_virtual", "/tmp/gpu-check-real-vs-virtual.json")):
    figures[key] = json.load(open(path)) if os.path.exists(path) else None
with open(os.path.join(out, "gpu-check.json"), "w") as f:
    json.dump(figures, f, indent=1)
missed = [r["name"] for r in figures["calibration"] or [] if not r["ok"]]
print("gpu_check:", codes, f"in {total} s;", f"calibration rows missed: {missed}" if missed else "")
sys.exit(1 if any(codes.values()) else 0)
PY
}

main 2>&1 | tee "$out/gpu-check.log"
exit "${PIPESTATUS[0]}"
