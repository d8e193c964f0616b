"""Startup and shutdown behaviour of the binary: a model that fails to load, --exit-on-error,
--strict-readiness, a missing ONNX Runtime library, and a clean exit on SIGTERM."""
from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from harness import MODELS, assert_add_sub_serves, run_gateway_to_exit

BROKEN = "broken_model"


@pytest.fixture
def repo_with_broken_model(repo_copy):
    """add_sub plus a model whose model.onnx is not an ONNX file."""
    repository = repo_copy("add_sub")
    broken = repository / BROKEN
    (broken / "1").mkdir(parents=True)
    (broken / "1" / "model.onnx").write_bytes(b"this is not an ONNX model\x00\x01\x02")
    (broken / "config.pbtxt").write_text(
        f"""name: "{BROKEN}"
backend: "onnxruntime"
max_batch_size: 0
input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] }} ]
"""
    )
    return repository


def test_broken_model_exits_by_default(repo_with_broken_model):
    code, stderr = run_gateway_to_exit(repo_with_broken_model)
    assert code != 0, stderr
    assert BROKEN in stderr


def test_exit_on_error_false_serves_the_rest(gateway_factory, repo_with_broken_model):
    gateway = gateway_factory(repo_with_broken_model, "--exit-on-error=false", wait_ready=False)
    gateway.wait_live()
    client = gateway.client()
    # Live comes before the models finish loading: wait until both have settled, then look.
    settled = {"add_sub": "READY", BROKEN: "UNAVAILABLE"}
    gateway.wait_until(
        lambda c: {m.name: m.state for m in c.get_model_repository_index().models} == settled,
        "both models settled",
    )
    # Strict readiness (the default): one model failed, so the server is live but not ready.
    assert client.is_server_live()
    assert not client.is_server_ready()
    assert client.is_model_ready("add_sub")
    assert not client.is_model_ready(BROKEN)
    assert_add_sub_serves(client)

    index = {m.name: m for m in client.get_model_repository_index().models}
    assert sorted(index) == ["add_sub", BROKEN]
    assert (index["add_sub"].state, index["add_sub"].version, index["add_sub"].reason) == ("READY", "1", "")
    assert index[BROKEN].state == "UNAVAILABLE"
    assert index[BROKEN].reason != ""

    infer_input = grpcclient.InferInput("INPUT0", [4], "FP32")
    infer_input.set_data_from_numpy(np.zeros(4, dtype=np.float32))
    with pytest.raises(InferenceServerException) as info:
        client.infer(BROKEN, [infer_input])
    # Triton: a model with no READY version is "not found" for inference.
    assert info.value.status() == "StatusCode.NOT_FOUND", info.value.message()
    assert BROKEN in info.value.message()


def test_strict_readiness_false_is_ready_with_a_broken_model(gateway_factory, repo_with_broken_model):
    gateway = gateway_factory(repo_with_broken_model, "--exit-on-error=false", "--strict-readiness=false")
    client = gateway.client()
    assert client.is_server_ready()
    assert not client.is_model_ready(BROKEN)
    assert_add_sub_serves(client)


def test_missing_onnxruntime_library_says_how_to_get_it(repo_copy):
    code, stderr = run_gateway_to_exit(repo_copy("add_sub"), "--onnxruntime-lib", "/nonexistent/libonnxruntime.so")
    assert code != 0, stderr
    assert "/nonexistent/libonnxruntime.so" in stderr
    assert "scripts/setup" in stderr


def test_missing_model_repository_exits(tmp_path):
    code, stderr = run_gateway_to_exit(tmp_path / "does-not-exist")
    assert code != 0, stderr
    assert "does-not-exist" in stderr


def test_sigterm_exits_cleanly(gateway_factory):
    gateway = gateway_factory(MODELS)
    assert_add_sub_serves(gateway.client())
    assert gateway.stop() == 0, gateway.stderr()
