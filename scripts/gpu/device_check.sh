#!/usr/bin/env bash
# The GPU device check (issue 14): one script, run on the GPU machine after reassemble.py, that
#   1. finds the CUDA 13 runtime libraries inside the machine's Python nvidia-* packages and puts
#      their lib folders on LD_LIBRARY_PATH (with the reassembled ONNX Runtime GPU libraries),
#   2. serves models/mlp_bench and conv_small (scripts/gpu/models) with KIND_GPU and Triton's CUDA
#      parameters, and the same models with KIND_CPU, and compares their outputs (gpu_compare),
#   3. runs loadgen at batch 1 with 1/16/64 in flight against both, sampling GPU memory before and
#      after (flat = no growth under load) and scraping nv_gpu_* from /metrics,
#   4. loads a model whose config names the TensorRT accelerator and expects a clear load failure
#      (TensorRT's libraries are not on the device).
# Results go to $OUT (or --out), one file per step plus summary.txt.
#
# --dry-run runs every step it can with the CPU library on a machine without a GPU: the "GPU"
# gateway then serves KIND_CPU copies, a KIND_GPU load is expected to fail clearly instead, and the
# GPU-only figures (nvidia-smi, nv_gpu_*) are reported as absent.
#
#   scripts/gpu/device_check.sh --bin target/release --ort-lib .whl/ort-gpu/lib --out "$OUT"
#   scripts/gpu/device_check.sh --dry-run --bin target/debug --out /some/folder --seconds 1
set -uo pipefail
cd "$(dirname "$0")/../.."

DRY_RUN=0
BIN=target/release
ORT_LIB=""
RESULTS="${OUT:-docs/gpu/results}"
SECONDS_PER_RUN=5
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --bin) BIN="$2"; shift ;;
    --ort-lib) ORT_LIB="$2"; shift ;;
    --out) RESULTS="$2"; shift ;;
    --seconds) SECONDS_PER_RUN="$2"; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
[ -n "$ORT_LIB" ] || ORT_LIB=$([ "$DRY_RUN" = 1 ] && echo .onnxruntime/lib || echo .whl/ort-gpu/lib)
mkdir -p "$RESULTS"
WORK=$(mktemp -d)
PIDS=()
FAILURES=0
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done; rm -rf "$WORK"; }
trap cleanup EXIT

say() { printf '[device-check] %s\n' "$*" | tee -a "$RESULTS/summary.txt"; }
check() { # check NAME CONDITION-COMMAND...
  local name="$1"; shift
  if "$@"; then say "PASS $name"; else say "FAIL $name"; FAILURES=$((FAILURES + 1)); fi
}
: >"$RESULTS/summary.txt"
say "dry_run=$DRY_RUN bin=$BIN ort_lib=$ORT_LIB date=$(date -u +%FT%TZ)"

# ---- 1. libraries -------------------------------------------------------------------------------
cuda_lib_dirs() {
  python3 - <<'EOF'
import glob, os, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()] + sys.path
dirs = []
for root in roots:
    for lib in sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib"))):
        if lib not in dirs:
            dirs.append(lib)
print(":".join(dirs))
EOF
}
CUDA_DIRS=$(cuda_lib_dirs 2>/dev/null || true)
say "CUDA library folders from nvidia-* packages: ${CUDA_DIRS:-none}"
export LD_LIBRARY_PATH="$ORT_LIB${CUDA_DIRS:+:$CUDA_DIRS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export ORT_DYLIB_PATH="$ORT_LIB/libonnxruntime.so"
export NO_COLOR=1
nvidia-smi -L >"$RESULTS/nvidia-smi.txt" 2>&1 || echo "no nvidia-smi" >"$RESULTS/nvidia-smi.txt"
say "devices: $(head -1 "$RESULTS/nvidia-smi.txt")"

# ---- repositories ---------------------------------------------------------------------------------
GPU_KIND=$([ "$DRY_RUN" = 1 ] && echo KIND_CPU || echo KIND_GPU)
CUDA_ACCELERATOR='optimization { execution_accelerators { gpu_execution_accelerator : [ { name : "cuda"
  parameters { key: "gpu_mem_limit" value: "2147483648" }
  parameters { key: "arena_extend_strategy" value: "1" }
  parameters { key: "cudnn_conv_algo_search" value: "1" }
  parameters { key: "do_copy_in_default_stream" value: "1" } } ] } }'
TENSORRT_ACCELERATOR='optimization { execution_accelerators { gpu_execution_accelerator : [ { name : "tensorrt"
  parameters { key: "precision_mode" value: "FP16" } } ] } }'
make_repo() { # make_repo DIR KIND [EXTRA-CONFIG]
  local dir="$1" kind="$2" extra="${3:-}"
  mkdir -p "$dir"
  cp -r models/mlp_bench scripts/gpu/models/conv_small "$dir/"
  for config in "$dir"/*/config.pbtxt; do
    sed -i "s/kind: KIND_CPU/kind: $kind/" "$config"
    [ -n "$extra" ] && printf '%s\n' "$extra" >>"$config"
  done
}
make_repo "$WORK/cpu" KIND_CPU
make_repo "$WORK/gpu" "$GPU_KIND" "$([ "$DRY_RUN" = 1 ] || echo "$CUDA_ACCELERATOR")"
make_repo "$WORK/trt" KIND_GPU "$TENSORRT_ACCELERATOR"

# start_gateway NAME REPO: starts it on port 0 and sets ADDR and ADMIN from its log.
start_gateway() {
  local name="$1" repo="$2" log="$RESULTS/gateway-$1.log"
  "$BIN/onnx-gateway" --model-repository "$repo" --grpc-address 127.0.0.1 --grpc-port 0 \
    --metrics-address 127.0.0.1 --metrics-port 0 --drain-delay-secs 0 >"$log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 1 600); do
    ADDR=$(sed -n 's/.*gRPC listening addr=\([^ ]*\).*/\1/p' "$log" | head -1)
    ADMIN=$(sed -n 's/.*admin HTTP listening addr=\([^ ]*\).*/\1/p' "$log" | head -1)
    [ -n "$ADDR" ] && [ -n "$ADMIN" ] && return 0
    kill -0 "${PIDS[-1]}" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}
