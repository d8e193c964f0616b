"""Inference results, metadata and configuration of the example and test models through the gateway,
checked against ONNX Runtime run in-process on the same inputs (bit for bit) and against Triton's
semantics for metadata, configuration, repository index and streaming."""
from __future__ import annotations

import queue
import re
import subprocess
import sys

import ml_dtypes
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import model_config_pb2, service_pb2
from tritonclient.utils import InferenceServerException

from harness import MODELS, REPO_ROOT, add_sub_inputs, infer_add_sub

# digits_data.py lives in the model's directory, which the gateway scans: write no __pycache__ there.
_dont_write_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True
sys.path.insert(0, str(MODELS / "digits_classifier"))
from digits_data import load_split  # noqa: E402

sys.dont_write_bytecode = _dont_write_bytecode

EXAMPLE_MODELS = ["add_sub", "digits_classifier", "digits_mlp", "digits_mlp_int8", "digits_pipeline", "digits_preprocess", "mlp_bench", "mlp_bench_int8"]
TYPE_FP32 = model_config_pb2.TYPE_FP32


def local_session(model: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(MODELS / model / "1" / "model.onnx"), providers=["CPUExecutionProvider"])


def cargo_version() -> str:
    match = re.search(r'^version\s*=\s*"([^"]+)"', (REPO_ROOT / "Cargo.toml").read_text(), re.M)
    assert match
    return match.group(1)


# ---- example models: outputs equal in-process ONNX Runtime ------------------------------------


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_add_sub_matches_onnxruntime(client, batch):
    a, b = add_sub_inputs(batch=batch, seed=batch)
    expected0, expected1 = local_session("add_sub").run(["OUTPUT0", "OUTPUT1"], {"INPUT0": a, "INPUT1": b})
    result = infer_add_sub(client, a, b)
    out0, out1 = result.as_numpy("OUTPUT0"), result.as_numpy("OUTPUT1")
    assert out0.dtype == np.float32 and out0.shape == (batch, 16)
    assert out1.dtype == np.float32 and out1.shape == (batch, 16)
    assert np.array_equal(out0, expected0)
    assert np.array_equal(out1, expected1)


def test_digits_classifier_matches_onnxruntime(client):
    _, x_test, _, _ = load_split()
    batch = client.get_model_config("digits_classifier").config.max_batch_size
    assert batch > 0
    x = x_test[:batch]
    expected_label, expected_probabilities = local_session("digits_classifier").run(
        ["label", "probabilities"], {"input": x}
    )
    infer_input = grpcclient.InferInput("input", list(x.shape), "FP32")
    infer_input.set_data_from_numpy(x)
    result = client.infer("digits_classifier", [infer_input])
    label = result.as_numpy("label")
    probabilities = result.as_numpy("probabilities")
    assert label.dtype == np.int64
    assert np.array_equal(label.reshape(-1), expected_label)
    assert probabilities.dtype == np.float32 and probabilities.shape == (batch, 10)
    assert np.array_equal(probabilities, expected_probabilities)


def test_digits_classifier_label_shape_follows_autocompleted_reshape(client):
    """The ONNX label output is [batch]; as in Triton, the auto-completed config gives it dims [1] with
    reshape { shape: [] }, so clients receive it as [batch, 1]."""
    _, x_test, _, _ = load_split()
    x = x_test[:2]
    infer_input = grpcclient.InferInput("input", list(x.shape), "FP32")
    infer_input.set_data_from_numpy(x)
    result = client.infer("digits_classifier", [infer_input], outputs=[grpcclient.InferRequestedOutput("label")])
    output = result.get_output("label")
    assert output.datatype == "INT64"
    assert list(output.shape) == [2, 1]


