#!/usr/bin/env python3
"""Memory soak: steady load of large requests under a memory budget, sampling the server's resident
set (VmRSS, VmHWM from /proc/<pid>/status) and the budget's gauge (bytes in flight) every few
seconds. RSS should stay flat after warm-up; refusals (RESOURCE_EXHAUSTED) are counted, not errors.
Not a CI test: it runs for minutes.

    GATEWAY_BIN=target/release/onnx-gateway .venv/bin/python bench/soak_memory.py --minutes 3
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "python"))
from harness import TEST_MODELS, start_gateway  # noqa: E402
from test_memory_budget import metric, open_stub, raw_request, vm_kib  # noqa: E402

MIB = 1024 * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--budget-mib", type=int, default=64)
    parser.add_argument("--request-mib", type=int, default=4)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--sample-secs", type=float, default=5.0)
    args = parser.parse_args()

    gateway = start_gateway(TEST_MODELS, "--max-inflight-bytes", str(args.budget_mib * MIB))
    pid = gateway.process.pid
    elements = args.request_mib * MIB // 4
    request = raw_request("identity_fp32", "FP32", [1, elements], np.ones(elements, np.float32).tobytes())
    counts = {"ok": 0, "refused": 0, "other": 0}
    lock = threading.Lock()
    stop = time.monotonic() + args.minutes * 60

    def client() -> None:
        channel, stub = open_stub(gateway)
        while time.monotonic() < stop:
            try:
                stub.ModelInfer(request, timeout=60)
                kind = "ok"
            except grpc.RpcError as e:
                kind = "refused" if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else "other"
            with lock:
                counts[kind] += 1
        channel.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(args.clients)]
    for t in threads:
        t.start()
    print("seconds  VmRSS_MiB  VmHWM_MiB  inflight_MiB  ok  refused  other", flush=True)
    started = time.monotonic()
    samples = []
    while time.monotonic() < stop:
        time.sleep(args.sample_secs)
        rss, hwm = vm_kib(pid, "VmRSS") / 1024, vm_kib(pid, "VmHWM") / 1024
        inflight = metric(gateway.admin_url, "onnx_gateway_inflight_request_bytes") / MIB
        samples.append(rss)
        with lock:
            c = dict(counts)
        print(f"{time.monotonic() - started:7.0f}  {rss:9.1f}  {hwm:9.1f}  {inflight:12.1f}  "
              f"{c['ok']}  {c['refused']}  {c['other']}", flush=True)
    for t in threads:
        t.join()
    peak_inflight = metric(gateway.admin_url, "onnx_gateway_inflight_request_bytes_peak") / MIB
    gateway.stop()
    half = samples[len(samples) // 2:]
    print(f"budget {args.budget_mib} MiB, peak in flight {peak_inflight:.1f} MiB, "
          f"RSS second half min/max {min(half):.1f}/{max(half):.1f} MiB", flush=True)


if __name__ == "__main__":
    main()
