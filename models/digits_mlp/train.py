#!/usr/bin/env python3
"""Trains models/digits_mlp/1/model.onnx: a small MLP digit classifier, the FP32 original that
models/digits_mlp_int8 quantizes.

digits_classifier (a LogisticRegression) exports as ai.onnx.ml Scaler + LinearClassifier, which
onnxruntime.quantization cannot quantize (it has no MatMul); this model is a scikit-learn
MLPClassifier (two hidden ReLU layers of 256) trained on exactly the same train split
(digits_classifier/digits_data.py), so its held-out accuracy can be compared before and after
quantization. The input is scaled inside the graph (x / 16, the digits' pixel range), so the graph
is plain MatMul/Add/Relu/Softmax/ArgMax. Input `input` FP32 [batch, 64]; outputs `label` INT64
[batch, 1] and `probabilities` FP32 [batch, 10]. Deterministic: fixed seeds, same file every run.

    .venv/bin/python models/digits_mlp/train.py
"""
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from sklearn.neural_network import MLPClassifier

# The model directory is also a model repository entry: keep __pycache__ out of it.
sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "digits_classifier"))
from digits_data import load_split  # noqa: E402

OUT = Path(__file__).resolve().parent / "1" / "model.onnx"
HIDDEN = (256, 256)
SCALE = 16.0  # digits pixels are 0..16


def train():
    x_train, x_test, y_train, y_test = load_split()
    mlp = MLPClassifier(hidden_layer_sizes=HIDDEN, max_iter=300, random_state=0)
    mlp.fit(x_train / SCALE, y_train)
    accuracy = float(np.mean(mlp.predict(x_test / SCALE) == y_test))
    return mlp, accuracy


def export(mlp: MLPClassifier) -> onnx.ModelProto:
    """The MLP as an ONNX graph, written out by hand (ONNX opset 17) so the graph is exactly
    MatMul/Add/Relu per layer, then Softmax and ArgMax."""
    assert list(mlp.classes_) == list(range(10))
    inits = [numpy_helper.from_array(np.array([1.0 / SCALE], np.float32), "scale")]
    nodes = [helper.make_node("Mul", ["input", "scale"], ["h0"])]
    previous = "h0"
    layers = len(mlp.coefs_)
    for i, (w, b) in enumerate(zip(mlp.coefs_, mlp.intercepts_)):
        inits += [numpy_helper.from_array(w.astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(b.astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("MatMul", [previous, f"w{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"])]
        if i < layers - 1:
            nodes.append(helper.make_node("Relu", [f"a{i}"], [f"h{i + 1}"]))
            previous = f"h{i + 1}"
    logits = f"a{layers - 1}"
    nodes += [helper.make_node("Softmax", [logits], ["probabilities"], axis=1),
              helper.make_node("ArgMax", [logits], ["label"], axis=1, keepdims=1)]
    graph = helper.make_graph(
        nodes, "digits_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, ["batch", 1]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    model.producer_name = "onnx-gateway models/digits_mlp/train.py"
    onnx.checker.check_model(model, full_check=True)
    return model


def main() -> None:
    mlp, accuracy = train()
    model = export(mlp)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, OUT)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes); scikit-learn held-out accuracy {accuracy:.4f}")


if __name__ == "__main__":
    main()