@pytest.mark.parametrize("model", ["digits_mlp", "digits_mlp_int8"])
def test_digits_mlp_matches_onnxruntime_and_keeps_held_out_accuracy(client, model):
    """The FP32 MLP and its INT8 quantization serve what ONNX Runtime computes in-process, and on the
    held-out split both stay above 95 % (98.0 % and 97.8 % when made; docs/PERFORMANCE.md)."""
    _, x_test, _, y_test = load_split()
    labels = []
    for start in range(0, len(x_test), 64):
        x = x_test[start : start + 64]
        expected_label, expected_probabilities = local_session(model).run(["label", "probabilities"], {"input": x})
        infer_input = grpcclient.InferInput("input", list(x.shape), "FP32")
        infer_input.set_data_from_numpy(x)
        result = client.infer(model, [infer_input])
        assert np.array_equal(result.as_numpy("label"), expected_label)
        assert np.array_equal(result.as_numpy("probabilities"), expected_probabilities)
        labels.append(result.as_numpy("label").reshape(-1))
    assert np.mean(np.concatenate(labels) == y_test) > 0.95


def test_mlp_bench_matches_onnxruntime(client):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((8, 256)).astype(np.float32)
    (expected,) = local_session("mlp_bench").run(["output"], {"input": x})
    infer_input = grpcclient.InferInput("input", [8, 256], "FP32")
    infer_input.set_data_from_numpy(x)
    result = client.infer("mlp_bench", [infer_input])
    got = result.as_numpy("output")
    assert got.shape == (8, 10) and got.dtype == np.float32
    assert np.array_equal(got, expected), f"max abs difference {np.max(np.abs(got - expected))}"


