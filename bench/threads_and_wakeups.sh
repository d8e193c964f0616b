#!/usr/bin/env bash
# The gateway's thread and wake-up budget in a pod: starts the gateway on a repository of N copies of
# models/add_sub with M CPU instances each, on CPUS cores (taskset), and reports
#   - the threads it runs once every model is ready (by name, from /proc/PID/task/*/comm),
#   - the context switches of every thread over IDLE seconds with no traffic (a model with no traffic
#     must cause none: no periodic wake-up of any model thread or task).
# Usage: bench/threads_and_wakeups.sh            (N=3 M=1 CPUS=1 IDLE=10 by default)
#        N=3 M=2 CPUS=2 bench/threads_and_wakeups.sh
# Needs a built gateway (GATEWAY, default target/release/onnx-gateway, else target/debug).
set -euo pipefail
cd "$(dirname "$0")/.."

N="${N:-3}"
M="${M:-1}"
CPUS="${CPUS:-1}"
IDLE="${IDLE:-10}"
GATEWAY="${GATEWAY:-target/release/onnx-gateway}"
[[ -x "$GATEWAY" ]] || GATEWAY=target/debug/onnx-gateway

work="$(mktemp -d)"
pid=""
cleanup() {
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        wait "$pid" || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

for i in $(seq 1 "$N"); do
    dir="$work/repo/model_$i"
    mkdir -p "$dir"
    cp -r models/add_sub/1 "$dir/"
    sed -e "s/^name: \"add_sub\"/name: \"model_$i\"/" -e "s/count: 1/count: $M/" \
        models/add_sub/config.pbtxt >"$dir/config.pbtxt"
done

cores="0-$((CPUS - 1))"
taskset -c "$cores" "$GATEWAY" --model-repository "$work/repo" --grpc-port 0 --http-port 0 \
    --metrics-port 0 >"$work/log" 2>&1 &
pid=$!
for _ in $(seq 1 300); do
    grep -q 'startup complete' "$work/log" && break
    kill -0 "$pid" 2>/dev/null || { cat "$work/log"; exit 1; }
    sleep 0.1
done
# Threads the loads borrowed from tokio's blocking pool leave after 10 s idle: wait them out, so the
# count is what the process keeps.
sleep 11

switches() {
    for task in /proc/"$pid"/task/*; do
        printf '%s %s\n' "$(cat "$task/comm")" \
            "$(awk '/ctxt_switches/ {n += $2} END {print n}' "$task/status")"
    done | sort
}
before="$(switches)"
sleep "$IDLE"
after="$(switches)"

echo "## $N models x $M instances on $CPUS CPU(s): threads after startup"
echo
ls /proc/"$pid"/task | wc -l | sed 's/^/total threads: /'
for task in /proc/"$pid"/task/*; do cat "$task/comm"; done | sed -E 's/[0-9]+$//' | sort | uniq -c |
    sort -rn | sed 's/^/  /'
echo
echo "## context switches in $IDLE s without traffic, per thread name"
join <(echo "$before" | awk '{a[$1] += $2} END {for (k in a) print k, a[k]}' | sort) \
     <(echo "$after" | awk '{a[$1] += $2} END {for (k in a) print k, a[k]}' | sort) |
    awk '{d = $3 - $2; total += d; printf "  %-20s %d\n", $1, d} END {printf "total: %d\n", total}'
