#!/usr/bin/env python3
"""Builds models/add_sub/1/model.onnx: OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1.

Both inputs are FP32 [batch, 16] with a symbolic batch dimension, so the gateway can batch requests
(config.pbtxt sets max_batch_size 8). The graph has no weights, so the output is byte-for-byte the
same every time this script runs.

    .venv/bin/python models/add_sub/make_model.py
"""
from pathlib import Path

import onnx
from onnx import TensorProto, helper

# Opset 17 / IR 8 load in every ONNX Runtime from 1.13 on, including the 1.31 the gateway ships with.
OPSET = 17
IR_VERSION = 8
OUT = Path(__file__).resolve().parent / "1" / "model.onnx"


def build() -> onnx.ModelProto:
    def tensor(name: str) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", 16])

    graph = helper.make_graph(
        [
            helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"], name="add"),
            helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"], name="sub"),
        ],
        "add_sub",
        [tensor("INPUT0"), tensor("INPUT1")],
        [tensor("OUTPUT0"), tensor("OUTPUT1")],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="onnx-gateway models/add_sub/make_model.py",
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def main() -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(build(), OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