def test_example_clients_pass(models_gateway):
    """The quickstart (models/add_sub/client.py) and the accuracy check of the trained classifier
    (models/digits_classifier/accuracy.py) work against the gateway."""
    for script in ["add_sub/client.py", "digits_classifier/accuracy.py"]:
        done = subprocess.run(
            [sys.executable, str(MODELS / script), "--url", models_gateway.url],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, f"{script} failed:\n{done.stdout}\n{done.stderr}"
        assert "PASS" in done.stdout


# ---- request/response details -----------------------------------------------------------------


def test_requested_output_subset(client):
    a, b = add_sub_inputs(batch=2, seed=3)
    result = infer_add_sub(client, a, b, outputs=[grpcclient.InferRequestedOutput("OUTPUT1")])
    response = result.get_response()
    assert [o.name for o in response.outputs] == ["OUTPUT1"]
    assert np.array_equal(result.as_numpy("OUTPUT1"), a - b)
    assert result.as_numpy("OUTPUT0") is None


def test_response_echoes_id_model_and_version(client):
    a, b = add_sub_inputs()
    response = infer_add_sub(client, a, b, request_id="req-42").get_response()
    assert response.id == "req-42"
    assert response.model_name == "add_sub"
    assert response.model_version == "1"


def test_explicit_model_version(client):
    a, b = add_sub_inputs()
    result = infer_add_sub(client, a, b, model_version="1")
    assert result.get_response().model_version == "1"
    assert np.array_equal(result.as_numpy("OUTPUT0"), a + b)


def test_typed_contents_instead_of_raw(client):
    """Inputs may come in the typed `contents` field instead of raw_input_contents (Triton accepts both);
    the answer always comes back in raw_output_contents."""
    a, b = add_sub_inputs(batch=1, seed=5)
    request = service_pb2.ModelInferRequest(model_name="add_sub")
    for name, value in (("INPUT0", a), ("INPUT1", b)):
        tensor = request.inputs.add(name=name, datatype="FP32", shape=[1, 16])
        tensor.contents.fp32_contents.extend(value.reshape(-1).tolist())
    response = client._client_stub.ModelInfer(request, timeout=10)
    outputs = {o.name: i for i, o in enumerate(response.outputs)}
    assert np.array_equal(
        np.frombuffer(response.raw_output_contents[outputs["OUTPUT0"]], np.float32).reshape(1, 16), a + b
    )
    assert np.array_equal(
        np.frombuffer(response.raw_output_contents[outputs["OUTPUT1"]], np.float32).reshape(1, 16), a - b
    )


# ---- every datatype round-trips through an Identity model -------------------------------------

NUMERIC_SAMPLES = {
    "BOOL": np.array([[True, False, True], [False, False, True]]),
    "UINT8": np.array([[0, 1, 255], [128, 7, 254]], dtype=np.uint8),
    "UINT16": np.array([[0, 1, 65535], [32768, 7, 65534]], dtype=np.uint16),
    "UINT32": np.array([[0, 1, 2**32 - 1], [2**31, 7, 2**32 - 2]], dtype=np.uint32),
    "UINT64": np.array([[0, 1, 2**64 - 1], [2**63, 7, 2**64 - 2]], dtype=np.uint64),
    "INT8": np.array([[0, -1, 127], [-128, 7, -7]], dtype=np.int8),
    "INT16": np.array([[0, -1, 32767], [-32768, 7, -7]], dtype=np.int16),
    "INT32": np.array([[0, -1, 2**31 - 1], [-(2**31), 7, -7]], dtype=np.int32),
    "INT64": np.array([[0, -1, 2**63 - 1], [-(2**63), 7, -7]], dtype=np.int64),
    "FP16": np.array([[0.0, -0.0, 65504.0], [np.inf, -np.inf, 6e-8]], dtype=np.float16),
    "BF16": np.array([[0.0, -0.0, 3.0e38], [np.inf, -np.inf, 1.5]], dtype=ml_dtypes.bfloat16),
    "FP32": np.array([[0.0, -0.0, 3.4e38], [np.inf, -np.inf, 1e-45]], dtype=np.float32),
    "FP64": np.array([[0.0, -0.0, 1.7e308], [np.inf, -np.inf, 5e-324]], dtype=np.float64),
}
# A NaN payload must survive too; compare bit patterns, not values.
for _dtype in ("FP16", "BF16", "FP32", "FP64"):
    NUMERIC_SAMPLES[_dtype][1, 1] = np.nan


def identity(client, datatype: str, data: np.ndarray):
    infer_input = grpcclient.InferInput("INPUT0", list(data.shape), datatype)
    infer_input.set_data_from_numpy(data)
    return client.infer(f"identity_{datatype.lower()}", [infer_input])


FLOAT_BITS = {
    np.dtype(np.float16): np.uint16,
    np.dtype(ml_dtypes.bfloat16): np.uint16,
    np.dtype(np.float32): np.uint32,
    np.dtype(np.float64): np.uint64,
}


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal dtype, shape and bytes: floats are compared as bit patterns so -0.0 and NaN count."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    bits = FLOAT_BITS.get(a.dtype)
    if bits is not None:
        return np.array_equal(a.view(bits), b.view(bits))
    return np.array_equal(a, b)


@pytest.mark.parametrize("datatype", sorted(NUMERIC_SAMPLES))
def test_identity_round_trip(test_client, datatype):
    data = NUMERIC_SAMPLES[datatype]
    result = identity(test_client, datatype, data)
    output = result.get_output("OUTPUT0")
    assert output.datatype == datatype
    assert list(output.shape) == [2, 3]
    got = result.as_numpy("OUTPUT0")
    assert same_bits(got, data), f"sent {data!r}, got {got!r}"


def test_identity_bytes_text(test_client):
    data = np.array([[b"", "h\u00e9llo".encode(), b"x" * 1000], [b"a", b"", b"last"]], dtype=np.object_)
    result = identity(test_client, "BYTES", data)
    output = result.get_output("OUTPUT0")
    assert output.datatype == "BYTES"
    assert list(output.shape) == [2, 3]
    assert result.as_numpy("OUTPUT0").tolist() == data.tolist()


def test_identity_bytes_binary(test_client):
    """BYTES elements are arbitrary bytes: embedded NULs and invalid UTF-8 come back unchanged."""
    data = np.array([[b"\x00", b"a\x00b", b"\xff\xfe\x00\x01", b""]], dtype=np.object_)
    result = identity(test_client, "BYTES", data)
    assert result.as_numpy("OUTPUT0").tolist() == data.tolist()


@pytest.mark.parametrize("datatype", ["FP32", "BYTES"])
def test_identity_empty_tensor(test_client, datatype):
    data = np.zeros((0, 3), dtype=np.float32 if datatype == "FP32" else np.object_)
    result = identity(test_client, datatype, data)
    output = result.get_output("OUTPUT0")
    assert list(output.shape) == [0, 3]
    assert result.as_numpy("OUTPUT0").size == 0


def test_identity_16_mib_request(test_client):
    """A 16 MiB tensor each way fits the default 64 MiB message limit."""
    data = np.random.default_rng(16).integers(0, 256, size=(4096, 4096), dtype=np.uint8)
    result = identity(test_client, "UINT8", data)
    assert np.array_equal(result.as_numpy("OUTPUT0").reshape(4096, 4096), data)


# ---- metadata, config, index, server metadata -------------------------------------------------


def test_add_sub_metadata(client):
    metadata = client.get_model_metadata("add_sub")
    assert metadata.name == "add_sub"
    assert list(metadata.versions) == ["1"]
    assert metadata.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("INPUT0", "FP32", [-1, 16]),
        ("INPUT1", "FP32", [-1, 16]),
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
        ("OUTPUT0", "FP32", [-1, 16]),
        ("OUTPUT1", "FP32", [-1, 16]),
    ]