http_get() { # http_get URL: the body on stdout, exit 1 unless 200 (python3: curl may be absent)
  python3 -c 'import sys, urllib.request
try:
    sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())
except Exception:
    sys.exit(1)' "$1"
}
wait_ready() { # wait_ready ADMIN
  for _ in $(seq 1 600); do
    http_get "http://$1/v2/health/ready" >/dev/null && return 0
    sleep 0.1
  done
  return 1
}
gpu_memory() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -1 || true; }

# ---- 2. outputs, GPU vs CPU ---------------------------------------------------------------------------
check "CPU gateway starts" start_gateway cpu "$WORK/cpu" && CPU_ADDR=$ADDR && CPU_ADMIN=$ADMIN
check "CPU gateway ready" wait_ready "$CPU_ADMIN"
check "GPU gateway starts ($GPU_KIND)" start_gateway gpu "$WORK/gpu" && GPU_ADDR=$ADDR && GPU_ADMIN=$ADMIN
check "GPU gateway ready" wait_ready "$GPU_ADMIN"
compare() { # compare MODEL: one JSON line into compare.jsonl
  "$BIN/gpu_compare" --gpu-url "$GPU_ADDR" --cpu-url "$CPU_ADDR" --model "$1" --rows 8 \
    >>"$RESULTS/compare.jsonl" 2>&1
}
for model in mlp_bench conv_small; do
  check "$model outputs GPU == CPU" compare "$model"
done

# ---- 3. throughput and memory -----------------------------------------------------------------------
BEFORE=$(gpu_memory)
for model in mlp_bench conv_small; do
  for target in gpu cpu; do
    addr=$([ $target = gpu ] && echo "$GPU_ADDR" || echo "$CPU_ADDR")
    for inflight in 1 16 64; do
      "$BIN/loadgen" --url "$addr" --model "$model" --batch-size 1 --concurrency "$inflight" \
        --duration-secs "$SECONDS_PER_RUN" --json 2>>"$RESULTS/loadgen.err" |
        sed "s/^{/{\"target\":\"$target\",\"in_flight\":$inflight,/" >>"$RESULTS/loadgen.jsonl"
    done
  done
done
AFTER_FIRST=$(gpu_memory)
# A second identical pass: memory must not keep growing (onnxruntime_backend issue 198).
for inflight in 1 16 64; do
  "$BIN/loadgen" --url "$GPU_ADDR" --model conv_small --batch-size 1 --concurrency "$inflight" \
    --duration-secs "$SECONDS_PER_RUN" --json >/dev/null 2>>"$RESULTS/loadgen.err"
done
AFTER_SECOND=$(gpu_memory)
say "GPU memory used (MiB): before=${BEFORE:-n/a} after_pass1=${AFTER_FIRST:-n/a} after_pass2=${AFTER_SECOND:-n/a}"
check "loadgen produced 12 results" test "$(grep -c '"requests"' "$RESULTS/loadgen.jsonl" 2>/dev/null)" -eq 12
check "loadgen runs had no errors" sh -c "! grep -q '\"errors\":[1-9]' '$RESULTS/loadgen.jsonl'"
if [ "$DRY_RUN" = 0 ]; then
  check "GPU memory flat across passes (<= 64 MiB growth)" test $((AFTER_SECOND - AFTER_FIRST)) -le 64
fi
http_get "http://$GPU_ADMIN/metrics" >"$RESULTS/metrics-gpu.txt"
if [ "$DRY_RUN" = 1 ]; then
  check "no nv_gpu_* metrics without a GPU" sh -c "! grep -q '^nv_gpu_' '$RESULTS/metrics-gpu.txt'"
else
  for metric in nv_gpu_utilization nv_gpu_memory_used_bytes nv_gpu_memory_total_bytes nv_gpu_power_usage; do
    check "$metric exported" grep -q "^$metric{gpu_uuid=" "$RESULTS/metrics-gpu.txt"
  done
fi
for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; done
PIDS=()

# ---- 4. failures that must be clear --------------------------------------------------------------------
run_to_exit() { # run_to_exit NAME REPO: runs a gateway that should fail its load, keeps its log
  timeout 120 "$BIN/onnx-gateway" --model-repository "$2" --grpc-address 127.0.0.1 --grpc-port 0 \
    --metrics-address 127.0.0.1 --metrics-port 0 --exit-on-error true >"$RESULTS/gateway-$1.log" 2>&1
}
run_to_exit trt "$WORK/trt"
check "TensorRT accelerator: the gateway exits non-zero (exit-on-error)" test $? -ne 0
check "TensorRT failure names TensorRT" grep -qi "tensorrt" "$RESULTS/gateway-trt.log"
if [ "$DRY_RUN" = 1 ]; then
  make_repo "$WORK/gpu-on-cpu" KIND_GPU
  run_to_exit gpu-on-cpu "$WORK/gpu-on-cpu"
  check "KIND_GPU with the CPU library exits non-zero" test $? -ne 0
  check "KIND_GPU with the CPU library fails clearly (names CUDA)" grep -qi "cuda" "$RESULTS/gateway-gpu-on-cpu.log"
fi

say "done: $FAILURES failed check(s); results in $RESULTS"
[ "$FAILURES" = 0 ]
