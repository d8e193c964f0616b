"""The committed model repositories are consistent, checked without a gateway: every config.pbtxt parses
as Triton's ModelConfig text format and agrees with its ONNX file as ONNX Runtime sees it, and the
generated test models are what tests/models/make_models.py produces today."""
from __future__ import annotations

import subprocess
import sys

import onnxruntime as ort
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from harness import MODELS, TEST_MODELS

ORT_TO_CONFIG = {
    "tensor(bool)": model_config_pb2.TYPE_BOOL,
    "tensor(uint8)": model_config_pb2.TYPE_UINT8,
    "tensor(uint16)": model_config_pb2.TYPE_UINT16,
    "tensor(uint32)": model_config_pb2.TYPE_UINT32,
    "tensor(uint64)": model_config_pb2.TYPE_UINT64,
    "tensor(int8)": model_config_pb2.TYPE_INT8,
    "tensor(int16)": model_config_pb2.TYPE_INT16,
    "tensor(int32)": model_config_pb2.TYPE_INT32,
    "tensor(int64)": model_config_pb2.TYPE_INT64,
    "tensor(float16)": model_config_pb2.TYPE_FP16,
    "tensor(bfloat16)": model_config_pb2.TYPE_BF16,
    "tensor(float)": model_config_pb2.TYPE_FP32,
    "tensor(double)": model_config_pb2.TYPE_FP64,
    "tensor(string)": model_config_pb2.TYPE_STRING,
}


def model_dirs():
    for repository in (MODELS, TEST_MODELS):
        for directory in sorted(p for p in repository.iterdir() if p.is_dir()):
            yield pytest.param(directory, id=f"{repository.name}/{directory.name}")


def signature(tensors) -> list[tuple[str, int, list[int]]]:
    return [(t.name, ORT_TO_CONFIG[t.type], [d if isinstance(d, int) else -1 for d in t.shape]) for t in tensors]


@pytest.mark.parametrize("directory", list(model_dirs()))
def test_config_matches_onnx_signature(directory):
    if (directory / "config.pbtxt").exists() and 'platform: "ensemble"' in (directory / "config.pbtxt").read_text():
        # An ensemble has no ONNX file; its steps are checked against the composing models at load.
        assert [p.name for p in directory.iterdir() if p.is_dir()] == ["1"]
        return
    session = ort.InferenceSession(str(directory / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    # Only numeric version directories belong in a model directory (scripts and configs are files).
    assert [p.name for p in directory.iterdir() if p.is_dir()] == ["1"]
    config_path = directory / "config.pbtxt"
    if not config_path.exists():
        assert directory.name == "digits_classifier", "only digits_classifier relies on auto-completion"
        return
    config = text_format.Parse(config_path.read_text(), model_config_pb2.ModelConfig())
    assert config.name == directory.name
    assert config.backend == "onnxruntime"
    batch = [-1] if config.max_batch_size > 0 else []
    assert [(t.name, t.data_type, batch + list(t.dims)) for t in config.input] == signature(session.get_inputs())
    assert [(t.name, t.data_type, batch + list(t.dims)) for t in config.output] == signature(session.get_outputs())


def test_test_models_are_up_to_date():
    done = subprocess.run(
        [sys.executable, str(TEST_MODELS / "make_models.py"), "--check"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
