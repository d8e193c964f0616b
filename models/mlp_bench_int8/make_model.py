#!/usr/bin/env python3
"""Makes models/mlp_bench_int8/1/model.onnx: models/mlp_bench dynamically quantized to INT8 with
onnxruntime.quantization (weights stored as INT8, activations quantized per batch at run time;
MatMul becomes MatMulInteger). Same inputs and outputs as the FP32 original.

    .venv/bin/python models/mlp_bench_int8/make_model.py
"""
from pathlib import Path

from onnxruntime.quantization import QuantType, quantize_dynamic

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parent / "mlp_bench" / "1" / "model.onnx"
OUT = HERE / "1" / "model.onnx"


def main() -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(SOURCE, OUT, weight_type=QuantType.QInt8)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes; FP32 original {SOURCE.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
