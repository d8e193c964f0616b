#!/usr/bin/env bash
# User-space instructions per request, counted under callgrind (bench/instructions.py): the echo floor,
# the echo floor running the model's ONNX file, and the gateway serving the model (add_sub, or
# MODEL=mlp_bench), each pinned to one core, at 1 and 16 requests in flight. Counts, not times: they
# repeat on a busy machine, so a change in a request's work shows even when bench/floors.sh cannot
# tell it from the noise (docs/PERFORMANCE.md).
#
# Usage: bench/instructions.sh                 (about 3 minutes)
#   MODEL=add_sub                               or mlp_bench (batch-1 requests)
#   IN_FLIGHT=1,16 REQUESTS=2000 WARMUP=500     in-flight counts, requests counted, requests before
#   SERVER_CORE=0 CLIENT_CORE=1
#   SKIP_BUILD=1                                use the release binaries already in target/release
#   GATEWAY=target/release/onnx-gateway         the gateway binary (another build's, to compare with)
#   OUT_DIR=target/bench                        where instructions.md and instructions.jsonl go
# Needs valgrind (Debian's package), h2load (scripts/setup installs it as root), taskset, python3, and
# the ONNX Runtime library (scripts/setup).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
    cargo build --release --bin onnx-gateway --bin echo_floor --bin bench_body
fi

exec python3 bench/instructions.py
