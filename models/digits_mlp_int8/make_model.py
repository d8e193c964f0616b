#!/usr/bin/env python3
"""Makes models/digits_mlp_int8/1/model.onnx: models/digits_mlp dynamically quantized to INT8 with
onnxruntime.quantization (weights stored as INT8, activations quantized per batch at run time;
MatMul becomes MatMulInteger). Same inputs and outputs as the FP32 original. Run
models/digits_mlp/train.py first if that model changed.

    .venv/bin/python models/digits_mlp_int8/make_model.py
"""
from pathlib import Path

from onnxruntime.quantization import QuantType, quantize_dynamic

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parent / "digits_mlp" / "1" / "model.onnx"
OUT = HERE / "1" / "model.onnx"


def main() -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(SOURCE, OUT, weight_type=QuantType.QInt8)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes; FP32 original {SOURCE.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
