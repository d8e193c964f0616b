#!/usr/bin/env python3
"""Summarises the loadgen results of bench/run_benchmarks.sh (one JSON object per line:
{"name": ..., "result": <loadgen --json output>}) as the table in docs/PERFORMANCE.md.

Each configuration ran once per round, rounds interleaved; the table shows, per configuration, the
round with the median throughput (so its latencies come from one real run), and ratios are taken
within a round (same machine load) and then their median across rounds."""
import json
import statistics
import sys

LABELS = {
    "batching_off": "gateway, dynamic batching OFF, 16 clients x batch 1",
    "batching_on": "gateway, dynamic batching ON (shipped: 100 us window), 16 clients x batch 1",
    "batching_on_500us": "gateway, dynamic batching ON, 500 us window, 16 clients x batch 1",
    "in_process_b1": "in-process ONNX Runtime, batch 1",
    "in_process_b16": "in-process ONNX Runtime, batch 16",
}


def main(path: str) -> None:
    runs: dict[str, list[dict]] = {}
    for line in open(path):
        entry = json.loads(line)
        runs.setdefault(entry["name"], []).append(entry["result"])

    def median_run(name):
        ordered = sorted(runs[name], key=lambda r: r["rows_per_s"])
        return ordered[len(ordered) // 2]

    print("| configuration | rows/s (median round) | rows/s per round | p50 ms | p90 ms | p99 ms | p99 ms per round | errors |")
    print("|---|---:|---|---:|---:|---:|---|---:|")
    for name, label in LABELS.items():
        if name not in runs:
            continue
        r = median_run(name)
        every = ", ".join(f"{x['rows_per_s']:.0f}" for x in runs[name])
        p99s = ", ".join(f"{x['p99_ms']:.1f}" for x in runs[name])
        errors = sum(x["errors"] for x in runs[name])
        print(
            f"| {label} | {r['rows_per_s']:.0f} | {every} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} "
            f"| {r['p99_ms']:.2f} | {p99s} | {errors} |"
        )

    def ratio(a: str, b: str) -> str:
        per_round = [x["rows_per_s"] / y["rows_per_s"] for x, y in zip(runs[a], runs[b])]
        rounds = ", ".join(f"{v:.2f}" for v in per_round)
        return f"{statistics.median(per_round):.2f}x (per round: {rounds})"

    print()
    print(f"batching ON / OFF:                     {ratio('batching_on', 'batching_off')}")
    if "batching_on_500us" in runs:
        print(f"100 us window / 500 us window:         {ratio('batching_on', 'batching_on_500us')}")
    print(f"gateway ON / in-process batch 1:       {ratio('batching_on', 'in_process_b1')}")
    print(f"gateway ON / in-process batch 16:      {ratio('batching_on', 'in_process_b16')}")
    print(f"gateway OFF / in-process batch 1:      {ratio('batching_off', 'in_process_b1')}")
    print(f"in-process batch 16 / batch 1:         {ratio('in_process_b16', 'in_process_b1')}")


if __name__ == "__main__":
    main(sys.argv[1])
