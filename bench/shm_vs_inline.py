#!/usr/bin/env python3
"""Large tensors inline vs through system shared memory, measured in one run.

Sends one UINT8 tensor of --bytes (default 4 MiB) per request to an identity model
(tests/models/identity_uint8: INPUT0 -> OUTPUT0, dims [-1, -1], max_batch_size 0) in three modes:

  inline    input in the request, output in the response (the gRPC path)
  shm_in    input from a registered region, output in the response
  shm_both  input from a region, output written into a region (no tensor bytes on the socket)

Every mode does the client-side work a real caller would: inline serialises the array into the
request; the shared-memory modes copy the array into the region (set_shared_memory_region) and read
the output as a view of the region. Modes are interleaved request by request, in a rotating order,
so drift in the machine's load affects all of them alike. One request at a time: this measures the
per-request cost, not the server's concurrency.

Usage (against a running gateway started with --allow-client-shm=true on tests/models):
    python bench/shm_vs_inline.py --url 127.0.0.1:8001
or let the script start one (GATEWAY_BIN, default target/debug/onnx-gateway; use a release build
for numbers worth writing down):
    python bench/shm_vs_inline.py --start
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

ROOT = Path(__file__).resolve().parents[1]
MODES = ("inline", "shm_in", "shm_both")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="127.0.0.1:8001", help="gateway gRPC address")
    parser.add_argument("--start", action="store_true", help="start GATEWAY_BIN on tests/models on port 0")
    parser.add_argument("--model", default="identity_uint8")
    parser.add_argument("--bytes", type=int, default=4 * 1024 * 1024, help="tensor size per request")
    parser.add_argument("--iterations", type=int, default=200, help="measured requests per mode")
    parser.add_argument("--warmup", type=int, default=10, help="unmeasured requests per mode")
    return parser.parse_args()


def start_gateway() -> tuple[subprocess.Popen, str]:
    binary = os.environ.get("GATEWAY_BIN", str(ROOT / "target" / "debug" / "onnx-gateway"))
    process = subprocess.Popen(
        [
            binary,
            "--model-repository", str(ROOT / "tests" / "models"),
            "--grpc-address", "127.0.0.1", "--grpc-port", "0",
            "--metrics-address", "127.0.0.1", "--metrics-port", "0",
            "--http-address", "127.0.0.1", "--http-port", "0",
            "--allow-client-shm=true",
        ],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    found = threading.Event()
    address: list[str] = []

    def drain():
        pattern = re.compile(r"gRPC listening addr=(\S+)")
        for line in process.stderr:
            match = pattern.search(re.sub(r"\x1b\[[0-9;]*m", "", line))
            if match and not address:
                address.append(match.group(1))
                found.set()
        found.set()

    threading.Thread(target=drain, daemon=True).start()
    if not found.wait(60) or not address:
        process.kill()
        sys.exit("gateway did not log its gRPC address")
    return process, address[0]


def wait_ready(client: grpcclient.InferenceServerClient, model: str):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if client.is_server_ready() and client.is_model_ready(model):
                return
        except InferenceServerException:
            pass
        time.sleep(0.05)
    sys.exit(f"gateway or model '{model}' never became ready")


class Bench:
    def __init__(self, client: grpcclient.InferenceServerClient, model: str, size: int):
        self.client = client
        self.model = model
        self.size = size
        self.shape = [1, size]
        self.data = np.random.default_rng(0).integers(0, 256, self.shape, dtype=np.uint8)
        tag = f"{os.getpid()}"
        self.in_name, self.out_name = f"bench_in_{tag}", f"bench_out_{tag}"
        self.in_handle = shm.create_shared_memory_region(self.in_name, f"/{self.in_name}", size)
        self.out_handle = shm.create_shared_memory_region(self.out_name, f"/{self.out_name}", size)
        client.register_system_shared_memory(self.in_name, f"/{self.in_name}", size)
        client.register_system_shared_memory(self.out_name, f"/{self.out_name}", size)

    def close(self):
        for name in (self.in_name, self.out_name):
            try:
                self.client.unregister_system_shared_memory(name)
            except InferenceServerException:
                pass
        shm.destroy_shared_memory_region(self.in_handle)
        shm.destroy_shared_memory_region(self.out_handle)

    def request(self, mode: str) -> np.ndarray:
        """One request, client work included; returns the output as the caller would see it."""
        tensor = grpcclient.InferInput("INPUT0", self.shape, "UINT8")
        output = grpcclient.InferRequestedOutput("OUTPUT0")
        if mode == "inline":
            tensor.set_data_from_numpy(self.data)
        else:
            shm.set_shared_memory_region(self.in_handle, [self.data])
            tensor.set_shared_memory(self.in_name, self.size)
        if mode == "shm_both":
            output.set_shared_memory(self.out_name, self.size)
        result = self.client.infer(self.model, [tensor], outputs=[output])
        if mode == "shm_both":
            return shm.get_contents_as_numpy(self.out_handle, np.uint8, self.shape)
        return result.as_numpy("OUTPUT0").reshape(self.shape)

    def check(self, mode: str):
        if not np.array_equal(self.request(mode), self.data):
            sys.exit(f"mode {mode}: output differs from input")


def summarize(samples: dict[str, list[float]], size: int):
    inline_rate = len(samples["inline"]) / sum(samples["inline"])
    print(f"\n{size} bytes per request ({size / 2**20:.1f} MiB), {len(samples['inline'])} requests per mode\n")
    print("| mode     | req/s  | MiB/s  | mean ms | p50 ms | p99 ms | req/s vs inline |")
    print("|----------|--------|--------|---------|--------|--------|-----------------|")
    for mode in MODES:
        times = sorted(samples[mode])
        rate = len(times) / sum(times)
        p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
        print(
            f"| {mode:<8} | {rate:6.1f} | {rate * size / 2**20:6.0f} | {statistics.mean(times) * 1e3:7.2f} "
            f"| {statistics.median(times) * 1e3:6.2f} | {p99 * 1e3:6.2f} | {rate / inline_rate:15.2f} |"
        )


def main():
    args = parse_args()
    process = None
    url = args.url
    if args.start:
        process, url = start_gateway()
    client = grpcclient.InferenceServerClient(url)
    bench = None
    try:
        wait_ready(client, args.model)
        bench = Bench(client, args.model, args.bytes)
        for mode in MODES:
            bench.check(mode)
            for _ in range(args.warmup):
                bench.request(mode)
        samples: dict[str, list[float]] = {mode: [] for mode in MODES}
        for i in range(args.iterations):
            # Rotating order: no mode always runs right after another.
            for j in range(len(MODES)):
                mode = MODES[(i + j) % len(MODES)]
                start = time.perf_counter()
                bench.request(mode)
                samples[mode].append(time.perf_counter() - start)
        summarize(samples, args.bytes)
    finally:
        if bench is not None:
            bench.close()
        if process is not None:
            process.terminate()
            process.wait(30)


if __name__ == "__main__":
    main()
