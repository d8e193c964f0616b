#!/usr/bin/env bash
# Reproduces the figures in docs/PERFORMANCE.md, in one run on one machine:
#   1. mlp_bench (256x1024x1024x10 MLP), 16 concurrent clients sending batch-1 requests to the gateway
#      with dynamic batching OFF (a copy of mlp_bench without its dynamic_batching block, same
#      max_batch_size 64) and ON (the shipped config, max_queue_delay 100 us), ON with the former
#      500 us window, plus in-process ONNX Runtime at batch 1 and 16 (ORT's defaults: 2 intra-op
#      threads here, spinning on). The measurements are interleaved over ROUNDS rounds after one
#      unrecorded warm-up round, so drift in the machine's load hits all of them alike; the table
#      reports the median round of each.
#   2. bench/shm_vs_inline.py: a 4 MiB tensor per request, inline vs system shared memory.
#
# Usage: bench/run_benchmarks.sh            (ROUNDS=3 DURATION=5 CONCURRENCY=16 by default)
# Needs release binaries (built here if missing) and the project's .venv (scripts/setup).
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS="${ROUNDS:-3}"
DURATION="${DURATION:-5}"
CONCURRENCY="${CONCURRENCY:-16}"
SHM_ITERATIONS="${SHM_ITERATIONS:-200}"
PYTHON="${PYTHON:-.venv/bin/python}"
# The raw loadgen results of the last run are kept here (target/ is not committed).
OUT_DIR="${OUT_DIR:-target/bench}"
GATEWAY=target/release/onnx-gateway
LOADGEN=target/release/loadgen

cargo build --release --bins

mkdir -p "$OUT_DIR"
work="$(mktemp -d)"
gateway_pid=""
cleanup() {
    if [[ -n "$gateway_pid" ]] && kill -0 "$gateway_pid" 2>/dev/null; then
        kill -TERM "$gateway_pid"
        wait "$gateway_pid" || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

echo "== machine"
echo "nproc: $(nproc)"
grep -m1 'model name' /proc/cpuinfo || true
echo "cgroup cpu.max: $(cat /sys/fs/cgroup/cpu.max 2>/dev/null || echo none)"
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"

# One repository, one gateway: both variants of the model are served by the same process.
repo="$work/repository"
for name in mlp_bench mlp_bench_nobatch mlp_bench_d500; do
    mkdir -p "$repo/$name/1"
    cp models/mlp_bench/1/model.onnx "$repo/$name/1/"
done
cp models/mlp_bench/config.pbtxt "$repo/mlp_bench/"
"$PYTHON" - "$repo" <<'EOF'
import re, sys
from pathlib import Path
repo = Path(sys.argv[1])
text = (repo / "mlp_bench" / "config.pbtxt").read_text()
text = text.replace('name: "mlp_bench"', 'name: "mlp_bench_nobatch"')
# Drop the dynamic_batching block: requests queue fairly and run one per execution.
text, n = re.subn(r"dynamic_batching\s*\{[^}]*\}\n?", "", text)
assert n == 1, "expected one dynamic_batching block"
(repo / "mlp_bench_nobatch" / "config.pbtxt").write_text(text)
text = (repo / "mlp_bench" / "config.pbtxt").read_text()
text = text.replace('name: "mlp_bench"', 'name: "mlp_bench_d500"')
text, n = re.subn(r"max_queue_delay_microseconds: \d+", "max_queue_delay_microseconds: 500", text)
assert n == 1, "expected one max_queue_delay_microseconds"
(repo / "mlp_bench_d500" / "config.pbtxt").write_text(text)
EOF

"$GATEWAY" --model-repository "$repo" --grpc-address 127.0.0.1 --grpc-port 0 \
    --metrics-address 127.0.0.1 --metrics-port 0 --drain-delay-secs 0 \
    --http-address 127.0.0.1 --http-port 0 \
    2> >(sed -u 's/\x1b\[[0-9;]*m//g' > "$work/gateway.log") &
gateway_pid=$!
url=""
for _ in $(seq 1 600); do
    url="$(grep -o 'gRPC listening addr=[^ ]*' "$work/gateway.log" | head -1 | cut -d= -f2 || true)"
    [[ -n "$url" ]] && break
    kill -0 "$gateway_pid" 2>/dev/null || { cat "$work/gateway.log"; exit 1; }
    sleep 0.1
done
[[ -n "$url" ]] || { echo "gateway did not listen"; cat "$work/gateway.log"; exit 1; }
# The listeners are bound before the models load: wait for readiness, not only for the port.
admin=""
for _ in $(seq 1 100); do
    admin="$(grep -o 'admin HTTP listening addr=[^ ]*' "$work/gateway.log" | head -1 | cut -d= -f2 || true)"
    [[ -n "$admin" ]] && break
    sleep 0.1
done
"$PYTHON" - "$admin" <<'EOF'
import sys, time, urllib.error, urllib.request
deadline = time.monotonic() + 120
while True:
    try:
        if urllib.request.urlopen(f"http://{sys.argv[1]}/v2/health/ready", timeout=2).status == 200:
            break
    except (urllib.error.URLError, OSError):
        pass
    if time.monotonic() > deadline:
        sys.exit("gateway did not become ready within 120 s")
    time.sleep(0.1)
EOF
echo "gateway: $url"

results="$work/results.jsonl"
record=1
run() {  # run NAME loadgen-args...
    local name="$1"
    shift
    local line
    line="$("$LOADGEN" --json --duration-secs "$DURATION" "$@")"
    if [[ "$record" == 1 ]]; then
        echo "{\"name\":\"$name\",\"result\":$line}" >> "$results"
    fi
    echo "  $name: $line"
}
round() {
    run batching_off --url "$url" --model mlp_bench_nobatch --concurrency "$CONCURRENCY" --batch-size 1
    run batching_on --url "$url" --model mlp_bench --concurrency "$CONCURRENCY" --batch-size 1
    run batching_on_500us --url "$url" --model mlp_bench_d500 --concurrency "$CONCURRENCY" --batch-size 1
    run in_process_b1 --in-process models/mlp_bench/1/model.onnx --batch-size 1
    run in_process_b16 --in-process models/mlp_bench/1/model.onnx --batch-size 16
}

echo "== mlp_bench: one warm-up round, then $ROUNDS interleaved rounds of ${DURATION}s each"
echo "warm-up round (not recorded)"
record=0
round
record=1
for r in $(seq 1 "$ROUNDS"); do
    echo "round $r (load average $(cut -d' ' -f1 /proc/loadavg))"
    round
done

kill -TERM "$gateway_pid"
wait "$gateway_pid" || true
gateway_pid=""

"$PYTHON" bench/summarize_loadgen.py "$results"
cp "$results" "$OUT_DIR/loadgen_results.jsonl"

echo
echo "== system shared memory vs inline tensors (4 MiB per request, identity_uint8)"
GATEWAY_BIN="$GATEWAY" "$PYTHON" bench/shm_vs_inline.py --start --iterations "$SHM_ITERATIONS"
