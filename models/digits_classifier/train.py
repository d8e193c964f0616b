#!/usr/bin/env python3
"""Trains models/digits_classifier/1/model.onnx: a handwritten-digit classifier (8x8 images, 10 classes).

A scikit-learn pipeline (StandardScaler + multinomial LogisticRegression) trained on the bundled
digits data set, exported with skl2onnx. Input `input` FP32 [batch, 64]; outputs `label` INT64
[batch] and `probabilities` FP32 [batch, 10] (zipmap disabled, so the probabilities are a plain
tensor instead of a sequence of maps). The model directory has no config.pbtxt on purpose: the
gateway auto-completes the configuration from the ONNX signature, as Triton does.

    .venv/bin/python models/digits_classifier/train.py
"""
import sys
from pathlib import Path

import numpy as np
import onnx
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

# The model directory is also a model repository entry: keep __pycache__ out of it.
sys.dont_write_bytecode = True
from digits_data import load_split  # noqa: E402

OUT = Path(__file__).resolve().parent / "1" / "model.onnx"
# ai.onnx.ml opset 3 and ONNX opset 17 are what ONNX Runtime 1.31 runs without complaint.
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}


def train():
    x_train, x_test, y_train, y_test = load_split()
    pipeline = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
    pipeline.fit(x_train, y_train)
    accuracy = float(np.mean(pipeline.predict(x_test) == y_test))
    return pipeline, accuracy


def export(pipeline) -> onnx.ModelProto:
    model = to_onnx(
        pipeline,
        initial_types=[("input", FloatTensorType([None, 64]))],
        options={LogisticRegression: {"zipmap": False}},
        target_opset=TARGET_OPSET,
    )
    model.producer_name = "onnx-gateway models/digits_classifier/train.py"
    # skl2onnx can list the default domain twice; keep one entry per domain so strict loaders agree.
    unique = {}
    for opset in model.opset_import:
        unique[opset.domain] = max(unique.get(opset.domain, 0), opset.version)
    del model.opset_import[:]
    model.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in sorted(unique.items()))
    onnx.checker.check_model(model, full_check=True)
    return model


def main() -> None:
    pipeline, accuracy = train()
    model = export(pipeline)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, OUT)
    print(f"wrote {OUT}; scikit-learn test accuracy {accuracy:.4f}")


if __name__ == "__main__":
    main()
