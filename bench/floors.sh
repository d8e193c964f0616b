#!/usr/bin/env bash
# The gateway against its two floors, measured in one run, interleaved in rounds (docs/PERFORMANCE.md §6):
#   (a) echo_floor: a bare tonic ModelInfer server echoing its inputs (no model, no validation, no
#       queue), against the gateway serving add_sub, at 1, 16 and 64 requests in flight; and, at 1 in
#       flight, the same server running add_sub's ONNX file on each request (--model-file), which
#       tells how far any server that runs the model can get (reported, no target);
#   (b) inproc_floor: ONNX Runtime in process through the gateway's runtime code, with the thread plan
#       the gateway would use, at batch 1, 16 and 64, against the gateway serving mlp_bench with batch-1
#       requests at 16 and 64 in flight (dynamic batching, no delay);
#   and the 500 us batching window (add_sub at 1 in flight, mlp_bench at 16) against the no-delay
#   throughput, under Triton's strategy and, when the binary has --default-batching-strategy, adaptive.
# Servers and in-process runs are pinned to SERVER_CORE (taskset), the load generator to CLIENT_CORE.
# Load: h2load (one connection, -m in flight, a body written by bench_body); successes are counted by
# the servers (the gateway's nv_inference_request_success delta, the echo floor's own count), since
# h2load sees only HTTP status. Latency percentiles (h2load has none): loadgen at 1 and 16 in flight.
# Client CPU per request is reported to show the client is not the bottleneck.
#
# Usage: bench/floors.sh
#   ROUNDS=3 DURATION=5       rounds, seconds per measurement (default run: about 4 minutes)
#   WARMUP_DURATION=1         seconds per measurement of the unrecorded warm-up round
#   LATENCY_DURATION=DURATION seconds per loadgen latency run (after its own 1 s warm-up)
#   SERVER_CORE=0 CLIENT_CORE=1
#   ADD_SUB_IN_FLIGHT=1,16,64 MLP_IN_FLIGHT=16,64
#   GATEWAY_FLAGS="..."       extra flags for every gateway started
#   SKIP_BUILD=1              use the release binaries already in BIN_DIR (target/release)
#   OUT_DIR=target/bench      where floors.md (the tables) and floors.jsonl (raw figures) go
# Needs h2load (Debian's nghttp2-client; scripts/setup installs it as root), taskset, python3 (standard
# library only), and the ONNX Runtime library (scripts/setup).
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in h2load taskset python3; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "floors.sh: $tool is missing (h2load: apt-get install nghttp2-client, or scripts/setup as root)" >&2
        exit 1
    fi
done
if [[ "$(nproc)" -lt 2 ]]; then
    echo "floors.sh: needs two CPUs (server and client on separate cores), this process sees $(nproc)" >&2
    exit 1
fi

if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
    cargo build --release --bin onnx-gateway --bin loadgen --bin echo_floor --bin inproc_floor --bin bench_body
fi

exec python3 bench/floors.py
