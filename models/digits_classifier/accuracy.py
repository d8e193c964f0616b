#!/usr/bin/env python3
"""Scores the digits_classifier model served by a running gateway (or Triton) on the held-out test
split of scikit-learn's digits data set, and exits non-zero if the accuracy is below --min-accuracy.

The split is recomputed with the seed the training script used (digits_data.py beside this file), so
the rows scored here are exactly the ones the model never saw. Requests are sent in batches of the
model's max_batch_size, read from the served (auto-completed) model configuration.

    .venv/bin/python models/digits_classifier/accuracy.py [--url localhost:8001] [--min-accuracy 0.9]
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

# The model directory is also a model repository entry: keep __pycache__ out of it.
sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_data import load_split  # noqa: E402

MODEL = "digits_classifier"


def predict(client: grpcclient.InferenceServerClient, x: np.ndarray, batch_size: int) -> np.ndarray:
    labels = []
    for start in range(0, len(x), batch_size):
        chunk = x[start : start + batch_size]
        infer_input = grpcclient.InferInput("input", list(chunk.shape), "FP32")
        infer_input.set_data_from_numpy(chunk)
        result = client.infer(
            MODEL, [infer_input], outputs=[grpcclient.InferRequestedOutput("label")]
        )
        labels.append(result.as_numpy("label").reshape(-1))
    return np.concatenate(labels)


def main() -> int:
    parser = argparse.ArgumentParser(description="digits_classifier accuracy check")
    parser.add_argument("--url", default="localhost:8001", help="gRPC address of the server")
    parser.add_argument("--min-accuracy", type=float, default=0.9)
    args = parser.parse_args()

    client = grpcclient.InferenceServerClient(url=args.url)
    config = client.get_model_config(MODEL).config
    # max_batch_size 0 means the model takes no batch dimension of its own: send one full tensor.
    batch_size = config.max_batch_size if config.max_batch_size > 0 else None

    _, x_test, _, y_test = load_split()
    predicted = predict(client, x_test, batch_size or len(x_test))
    accuracy = float(np.mean(predicted == y_test))
    print(f"{MODEL}: {int(np.sum(predicted == y_test))}/{len(y_test)} correct, accuracy {accuracy:.4f}")
    if accuracy < args.min_accuracy:
        print(f"FAIL: accuracy {accuracy:.4f} is below {args.min_accuracy}", file=sys.stderr)
        return 1
    print("PASS: digits_classifier")
    return 0


if __name__ == "__main__":
    sys.exit(main())
