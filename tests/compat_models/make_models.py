#!/usr/bin/env python3
"""Builds the two test repositories for Triton compatibility, with onnx.helper only.

examples/  the eight models Triton's example clients (triton-inference-server/client,
           src/python/examples) expect, under the names, tensors and configs they expect:
           simple (INT32 add/sub), simple_int8, simple_string (numbers as strings), simple_identity
           (BYTES identity), simple_sequence (Direct sequence batcher), simple_dyna_sequence
           (Oldest, with END and a UINT64 CORRID), and two tiny image "classifiers" with label
           files, densenet_onnx and inception_onnx (a channel mean times fixed weights: right
           shapes, not real networks).
extra/     models only the project's own tests use: classifiers whose scores are their input (with
           and without labels), and sequence models that echo each control tensor, carry implicit
           state, or take string correlation ids.

    .venv/bin/python tests/compat_models/make_models.py          # writes both repositories
    .venv/bin/python tests/compat_models/make_models.py --check  # exits 1 if committed files differ

Every graph is run once in ONNX Runtime before it is written.
"""
import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
ROOT = Path(__file__).resolve().parent
I32, I8, STR, F32, U64 = TensorProto.INT32, TensorProto.INT8, TensorProto.STRING, TensorProto.FLOAT, TensorProto.UINT64


def vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def model(name, nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=list(initializers))
    m = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="onnx-gateway tests/compat_models/make_models.py",
    )
    onnx.checker.check_model(m, full_check=True)
    return m


def tensor_config(kind, name, dtype, dims, extra=""):
    return f'  {{\n    name: "{name}"\n    data_type: {dtype}\n    dims: [ {", ".join(map(str, dims))} ]\n{extra}  }}'


def io_config(inputs, outputs):
    ins = ",\n".join(tensor_config("input", *i) for i in inputs)
    outs = ",\n".join(tensor_config("output", *o) for o in outputs)
    return f"input [\n{ins}\n]\noutput [\n{outs}\n]\n"


def add_sub(name, elem, dtype):
    """OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1 over [batch, 16]."""
    shape = ["batch", 16]
    if elem == STR:
        nodes = [
            helper.make_node("Cast", ["INPUT0"], ["a"], to=I32),
            helper.make_node("Cast", ["INPUT1"], ["b"], to=I32),
            helper.make_node("Add", ["a", "b"], ["sum"]),
            helper.make_node("Sub", ["a", "b"], ["diff"]),
            helper.make_node("Cast", ["sum"], ["OUTPUT0"], to=STR),
            helper.make_node("Cast", ["diff"], ["OUTPUT1"], to=STR),
        ]
    else:
        nodes = [
            helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
            helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
        ]
    m = model(name, nodes, [vi("INPUT0", elem, shape), vi("INPUT1", elem, shape)],
              [vi("OUTPUT0", elem, shape), vi("OUTPUT1", elem, shape)])
    tensors = [("INPUT0", dtype, [16]), ("INPUT1", dtype, [16])]
    outs = [("OUTPUT0", dtype, [16]), ("OUTPUT1", dtype, [16])]
    config = f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n' + io_config(tensors, outs)
    return m, config, {}


