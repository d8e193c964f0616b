"""Triton compatibility: what Triton's own example clients rely on, checked with tritonclient against
the real binary on tests/compat_models/examples (the models those examples expect) and
tests/compat_models/extra. Texts and codes are Triton's."""
from __future__ import annotations

import json
import queue

import grpc

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from harness import REPO_ROOT, start_gateway

EXAMPLES = REPO_ROOT / "tests" / "compat_models" / "examples"
EXTRA = REPO_ROOT / "tests" / "compat_models" / "extra"


@pytest.fixture(scope="module")
def examples_gateway():
    gateway = start_gateway(EXAMPLES, "--model-control-mode", "explicit", "--load-model", "*")
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def extra_gateway():
    gateway = start_gateway(EXTRA)
    yield gateway
    gateway.stop()


def simple_inputs(client_module=grpcclient):
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.ones((1, 16), dtype=np.int32)
    inputs = [client_module.InferInput("INPUT0", [1, 16], "INT32"),
              client_module.InferInput("INPUT1", [1, 16], "INT32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    return a, b, inputs


def refused(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as error:
        call()
    return error.value


# --- CUDA shared memory on a server without it -------------------------------------------------

def test_cuda_shm_unregister_and_status_are_no_ops(examples_gateway):
    client = examples_gateway.client()
    client.unregister_cuda_shared_memory()
    client.unregister_cuda_shared_memory("never_registered")
    assert client.get_cuda_shared_memory_status(as_json=True) == {}
    error = refused(lambda: client.get_cuda_shared_memory_status("missing"))
    assert error.status() == "StatusCode.NOT_FOUND"
    assert "Unable to find cuda shared memory region: 'missing'" in error.message()


def test_cuda_shm_register_stays_unimplemented(examples_gateway):
    client = examples_gateway.client()
    error = refused(lambda: client.register_cuda_shared_memory("r", b"\0" * 64, 0, 64))
    assert error.status() == "StatusCode.UNIMPLEMENTED"
    assert "failed to register CUDA shared memory region: 'r'" in error.message()
    assert "not supported by this server" in error.message()


# --- error texts and codes ---------------------------------------------------------------------

def test_contents_with_raw_input_contents_names_the_input(examples_gateway):
    stub = examples_gateway.client()._client_stub
    request = service_pb2.ModelInferRequest(model_name="simple")
    for name in ("INPUT0", "INPUT1"):
        tensor = request.inputs.add(name=name, datatype="INT32", shape=[1, 16])
        if name == "INPUT0":
            tensor.contents.int_contents.extend(range(16))
        request.raw_input_contents.append(np.ones(16, dtype=np.int32).tobytes())
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(request)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details() == (
        "contents field must not be specified when using raw_input_contents for 'INPUT0' for model 'simple'")


def test_non_numeric_model_version_is_invalid_argument(examples_gateway):
    client = examples_gateway.client()
    _, _, inputs = simple_inputs()
    error = refused(lambda: client.infer("simple", inputs, model_version="wrong_specification"))
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "failed to get model version from specified version string 'wrong_specification'" in error.message()
    error = refused(lambda: client.get_model_metadata("simple", model_version="-1"))
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "invalid model version specified '-1'" in error.message()


def test_model_control_texts(examples_gateway):
    client = examples_gateway.client()
    assert len(client.get_model_repository_index().models) == 8
    error = refused(lambda: client.load_model("simple", config='"parameters": {"config": {{"max_batch_size": "16"}}}'))
    assert error.status() == "StatusCode.INTERNAL"
    assert "failed to load 'simple', failed to poll from model repository" in error.message()
    error = refused(lambda: client.load_model("wrong_model_name"))
    assert error.status() == "StatusCode.INTERNAL"
    assert error.message().startswith("failed to load 'wrong_model_name', failed to poll from model repository")
    client.load_model("simple", config='{"max_batch_size":"16"}')
    assert client.get_model_config("simple").config.max_batch_size == 16
    client.load_model("simple")
    assert client.get_model_config("simple").config.max_batch_size == 8
    assert client.is_server_ready()


@pytest.mark.parametrize("path, why", [
    ("A" * 256, "longer than 255 bytes"),
    ("../escape/model.onnx", "must stay within the model directory"),
    ("/etc/model.onnx", "must stay within the model directory"),
])
def test_file_override_paths_are_checked(examples_gateway, path, why):
    client = examples_gateway.client()
    error = refused(lambda: client.load_model("simple", config="{}", files={"file:" + path: b"a"}))
    assert error.status() == "StatusCode.INTERNAL"
    assert "failed to poll from model repository" in error.message()
    assert why in error.message()
    assert client.is_model_ready("simple")


def test_file_override_loads_from_a_temporary_model_directory(examples_gateway):
    """The ONNX file of simple_int8 sent as `file:1/model.onnx` for a new model name: it is served
    from the files sent, with the config given."""
    client = examples_gateway.client()
    config = client.get_model_config("simple_int8", as_json=True)["config"]
    config["name"] = "int8_from_files"
    onnx_bytes = (EXAMPLES / "simple_int8" / "1" / "model.onnx").read_bytes()
    error = refused(lambda: client.load_model("int8_from_files", files={"file:1/model.onnx": onnx_bytes}))
    assert "Load parameter 'config' must be specified for model file override" in error.message()
    client.load_model("int8_from_files", config=json.dumps(config), files={"file:1/model.onnx": onnx_bytes})
    assert client.is_model_ready("int8_from_files")
    a = np.full((1, 16), 5, dtype=np.int8)
    inputs = [grpcclient.InferInput("INPUT0", [1, 16], "INT8"), grpcclient.InferInput("INPUT1", [1, 16], "INT8")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(a)
    result = client.infer("int8_from_files", inputs)
    assert np.array_equal(result.as_numpy("OUTPUT0"), a + a)
    client.unload_model("int8_from_files")


def test_server_name_default_and_flag(examples_gateway, gateway_factory):
    assert examples_gateway.client().get_server_metadata().name == "onnx-gateway"
    named = gateway_factory(EXTRA, "--server-name", "triton")
    metadata = named.client().get_server_metadata()
    assert metadata.name == "triton"
    assert {"classification", "sequence"} <= set(metadata.extensions)


# --- classification ----------------------------------------------------------------------------

def classify(client, model, scores, count, stream=False):
    scores = np.asarray(scores, dtype=np.float32)
    inputs = [grpcclient.InferInput("INPUT0", list(scores.shape), "FP32")]
    inputs[0].set_data_from_numpy(scores)
    outputs = [grpcclient.InferRequestedOutput("OUTPUT0", class_count=count)]
    if not stream:
        return client.infer(model, inputs, outputs=outputs)
    results = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer(model, inputs, outputs=outputs)
        result, error = results.get(timeout=30)
    finally:
        client.stop_stream()
    assert error is None, error
    return result


@pytest.mark.parametrize("stream", [False, True])
def test_classification_with_labels_per_row(extra_gateway, stream):
    client = extra_gateway.client()
    scores = [[0.1, 0.6, 0.05, 0.2, 0.05], [0.9, 0.0, 0.03, 0.02, 0.05]]
    result = classify(client, "scores_labels", scores, 2, stream=stream)
    output = result.get_output("OUTPUT0")
    assert output.datatype == "BYTES"
    assert list(output.shape) == [2, 2]
    assert result.as_numpy("OUTPUT0").tolist() == [
        [b"0.600000:1:dog", b"0.200000:3:fish"],
        [b"0.900000:0:cat", b"0.050000:4:frog"],
    ]


def test_classification_without_labels_and_more_than_the_classes(extra_gateway):
    client = extra_gateway.client()
    result = classify(client, "scores_nolabels", [[3, 1, 4, 1.5, 9]], 10)
    assert list(result.get_output("OUTPUT0").shape) == [1, 5]
    assert result.as_numpy("OUTPUT0").tolist() == [
        [b"9.000000:4", b"4.000000:2", b"3.000000:0", b"1.500000:3", b"1.000000:1"]]


def test_classification_of_a_reshaped_unbatched_output(examples_gateway):
    """densenet_onnx (Triton's image example): fc6_1 is [1000] to clients, [1,1000,1,1] in the graph."""
    client = examples_gateway.client()
    image = np.random.RandomState(0).uniform(0, 1, size=(3, 224, 224)).astype(np.float32)
    inputs = [grpcclient.InferInput("data_0", [3, 224, 224], "FP32")]
    inputs[0].set_data_from_numpy(image)
    plain = client.infer("densenet_onnx", inputs).as_numpy("fc6_1")
    result = client.infer("densenet_onnx", inputs,
                          outputs=[grpcclient.InferRequestedOutput("fc6_1", class_count=3)])
    assert list(result.get_output("fc6_1").shape) == [3]
    top = np.argsort(-plain, kind="stable")[:3]
    got = [s.decode().split(":") for s in result.as_numpy("fc6_1")]
    assert [int(g[1]) for g in got] == top.tolist()
    assert [g[2] for g in got] == [f"CLASS {i:04d}" for i in top]
    assert [float(g[0]) for g in got] == pytest.approx(plain[top].tolist(), abs=1e-6)


def test_classification_parameter_errors(extra_gateway):
    client = extra_gateway.client()
    # tritonclient sends no parameter for class_count 0, so the raw stub sends the bad values.
    stub = client._client_stub
    request = service_pb2.ModelInferRequest(model_name="scores_labels")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 5])
    request.raw_input_contents.append(np.ones(5, dtype=np.float32).tobytes())
    output = request.outputs.add(name="OUTPUT0")
    output.parameters["classification"].int64_param = -1
    with pytest.raises(grpc.RpcError) as bad:
        stub.ModelInfer(request)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "invalid value for 'classification' parameter" in bad.value.details()
    output.parameters["classification"].string_param = "3"
    with pytest.raises(grpc.RpcError) as bad:
        stub.ModelInfer(request)
    assert "expected int64_param" in bad.value.details()
    assert client.is_server_live()
