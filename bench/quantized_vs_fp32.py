#!/usr/bin/env python3
"""INT8 (models/mlp_bench_int8) against FP32 (models/mlp_bench) through a running gateway: the
time of a batch-64 request to each, interleaved in rounds so both see the same machine load, and
how far the INT8 outputs move on held-out inputs (top-1 agreement with FP32, largest absolute
difference). mlp_bench has random weights, so "accuracy" here is agreement with the FP32 model.

    .venv/bin/python bench/quantized_vs_fp32.py --url 127.0.0.1:8001 [--rounds 20 --requests 20]
"""
import argparse
import time

import numpy as np
import tritonclient.grpc as grpcclient

MODELS = ("mlp_bench", "mlp_bench_int8")


def request(batch: np.ndarray):
    tensor = grpcclient.InferInput("input", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch)
    return [tensor]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="127.0.0.1:8001")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--requests", type=int, default=20, help="requests per model per round")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    client = grpcclient.InferenceServerClient(args.url)
    # Held out: a seed the benchmark never used for anything else; inputs like the warm-up's.
    held_out = np.random.default_rng(12).standard_normal((1024, 256)).astype(np.float32)
    outputs = {}
    for model in MODELS:
        chunks = [client.infer(model, request(held_out[i : i + 64])).as_numpy("output") for i in range(0, 1024, 64)]
        outputs[model] = np.concatenate(chunks)
    agreement = float(np.mean(outputs[MODELS[0]].argmax(1) == outputs[MODELS[1]].argmax(1)))
    max_abs = float(np.max(np.abs(outputs[MODELS[0]] - outputs[MODELS[1]])))
    scale = float(np.max(np.abs(outputs[MODELS[0]])))
    batch = held_out[: args.batch]
    times = {m: [] for m in MODELS}
    for _ in range(args.rounds):
        for model in MODELS:
            start = time.perf_counter()
            for _ in range(args.requests):
                client.infer(model, request(batch))
            times[model].append((time.perf_counter() - start) / args.requests)
    median = {m: float(np.median(t)) for m, t in times.items()}
    for model in MODELS:
        print(f"{model}: median {median[model] * 1e3:.3f} ms per batch-{args.batch} request")
    print(f"speed-up INT8 over FP32: {median[MODELS[0]] / median[MODELS[1]]:.2f}x")
    print(f"top-1 agreement with FP32 on 1024 held-out inputs: {agreement * 100:.1f}%")
    print(f"largest absolute output difference: {max_abs:.4f} (largest FP32 output magnitude {scale:.4f})")


if __name__ == "__main__":
    main()