def simple_identity():
    shape = ["batch", "n"]
    m = model("simple_identity", [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
              [vi("INPUT0", STR, shape)], [vi("OUTPUT0", STR, shape)])
    config = ('name: "simple_identity"\nbackend: "onnxruntime"\nmax_batch_size: 8\n'
              + io_config([("INPUT0", "TYPE_STRING", [-1])], [("OUTPUT0", "TYPE_STRING", [-1])]))
    return m, config, {}


def control(name, kind, dtype=None):
    if kind == "CONTROL_SEQUENCE_CORRID":
        body = f"kind: {kind}\n          data_type: {dtype}"
    else:
        body = f"kind: {kind}\n          int32_false_true: [ 0, 1 ]"
    return f'    {{\n      name: "{name}"\n      control [\n        {{\n          {body}\n        }}\n      ]\n    }}'


def sequence_config(name, controls, strategy, idle_us, tensors, outs, instances=1, mbs=8, state=""):
    body = f"  max_sequence_idle_microseconds: {idle_us}\n" if idle_us else ""
    body += strategy
    body += "  control_input [\n" + ",\n".join(controls) + "\n  ]\n" + state
    return (f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {mbs}\n'
            f"sequence_batching {{\n{body}}}\n" + io_config(tensors, outs)
            + f"instance_group [\n  {{\n    count: {instances}\n    kind: KIND_CPU\n  }}\n]\n")


def simple_sequence():
    """OUTPUT = READY * (INPUT + START): Triton's simple_sequence semantics."""
    b = ["batch", 1]
    nodes = [
        helper.make_node("Add", ["INPUT", "START"], ["sum"]),
        helper.make_node("Mul", ["READY", "sum"], ["OUTPUT"]),
    ]
    m = model("simple_sequence", nodes, [vi("INPUT", I32, b), vi("START", I32, b), vi("READY", I32, b)],
              [vi("OUTPUT", I32, b)])
    config = sequence_config(
        "simple_sequence",
        [control("START", "CONTROL_SEQUENCE_START"), control("READY", "CONTROL_SEQUENCE_READY")],
        "", 5000000, [("INPUT", "TYPE_INT32", [1])], [("OUTPUT", "TYPE_INT32", [1])])
    return m, config, {}


def simple_dyna_sequence():
    """OUTPUT = READY * (INPUT + START + END * CORRID): Triton's simple_dyna_sequence semantics."""
    b = ["batch", 1]
    nodes = [
        helper.make_node("Cast", ["CORRID"], ["corrid"], to=I32),
        helper.make_node("Add", ["INPUT", "START"], ["s0"]),
        helper.make_node("Mul", ["END", "corrid"], ["m0"]),
        helper.make_node("Add", ["s0", "m0"], ["s1"]),
        helper.make_node("Mul", ["READY", "s1"], ["OUTPUT"]),
    ]
    m = model("simple_dyna_sequence", nodes,
              [vi("INPUT", I32, b), vi("START", I32, b), vi("END", I32, b), vi("READY", I32, b),
               vi("CORRID", U64, b)], [vi("OUTPUT", I32, b)])
    oldest = "  oldest {\n    max_candidate_sequences: 1024\n    max_queue_delay_microseconds: 10000\n  }\n"
    config = sequence_config(
        "simple_dyna_sequence",
        [control("START", "CONTROL_SEQUENCE_START"), control("END", "CONTROL_SEQUENCE_END"),
         control("READY", "CONTROL_SEQUENCE_READY"),
         control("CORRID", "CONTROL_SEQUENCE_CORRID", "TYPE_UINT64")],
        oldest, 10000000, [("INPUT", "TYPE_INT32", [1])], [("OUTPUT", "TYPE_INT32", [1])], instances=2)
    return m, config, {}


def image_classifier(name, input_name, output_name, hw, classes, nhwc, labels_file):
    """Channel means times a fixed [3, classes] matrix; shapes and labels as Triton's examples."""
    weights = np.random.RandomState(7).uniform(-1, 1, size=(3, classes)).astype(np.float32)
    shape = [1, hw, hw, 3] if nhwc else [1, 3, hw, hw]
    axes = [1, 2] if nhwc else [2, 3]
    out_shape = [1, classes] if nhwc else [1, classes, 1, 1]
    nodes = [
        helper.make_node("ReduceMean", [input_name], ["means"], axes=axes, keepdims=0),
        helper.make_node("MatMul", ["means", "weights"], ["scores"]),
        helper.make_node("Reshape", ["scores", "out_shape"], [output_name]),
    ]
    inits = [numpy_helper.from_array(weights, "weights"),
             numpy_helper.from_array(np.array(out_shape, dtype=np.int64), "out_shape")]
    m = model(name, nodes, [vi(input_name, F32, shape)], [vi(output_name, F32, out_shape)], inits)
    fmt = "FORMAT_NHWC" if nhwc else "FORMAT_NCHW"
    dims = [hw, hw, 3] if nhwc else [3, hw, hw]
    reshape_in = f"    format: {fmt}\n    reshape {{ shape: [ {', '.join(map(str, shape))} ] }}\n"
    reshape_out = (f"    reshape {{ shape: [ {', '.join(map(str, out_shape))} ] }}\n"
                   f'    label_filename: "{labels_file}"\n')
    config = (f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 0\n'
              + io_config([(input_name, "TYPE_FP32", dims, reshape_in)],
                          [(output_name, "TYPE_FP32", [classes], reshape_out)]))
    labels = "".join(f"CLASS {i:04d}\n" for i in range(classes))
    return m, config, {labels_file: labels}


def score_classifier(name, labels):
    """OUTPUT0 = INPUT0 (FP32 [batch, 5]): a classifier whose scores the test chooses."""
    b = ["batch", 5]
    m = model(name, [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
              [vi("INPUT0", F32, b)], [vi("OUTPUT0", F32, b)])
    extra = '    label_filename: "labels.txt"\n' if labels else ""
    config = (f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
              + io_config([("INPUT0", "TYPE_FP32", [5])], [("OUTPUT0", "TYPE_FP32", [5], extra)]))
    files = {"labels.txt": "cat\ndog\nbird\nfish\nfrog\n"} if labels else {}
    return m, config, files


def sequence_echo(name, strategy, corrid_type, idle_us):
    """Echoes every control tensor (OUT_START, OUT_END, OUT_READY, OUT_CORRID) and INPUT."""
    b = ["batch", 1]
    corrid_elem = STR if corrid_type == "TYPE_STRING" else U64
    nodes = [helper.make_node("Identity", [n], ["OUT_" + n]) for n in ("INPUT", "START", "END", "READY", "CORRID")]
    m = model(name, nodes,
              [vi("INPUT", I32, b), vi("START", I32, b), vi("END", I32, b), vi("READY", I32, b),
               vi("CORRID", corrid_elem, b)],
              [vi("OUT_INPUT", I32, b), vi("OUT_START", I32, b), vi("OUT_END", I32, b),
               vi("OUT_READY", I32, b), vi("OUT_CORRID", corrid_elem, b)])
    outs = [("OUT_INPUT", "TYPE_INT32", [1]), ("OUT_START", "TYPE_INT32", [1]), ("OUT_END", "TYPE_INT32", [1]),
            ("OUT_READY", "TYPE_INT32", [1]), ("OUT_CORRID", corrid_type, [1])]
    config = sequence_config(
        name,
        [control("START", "CONTROL_SEQUENCE_START"), control("END", "CONTROL_SEQUENCE_END"),
         control("READY", "CONTROL_SEQUENCE_READY"), control("CORRID", "CONTROL_SEQUENCE_CORRID", corrid_type)],
        strategy, idle_us, [("INPUT", "TYPE_INT32", [1])], outs, mbs=4)
    return m, config, {}


def sequence_state():
    """Implicit state: OUTPUT = STATE_IN * (1 - START) + INPUT, carried as STATE_OUT -> STATE_IN."""
    b = ["batch", 1]
    nodes = [
        helper.make_node("Sub", ["one", "START"], ["keep"]),
        helper.make_node("Mul", ["STATE_IN", "keep"], ["kept"]),
        helper.make_node("Add", ["kept", "INPUT"], ["OUTPUT"]),
        helper.make_node("Identity", ["OUTPUT"], ["STATE_OUT"]),
    ]
    m = model("sequence_state", nodes,
              [vi("INPUT", I32, b), vi("START", I32, b), vi("STATE_IN", I32, b)],
              [vi("OUTPUT", I32, b), vi("STATE_OUT", I32, b)],
              [numpy_helper.from_array(np.array([1], dtype=np.int32), "one")])
    state = ('  state [\n    {\n      input_name: "STATE_IN"\n      output_name: "STATE_OUT"\n'
             "      data_type: TYPE_INT32\n      dims: [ 1 ]\n    }\n  ]\n")
    config = sequence_config(
        "sequence_state", [control("START", "CONTROL_SEQUENCE_START")], "", 5000000,
        [("INPUT", "TYPE_INT32", [1])], [("OUTPUT", "TYPE_INT32", [1])], mbs=4, state=state)
    return m, config, {}


def all_models():
    oldest = "  oldest {\n    max_candidate_sequences: 4\n    max_queue_delay_microseconds: 1000\n  }\n"
    direct = "  direct { }\n"
    return {
        "examples": {
            "simple": add_sub("simple", I32, "TYPE_INT32"),
            "simple_int8": add_sub("simple_int8", I8, "TYPE_INT8"),
            "simple_string": add_sub("simple_string", STR, "TYPE_STRING"),
            "simple_identity": simple_identity(),
            "simple_sequence": simple_sequence(),
            "simple_dyna_sequence": simple_dyna_sequence(),
            "densenet_onnx": image_classifier("densenet_onnx", "data_0", "fc6_1", 224, 1000, False,
                                              "densenet_labels.txt"),
            "inception_onnx": image_classifier("inception_onnx", "input:0",
                                               "InceptionV3/Predictions/Softmax:0", 299, 1001, True,
                                               "inception_labels.txt"),
        },
        "extra": {
            "scores_labels": score_classifier("scores_labels", True),
            "scores_nolabels": score_classifier("scores_nolabels", False),
            "sequence_direct": sequence_echo("sequence_direct", direct, "TYPE_UINT64", 1000000),
            "sequence_oldest": sequence_echo("sequence_oldest", oldest, "TYPE_UINT64", 1000000),
            "sequence_string": sequence_echo("sequence_string", oldest, "TYPE_STRING", 1000000),
            "sequence_state": sequence_state(),
        },
    }


def smoke_run(m: onnx.ModelProto):
    session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in i.shape]
        if i.type == "tensor(string)":
            feeds[i.name] = np.full(shape, "1", dtype=object)
        else:
            dtype = {"tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(float)": np.float32,
                     "tensor(uint64)": np.uint64}[i.type]
            feeds[i.name] = np.ones(shape, dtype=dtype)
    session.run(None, feeds)


def write(root: Path):
    for repo, models in all_models().items():
        for name, (m, config, files) in models.items():
            smoke_run(m)
            d = root / repo / name
            (d / "1").mkdir(parents=True, exist_ok=True)
            (d / "1" / "model.onnx").write_bytes(m.SerializeToString())
            (d / "config.pbtxt").write_text(config)
            for fname, text in files.items():
                (d / fname).write_text(text)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    if not args.check:
        write(ROOT)
        print(f"wrote {ROOT}/examples and {ROOT}/extra")
        return
    with tempfile.TemporaryDirectory() as tmp:
        write(Path(tmp))
        differ = [str(p.relative_to(tmp)) for p in Path(tmp).rglob("*")
                  if p.is_file() and (ROOT / p.relative_to(tmp)).read_bytes() != p.read_bytes()]
    if differ:
        print("differ:", differ)
        sys.exit(1)


if __name__ == "__main__":
    main()