def test_identity_metadata(test_client):
    metadata = test_client.get_model_metadata("identity_bf16")
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("INPUT0", "BF16", [-1, -1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [("OUTPUT0", "BF16", [-1, -1])]
    metadata = test_client.get_model_metadata("identity_bytes")
    assert [(t.name, t.datatype) for t in metadata.inputs] == [("INPUT0", "BYTES")]


def test_add_sub_config(client):
    config = client.get_model_config("add_sub").config
    assert config.name == "add_sub"
    assert config.backend == "onnxruntime"
    assert config.max_batch_size == 8
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [
        ("INPUT0", TYPE_FP32, [16]),
        ("INPUT1", TYPE_FP32, [16]),
    ]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [
        ("OUTPUT0", TYPE_FP32, [16]),
        ("OUTPUT1", TYPE_FP32, [16]),
    ]
    assert config.HasField("dynamic_batching")
    assert [(g.count, g.kind) for g in config.instance_group] == [(1, model_config_pb2.ModelInstanceGroup.KIND_CPU)]


def test_digits_classifier_config_is_autocompleted(client):
    """No config.pbtxt: inputs/outputs come from the ONNX signature, batching from its -1 first dim
    (Triton's ONNX Runtime backend rules)."""
    config = client.get_model_config("digits_classifier").config
    assert config.name == "digits_classifier"
    assert config.max_batch_size > 0
    assert config.HasField("dynamic_batching") == (config.max_batch_size > 1)
    inputs = {t.name: t for t in config.input}
    outputs = {t.name: t for t in config.output}
    assert list(inputs) == ["input"]
    assert inputs["input"].data_type == TYPE_FP32
    assert list(inputs["input"].dims) == [64]
    assert sorted(outputs) == ["label", "probabilities"]
    assert outputs["probabilities"].data_type == TYPE_FP32
    assert list(outputs["probabilities"].dims) == [10]
    assert outputs["label"].data_type == model_config_pb2.TYPE_INT64
    # [batch] without the batch dim is a scalar: dims [1] plus an empty reshape, as Triton writes it.
    assert list(outputs["label"].dims) == [1]
    assert outputs["label"].HasField("reshape")
    assert list(outputs["label"].reshape.shape) == []


def test_digits_classifier_metadata(client):
    metadata = client.get_model_metadata("digits_classifier")
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("input", "FP32", [-1, 64])]
    outputs = {t.name: (t.datatype, list(t.shape)) for t in metadata.outputs}
    assert outputs == {"label": ("INT64", [-1, 1]), "probabilities": ("FP32", [-1, 10])}


def test_model_ready(client):
    for model in EXAMPLE_MODELS:
        assert client.is_model_ready(model)
        assert client.is_model_ready(model, "1")
    assert not client.is_model_ready("add_sub", "2")
    assert not client.is_model_ready("no_such_model")


def test_server_live_ready_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata.name == "onnx-gateway"
    assert metadata.version == cargo_version()
    assert all(isinstance(e, str) and e for e in metadata.extensions)


def test_repository_index(client):
    index = client.get_model_repository_index()
    entries = sorted((m.name, m.version, m.state, m.reason) for m in index.models)
    assert entries == [(name, "1", "READY", "") for name in EXAMPLE_MODELS]


def test_repository_index_of_test_models(test_client):
    index = test_client.get_model_repository_index()
    names = sorted(m.name for m in index.models)
    assert names == sorted(
        f"identity_{d}"
        for d in ["bool", "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64"]
        + ["fp16", "bf16", "fp32", "fp64", "bytes"]
    )
    assert {m.state for m in index.models} == {"READY"}


# ---- streaming --------------------------------------------------------------------------------


def test_stream_with_one_bad_request(models_gateway):
    """Several requests on one stream; the bad one (wrong datatype) gets an error through the callback,
    the stream stays open and the others succeed with their own ids and results."""
    client = grpcclient.InferenceServerClient(models_gateway.url)
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        sent = {}
        for i in range(4):
            if i == 2:
                bad = grpcclient.InferInput("INPUT0", [1, 16], "INT32")
                bad.set_data_from_numpy(np.zeros((1, 16), dtype=np.int32))
                good = grpcclient.InferInput("INPUT1", [1, 16], "FP32")
                good.set_data_from_numpy(np.zeros((1, 16), dtype=np.float32))
                client.async_stream_infer("add_sub", [bad, good], request_id="bad")
                continue
            a, b = add_sub_inputs(batch=1, seed=100 + i)
            inputs = [
                grpcclient.InferInput("INPUT0", [1, 16], "FP32"),
                grpcclient.InferInput("INPUT1", [1, 16], "FP32"),
            ]
            inputs[0].set_data_from_numpy(a)
            inputs[1].set_data_from_numpy(b)
            client.async_stream_infer("add_sub", inputs, request_id=f"good-{i}")
            sent[f"good-{i}"] = (a, b)

        results, errors = {}, []
        for _ in range(4):
            result, error = answers.get(timeout=30)
            if error is not None:
                errors.append(error)
            else:
                results[result.get_response().id] = result
    finally:
        client.stop_stream()
        client.close()

    assert len(errors) == 1, [str(e) for e in errors]
    assert "INPUT0" in errors[0].message()
    assert sorted(results) == sorted(sent)
    for request_id, (a, b) in sent.items():
        assert np.array_equal(results[request_id].as_numpy("OUTPUT0"), a + b)
        assert np.array_equal(results[request_id].as_numpy("OUTPUT1"), a - b)


def test_concurrent_requests_are_answered_individually(models_gateway):
    """Requests that the dynamic batcher may merge still get exactly their own rows back."""
    client = grpcclient.InferenceServerClient(models_gateway.url)
    answers: queue.Queue = queue.Queue()
    sent = {}
    try:
        for i in range(12):
            batch = 1 + i % 3
            a, b = add_sub_inputs(batch=batch, seed=200 + i)
            inputs = [
                grpcclient.InferInput("INPUT0", [batch, 16], "FP32"),
                grpcclient.InferInput("INPUT1", [batch, 16], "FP32"),
            ]
            inputs[0].set_data_from_numpy(a)
            inputs[1].set_data_from_numpy(b)
            sent[f"c-{i}"] = (a, b)
            client.async_infer(
                "add_sub", inputs, callback=lambda result, error: answers.put((result, error)), request_id=f"c-{i}"
            )
        got = {}
        for _ in range(len(sent)):
            result, error = answers.get(timeout=30)
            assert error is None, error
            got[result.get_response().id] = result
    finally:
        client.close()
    assert sorted(got) == sorted(sent)
    for request_id, (a, b) in sent.items():
        assert np.array_equal(got[request_id].as_numpy("OUTPUT0"), a + b)
        assert np.array_equal(got[request_id].as_numpy("OUTPUT1"), a - b)


def test_statistics_count_successes(gateway_factory):
    """A fresh server counts exactly the requests it served (ModelStatistics, as Triton reports them)."""
    gateway = gateway_factory(MODELS)
    client = gateway.client()
    for seed in range(3):
        a, b = add_sub_inputs(seed=seed)
        infer_add_sub(client, a, b)
    with pytest.raises(InferenceServerException):
        infer_add_sub(client, np.zeros((1, 15), np.float32), np.zeros((1, 15), np.float32))
    stats = client.get_inference_statistics("add_sub")
    (model_stats,) = stats.model_stats
    assert model_stats.name == "add_sub"
    assert model_stats.version == "1"
    assert model_stats.inference_stats.success.count == 3
    assert model_stats.inference_count == 3
    assert 1 <= model_stats.execution_count <= 3
