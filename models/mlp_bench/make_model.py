#!/usr/bin/env python3
"""Builds models/mlp_bench/1/model.onnx: a 256 -> 1024 -> 1024 -> 10 MLP for throughput benchmarks.

Gemm + Relu in FP32 with random weights from a fixed seed (He initialisation, so activations keep a
sensible scale through the layers). The weights mean nothing; the model exists to give the batcher
and the instance workers real matrix work. Input `input` FP32 [batch, 256], output `output` FP32
[batch, 10]. About 5 MiB, most of it the 1024x1024 layer.

    .venv/bin/python models/mlp_bench/make_model.py
"""
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
SEED = 20240601
LAYERS = [256, 1024, 1024, 10]
OUT = Path(__file__).resolve().parent / "1" / "model.onnx"


def build() -> onnx.ModelProto:
    rng = np.random.default_rng(SEED)
    nodes = []
    initializers = []
    current = "input"
    last = len(LAYERS) - 2
    for i, (fan_in, fan_out) in enumerate(zip(LAYERS[:-1], LAYERS[1:])):
        weight = (rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        bias = (rng.standard_normal(fan_out) * 0.01).astype(np.float32)
        initializers += [
            numpy_helper.from_array(weight, f"fc{i}.weight"),
            numpy_helper.from_array(bias, f"fc{i}.bias"),
        ]
        gemm_out = "output" if i == last else f"fc{i}"
        nodes.append(
            helper.make_node(
                "Gemm", [current, f"fc{i}.weight", f"fc{i}.bias"], [gemm_out], name=f"fc{i}"
            )
        )
        current = gemm_out
        if i != last:
            nodes.append(helper.make_node("Relu", [current], [f"relu{i}"], name=f"relu{i}"))
            current = f"relu{i}"

    graph = helper.make_graph(
        nodes,
        "mlp_bench",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", LAYERS[0]])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", LAYERS[-1]])],
        initializer=initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="onnx-gateway models/mlp_bench/make_model.py",
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def main() -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(build(), OUT)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
