#!/usr/bin/env python3
"""Quickstart: sends two vectors to the add_sub model with Triton's own Python client and prints the
element-wise sum and difference. Works unchanged against Triton Inference Server or onnx-gateway.

    scripts/serve &                                  # gateway on models/, gRPC on localhost:8001
    .venv/bin/python models/add_sub/client.py [--url localhost:8001]
"""
import argparse
import sys

import numpy as np
import tritonclient.grpc as grpcclient


def main() -> int:
    parser = argparse.ArgumentParser(description="add_sub quickstart client")
    parser.add_argument("--url", default="localhost:8001", help="gRPC address of the server")
    args = parser.parse_args()

    client = grpcclient.InferenceServerClient(url=args.url)
    input0 = np.arange(16, dtype=np.float32).reshape(1, 16)
    input1 = np.ones((1, 16), dtype=np.float32)

    inputs = [
        grpcclient.InferInput("INPUT0", list(input0.shape), "FP32"),
        grpcclient.InferInput("INPUT1", list(input1.shape), "FP32"),
    ]
    inputs[0].set_data_from_numpy(input0)
    inputs[1].set_data_from_numpy(input1)
    outputs = [grpcclient.InferRequestedOutput("OUTPUT0"), grpcclient.InferRequestedOutput("OUTPUT1")]

    result = client.infer("add_sub", inputs, outputs=outputs, request_id="quickstart-1")
    output0 = result.as_numpy("OUTPUT0")
    output1 = result.as_numpy("OUTPUT1")
    print("INPUT0          ", input0[0])
    print("INPUT1          ", input1[0])
    print("OUTPUT0 (sum)   ", output0[0])
    print("OUTPUT1 (diff)  ", output1[0])

    if not (np.array_equal(output0, input0 + input1) and np.array_equal(output1, input0 - input1)):
        print("error: the server returned wrong results", file=sys.stderr)
        return 1
    print("PASS: add_sub")
    return 0


if __name__ == "__main__":
    sys.exit(main())
