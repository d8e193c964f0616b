"""Triton compatibility over HTTP/REST: the classification extension (an output's
`classification: N` parameter) with the unmodified tritonclient.http, and Triton's texts for bad
values, against the real binary on tests/compat_models on port 0."""
from __future__ import annotations

import http.client
import json

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from harness import REPO_ROOT, start_gateway

EXAMPLES = REPO_ROOT / "tests" / "compat_models" / "examples"
EXTRA = REPO_ROOT / "tests" / "compat_models" / "extra"


@pytest.fixture(scope="module")
def extra_gateway():
    gateway = start_gateway(EXTRA)
    yield gateway
    gateway.stop()


def http_client(gateway) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(gateway.http_addr)


def classify(gateway, model, scores, count, binary=True):
    scores = np.asarray(scores, dtype=np.float32)
    inputs = [httpclient.InferInput("INPUT0", list(scores.shape), "FP32")]
    inputs[0].set_data_from_numpy(scores)
    outputs = [httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary, class_count=count)]
    return http_client(gateway).infer(model, inputs, outputs=outputs)


def as_bytes(result, name):
    return [[x if isinstance(x, bytes) else x.encode() for x in row]
            for row in result.as_numpy(name).tolist()]


@pytest.mark.parametrize("binary", [True, False])
def test_classification_with_labels_batched(extra_gateway, binary):
    scores = [[0.1, 0.6, 0.05, 0.2, 0.05], [0.9, 0.0, 0.03, 0.02, 0.05]]
    result = classify(extra_gateway, "scores_labels", scores, 2, binary=binary)
    output = result.get_output("OUTPUT0")
    assert output["datatype"] == "BYTES"
    assert output["shape"] == [2, 2]
    assert as_bytes(result, "OUTPUT0") == [
        [b"0.600000:1:dog", b"0.200000:3:fish"],
        [b"0.900000:0:cat", b"0.050000:4:frog"],
    ]


def test_classification_without_labels_and_more_than_the_classes(extra_gateway):
    result = classify(extra_gateway, "scores_nolabels", [[3, 1, 4, 1.5, 9]], 10)
    assert result.get_output("OUTPUT0")["shape"] == [1, 5]
    assert as_bytes(result, "OUTPUT0") == [
        [b"9.000000:4", b"4.000000:2", b"3.000000:0", b"1.500000:3", b"1.000000:1"]]


def test_classification_next_to_a_raw_output_request(extra_gateway):
    """Only the output that asks is classified; the same model answers raw scores otherwise."""
    scores = np.array([[0.5, 0.1, 0.2, 0.15, 0.05]], dtype=np.float32)
    inputs = [httpclient.InferInput("INPUT0", [1, 5], "FP32")]
    inputs[0].set_data_from_numpy(scores)
    raw = http_client(extra_gateway).infer("scores_labels", inputs)
    assert raw.get_output("OUTPUT0")["datatype"] == "FP32"
    assert np.array_equal(raw.as_numpy("OUTPUT0"), scores)


def test_classification_of_a_reshaped_unbatched_output(gateway_factory):
    """densenet_onnx (Triton's image example): fc6_1 is [1000] to clients, [1,1000,1,1] in the graph."""
    gateway = gateway_factory(EXAMPLES, "--model-control-mode", "explicit", "--load-model", "densenet_onnx")
    client = http_client(gateway)
    image = np.random.RandomState(0).uniform(0, 1, size=(3, 224, 224)).astype(np.float32)
    inputs = [httpclient.InferInput("data_0", [3, 224, 224], "FP32")]
    inputs[0].set_data_from_numpy(image)
    plain = client.infer("densenet_onnx", inputs).as_numpy("fc6_1")
    result = client.infer("densenet_onnx", inputs,
                          outputs=[httpclient.InferRequestedOutput("fc6_1", class_count=3)])
    assert result.get_output("fc6_1")["shape"] == [3]
    top = np.argsort(-plain, kind="stable")[:3]
    got = [s.decode().split(":") for s in result.as_numpy("fc6_1")]
    assert [int(g[1]) for g in got] == top.tolist()
    assert [g[2] for g in got] == [f"CLASS {i:04d}" for i in top]
    assert [float(g[0]) for g in got] == pytest.approx(plain[top].tolist(), abs=1e-6)


def post_infer(gateway, model, body):
    host, port = gateway.http_addr.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("POST", f"/v2/models/{model}/infer", body=json.dumps(body),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest.mark.parametrize("value, needle", [
    (-1, "invalid value for 'classification' parameter, expected >= 0"),
    ("3", "invalid value type for 'classification' parameter, expected int64_param"),
])
def test_classification_parameter_errors(extra_gateway, value, needle):
    body = {
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 5], "data": [1, 2, 3, 4, 5]}],
        "outputs": [{"name": "OUTPUT0", "parameters": {"classification": value}}],
    }
    status, answer = post_infer(extra_gateway, "scores_labels", body)
    assert status == 400, answer
    assert needle in json.loads(answer)["error"]
    assert http_client(extra_gateway).is_server_live()


# --- CUDA shared memory on a server without it (what the system-shm examples tidy up first) ----

def test_cuda_shm_unregister_and_status_are_no_ops(extra_gateway):
    client = http_client(extra_gateway)
    client.unregister_cuda_shared_memory()
    client.unregister_cuda_shared_memory("never_registered")
    assert client.get_cuda_shared_memory_status() == []
    with pytest.raises(InferenceServerException) as missing:
        client.get_cuda_shared_memory_status("missing")
    assert missing.value.status() == "404"
    assert "Unable to find cuda shared memory region: 'missing'" in missing.value.message()


def test_cuda_shm_register_stays_unimplemented(extra_gateway):
    client = http_client(extra_gateway)
    with pytest.raises(InferenceServerException) as refused:
        client.register_cuda_shared_memory("r", b"\0" * 64, 0, 64)
    assert refused.value.status() == "501"
    assert "failed to register CUDA shared memory region: 'r'" in refused.value.message()
