#!/usr/bin/env bash
# The GPU verification in one run (at most ~6 minutes on one card). Strict: a missing GPU or backend fails,
# never skips. On a machine without a GPU every step says so and is skipped (exit 0), so it can be checked
# anywhere. Steps:
#   1. tests/test_gpu.py + tests/test_hardware.py under --llm-require-gpus;
#   2. the examples suite on the real card: --llm-device-map=cuda:0 and sequential x fp16/bf16/int8/nf4;
#   3. hermetic loads on a real card: the examples with HF_ENDPOINT at a local counting server: 0 requests;
#   4. the virtual fleet started in a process that also has real CUDA (tests/test_virtual_gpus.py);
#   5. one workload on the real card and on a virtual card of its size (scripts/real_vs_virtual.py).
# Logs and one JSON of figures go to $OUT (or /tmp/gpu-check) - at most 8 files.
#
# Where bitsandbytes is not installed, put its wheel in .whl/ first (for the device tool's machines:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2
# and carry .whl).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# the plugin's entry point must exist for pytester's inner runs: install without network or build isolation
python3 -m pip install -q --no-deps --no-index --no-build-isolation --target /tmp/llmload . >/dev/null
export PYTHONPATH=/tmp/llmload${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
unset USE_HUB_KERNELS HF_HUB_OFFLINE TRANSFORMERS_OFFLINE
python3 .ci/versions.py gpu-check | tee "$out/versions.txt"
if ! nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee -a "$out/versions.txt" \
   || ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA GPU here: every step skipped (run it on a GPU machine)"
    exit 0
fi
declare -A rc
step() {  # step NAME LIMIT_SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name"
    local start=$SECONDS
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    rc[$name]=$?
    tail -n 4 "$out/$name.log"
    echo "-- $name: rc=${rc[$name]} in $((SECONDS - start)) s"
}
pytest_q=(python3 -m pytest -p no:cacheprovider -q -rfEs --no-header)
step gpu-tests 120 "${pytest_q[@]}" tests/test_gpu.py tests/test_hardware.py --llm-require-gpus
step examples-on-gpu 120 "${pytest_q[@]}" examples --llm-require-gpus --llm-device-map=cuda:0 \
    --llm-device-map=sequential --llm-precision=fp16 --llm-precision=bf16 --llm-precision=int8 --llm-precision=nf4
step hermetic-on-gpu 60 python3 - <<'PY'
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
step fleet-beside-cuda 90 "${pytest_q[@]}" tests/test_virtual_gpus.py tests/test_load_path.py
step real-vs-virtual 90 python3 scripts/real_vs_virtual.py "$out/real-vs-virtual.json"
python3 - "$out" <<PY
import json, sys
rc = {"gpu-tests": ${rc[gpu-tests]}, "examples-on-gpu": ${rc[examples-on-gpu]},
      "hermetic-on-gpu": ${rc[hermetic-on-gpu]}, "fleet-beside-cuda": ${rc[fleet-beside-cuda]},
      "real-vs-virtual": ${rc[real-vs-virtual]}}
json.dump({"exit_codes": rc}, open(sys.argv[1] + "/gpu-check.json", "w"), indent=1)
print("gpu_check:", rc)
sys.exit(1 if any(rc.values()) else 0)
PY
