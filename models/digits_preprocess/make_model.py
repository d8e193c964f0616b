#!/usr/bin/env python3
"""Makes models/digits_preprocess/1/model.onnx: the feature step of the digits_pipeline ensemble.

Applications hold 8-bit grayscale images (pixel values 0..255); digits_classifier was trained on
scikit-learn's digits scale (0..16). This step is a scikit-learn MinMaxScaler fitted to map
[0, 255] onto [0, 16] per pixel, exported with skl2onnx (one ai.onnx.ml Scaler node). Input
`pixels` FP32 [batch, 64]; output `features` FP32 [batch, 64].

    .venv/bin/python models/digits_preprocess/make_model.py
"""
from pathlib import Path

import numpy as np
import onnx
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn.preprocessing import MinMaxScaler

OUT = Path(__file__).resolve().parent / "1" / "model.onnx"
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}


def main() -> None:
    scaler = MinMaxScaler(feature_range=(0.0, 16.0))
    scaler.fit(np.array([[0.0] * 64, [255.0] * 64], dtype=np.float32))
    model = to_onnx(
        scaler,
        initial_types=[("pixels", FloatTensorType([None, 64]))],
        final_types=[("features", FloatTensorType([None, 64]))],
        target_opset=TARGET_OPSET,
    )
    model.producer_name = "onnx-gateway models/digits_preprocess/make_model.py"
    unique = {}
    for opset in model.opset_import:
        unique[opset.domain] = max(unique.get(opset.domain, 0), opset.version)
    del model.opset_import[:]
    model.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in sorted(unique.items()))
    onnx.checker.check_model(model, full_check=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
