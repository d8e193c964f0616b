#!/usr/bin/env python3
"""INT8 against FP32 through a running gateway serving models/, for two pairs:

- digits_mlp / digits_mlp_int8: a trained digit classifier, scored on the held-out test split of
  scikit-learn's digits data (the rows its training never saw: digits_classifier/digits_data.py),
  so the accuracy change from quantization is measured against the true labels;
- mlp_bench / mlp_bench_int8: random weights, so there only agreement with FP32 is measured
  (top-1 agreement and the largest absolute output difference on 1024 inputs of an unused seed).

Speed, per pair: the time of a batch-1 request (latency) and of a batch-64 request (throughput =
64 / time), the FP32 and INT8 models interleaved in rounds so both see the same machine load;
medians over the rounds, and their ratios.

    .venv/bin/python bench/quantized_vs_fp32.py --url 127.0.0.1:8001 [--rounds 20 --requests 20]
"""
import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import tritonclient.grpc as grpcclient

sys.dont_write_bytecode = True  # digits_data.py lives in a model directory the gateway scans
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "models" / "digits_classifier"))
from digits_data import load_split  # noqa: E402

MODELS = Path(__file__).resolve().parent.parent / "models"
PAIRS = {"digits": ("digits_mlp", "digits_mlp_int8"), "mlp_bench": ("mlp_bench", "mlp_bench_int8")}
OUTPUT = {"digits": "probabilities", "mlp_bench": "output"}


def request(batch: np.ndarray):
    tensor = grpcclient.InferInput("input", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch)
    return [tensor]


def outputs(client, model: str, x: np.ndarray, name: str) -> np.ndarray:
    chunks = [client.infer(model, request(x[i : i + 64])).as_numpy(name) for i in range(0, len(x), 64)]
    return np.concatenate(chunks)


def held_out(pair: str) -> tuple[np.ndarray, np.ndarray | None]:
    if pair == "digits":
        _, x_test, _, y_test = load_split()
        return x_test, y_test
    # A seed the benchmark never used for anything else; inputs like the warm-up's.
    return np.random.default_rng(12).standard_normal((1024, 256)).astype(np.float32), None


def quality(client, pair: str) -> None:
    fp32, int8 = PAIRS[pair]
    x, y = held_out(pair)
    out = {m: outputs(client, m, x, OUTPUT[pair]) for m in (fp32, int8)}
    agreement = float(np.mean(out[fp32].argmax(1) == out[int8].argmax(1)))
    if y is not None:
        for m in (fp32, int8):
            # The served label output, not an argmax here: what a client of the model gets.
            labels = outputs(client, m, x, "label").reshape(-1)
            print(f"{m}: held-out accuracy {np.mean(labels == y) * 100:.2f}% ({int(np.sum(labels == y))}/{len(y)})")
    max_abs = float(np.max(np.abs(out[fp32] - out[int8])))
    scale = float(np.max(np.abs(out[fp32])))
    print(f"{pair}: top-1 agreement INT8 vs FP32 on {len(x)} held-out inputs {agreement * 100:.2f}%; "
          f"largest absolute {OUTPUT[pair]} difference {max_abs:.4f} (largest FP32 magnitude {scale:.4f})")


def session(model: str) -> ort.InferenceSession:
    """The model in this process with the gateway's session settings for one instance."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = len(os.sched_getaffinity(0))
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(MODELS / model / "1" / "model.onnx"), options, providers=["CPUExecutionProvider"])


def speed(client, pair: str, rounds: int, requests: int) -> None:
    models = PAIRS[pair]
    x, _ = held_out(pair)
    batches = {1: x[:1], 64: x[:64]}
    times = {(m, b): [] for m in models for b in batches}
    local = {m: session(m) for m in models}
    local_times = {m: [] for m in models}
    for model in models:  # one unrecorded warm-up pass
        for b in batches.values():
            client.infer(model, request(b))
    for _ in range(rounds):
        for size, batch in batches.items():
            for model in models:
                start = time.perf_counter()
                for _ in range(requests):
                    client.infer(model, request(batch))
                times[(model, size)].append((time.perf_counter() - start) / requests)
        for model in models:  # the same batch-64 request in-process: the model's own compute
            start = time.perf_counter()
            for _ in range(requests):
                local[model].run(None, {"input": batches[64]})
            local_times[model].append((time.perf_counter() - start) / requests)
    median = {k: float(np.median(v)) for k, v in times.items()}
    fp32, int8 = models
    for model in models:
        print(f"{model}: median batch-1 request {median[(model, 1)] * 1e6:.0f} us; batch-64 request "
              f"{median[(model, 64)] * 1e6:.0f} us = {64 / median[(model, 64)]:.0f} samples/s")
    for model in models:
        print(f"{model}: median batch-64 run in-process (onnxruntime, no gateway) {np.median(local_times[model]) * 1e6:.0f} us")
    per_round = [f / i for f, i in zip(times[(fp32, 64)], times[(int8, 64)])]
    print(f"{pair}: INT8 / FP32 batch-1 latency {median[(int8, 1)] / median[(fp32, 1)]:.2f}; "
          f"INT8 / FP32 batch-64 throughput {median[(fp32, 64)] / median[(int8, 64)]:.2f}x "
          f"(per-round ratios {min(per_round):.2f}..{max(per_round):.2f}); in-process batch-64 speed-up "
          f"{np.median(local_times[fp32]) / np.median(local_times[int8]):.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="127.0.0.1:8001")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--requests", type=int, default=20, help="requests per model per batch size per round")
    parser.add_argument("--pairs", default="digits,mlp_bench", help="comma-separated: digits, mlp_bench")
    args = parser.parse_args()
    client = grpcclient.InferenceServerClient(args.url)
    for pair in args.pairs.split(","):
        quality(client, pair)
        speed(client, pair, args.rounds, args.requests)


if __name__ == "__main__":
    main()
