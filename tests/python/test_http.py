"""The HTTP/REST front door (KServe v2 + Triton's binary tensor data extension), driven by the
unmodified tritonclient.http and by raw HTTP requests, against the real binary on port 0."""
from __future__ import annotations

import gzip
import http.client
import json
import re
import signal
import time

import ml_dtypes
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from harness import MODELS, TEST_MODELS, add_sub_inputs

DTYPES = {
    "BOOL": np.bool_, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "FP16": np.float16, "BF16": ml_dtypes.bfloat16, "FP32": np.float32, "FP64": np.float64,
    "BYTES": np.object_,
}


@pytest.fixture(scope="module")
def identity_gateway():
    from harness import start_gateway

    gateway = start_gateway(TEST_MODELS)
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def add_sub_gateway():
    from harness import start_gateway

    gateway = start_gateway(MODELS)
    yield gateway
    gateway.stop()


def http_client(gateway, **kwargs) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(gateway.http_addr, **kwargs)


def sample(datatype: str, shape=(2, 3)) -> np.ndarray:
    rng = np.random.default_rng(7)
    if datatype == "BYTES":
        return np.array([f"s{i}é".encode() for i in range(int(np.prod(shape)))], dtype=np.object_).reshape(shape)
    if datatype == "BOOL":
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    dtype = DTYPES[datatype]
    if datatype in ("FP16", "BF16", "FP32", "FP64"):
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)


def raw(gateway, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """One HTTP/1.1 exchange: (status, headers, body bytes)."""
    host, port = gateway.http_addr.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def ready_status(conn: http.client.HTTPConnection) -> int:
    """GET /v2/health/ready on `conn`, keeping the connection open; the status."""
    conn.request("GET", "/v2/health/ready")
    response = conn.getresponse()
    response.read()
    return response.status


def scrape(gateway) -> str:
    host, port = gateway.admin_addr.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("GET", "/metrics")
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def assert_json_error(status: int, body: bytes, expected_status: int, needle: str) -> None:
    assert status == expected_status, body
    message = json.loads(body)["error"]
    assert needle in message, message


@pytest.mark.parametrize("datatype", sorted(DTYPES))
@pytest.mark.parametrize("binary", [True, False])
def test_every_datatype_round_trips(identity_gateway, datatype, binary):
    client = http_client(identity_gateway)
    data = sample(datatype)
    model = f"identity_{datatype.lower()}"
    inp = httpclient.InferInput("INPUT0", list(data.shape), datatype)
    out = httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary)
    if datatype in ("FP16", "BF16") and not binary:
        with pytest.raises(InferenceServerException, match="binary data"):
            inp.set_data_from_numpy(data, binary_data=False)
            client.infer(model, [inp], outputs=[out])
        return
    inp.set_data_from_numpy(data, binary_data=binary)
    result = client.infer(model, [inp], outputs=[out], request_id=f"req-{datatype}")
    assert result.get_response()["id"] == f"req-{datatype}"
    got = result.as_numpy("OUTPUT0")
    assert got.shape == data.shape
    if datatype == "BYTES":
        assert [bytes(x) if not isinstance(x, str) else x.encode() for x in got.flatten()] == list(data.flatten())
    else:
        assert np.array_equal(got.astype(data.dtype), data)


def test_output_subset_and_gzip(add_sub_gateway):
    client = http_client(add_sub_gateway)
    a, b = add_sub_inputs(batch=3, seed=1)
    inputs = [httpclient.InferInput("INPUT0", list(a.shape), "FP32"), httpclient.InferInput("INPUT1", list(b.shape), "FP32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    outputs = [httpclient.InferRequestedOutput("OUTPUT1")]
    for algorithm in (None, "gzip", "deflate"):
        result = client.infer(
            "add_sub", inputs, outputs=outputs,
            request_compression_algorithm=algorithm, response_compression_algorithm=algorithm,
        )
        assert result.as_numpy("OUTPUT0") is None
        assert np.array_equal(result.as_numpy("OUTPUT1"), a - b)


def test_16_mib_body(identity_gateway):
    client = http_client(identity_gateway, network_timeout=120.0, connection_timeout=120.0)
    data = np.arange(1024 * 4096, dtype=np.float32).reshape(1024, 4096)
    inp = httpclient.InferInput("INPUT0", list(data.shape), "FP32")
    inp.set_data_from_numpy(data)
    result = client.infer("identity_fp32", [inp])
    assert np.array_equal(result.as_numpy("OUTPUT0"), data)


def test_metadata_config_health_and_statistics_match_grpc(add_sub_gateway):
    client = http_client(add_sub_gateway)
    grpc = grpcclient.InferenceServerClient(add_sub_gateway.url)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("add_sub") and not client.is_model_ready("nope")
    meta = client.get_server_metadata()
    assert meta["name"] == "onnx-gateway" and "binary_tensor_data" in meta["extensions"]
    model_meta = client.get_model_metadata("add_sub")
    assert model_meta["inputs"][0] == {"name": "INPUT0", "datatype": "FP32", "shape": [-1, 16]}
    config = client.get_model_config("add_sub")
    assert config["max_batch_size"] == 8 and config["input"][0]["data_type"] == "TYPE_FP32"
    a, b = add_sub_inputs(batch=1, seed=3)
    for _ in range(3):
        inputs = [httpclient.InferInput("INPUT0", [1, 16], "FP32"), httpclient.InferInput("INPUT1", [1, 16], "FP32")]
        inputs[0].set_data_from_numpy(a, binary_data=False)
        inputs[1].set_data_from_numpy(b)
        client.infer("add_sub", inputs)
    over_http = client.get_inference_statistics("add_sub")["model_stats"][0]
    over_grpc = grpc.get_inference_statistics("add_sub", as_json=True)["model_stats"][0]
    assert over_http["inference_count"] >= 3
    for key in ("inference_count", "execution_count", "last_inference"):
        assert int(over_http[key]) == int(over_grpc[key]), key
    for key in ("success", "fail", "queue", "compute_infer"):
        # The gRPC client's JSON leaves out zero fields; the HTTP answer has every field.
        grpc_stat = over_grpc["inference_stats"].get(key, {})
        assert int(over_http["inference_stats"][key]["count"]) == int(grpc_stat.get("count", 0)), key
        assert int(over_http["inference_stats"][key]["ns"]) == int(grpc_stat.get("ns", 0)), key
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.get_model_metadata("nope")
    grpc.close()


def test_json_form_over_raw_http(add_sub_gateway):
    body = {
        "id": "raw-1",
        "inputs": [
            {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [[float(i) for i in range(16)]]},
            {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32", "data": [1.0] * 16},
        ],
        "outputs": [{"name": "OUTPUT0"}],
    }
    status, headers, answer = raw(add_sub_gateway, "POST", "/v2/models/add_sub/infer", json.dumps(body).encode())
    assert status == 200, answer
    assert headers["content-type"] == "application/json"
    answer = json.loads(answer)
    assert answer["id"] == "raw-1" and answer["model_name"] == "add_sub"
    assert answer["outputs"] == [{"name": "OUTPUT0", "datatype": "FP32", "shape": [1, 16], "data": [float(i + 1) for i in range(16)]}]
    # Versioned path, and gzip both ways.
    status, headers, answer = raw(
        add_sub_gateway, "POST", "/v2/models/add_sub/versions/1/infer", gzip.compress(json.dumps(body).encode()),
        {"Content-Encoding": "gzip", "Accept-Encoding": "gzip"},
    )
    assert status == 200 and headers["content-encoding"] == "gzip"
    assert json.loads(gzip.decompress(answer))["outputs"][0]["data"][0] == 1.0


GOOD_INPUT1 = {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32", "data": [0.0] * 16}


def infer_body(input0: dict, *, extra: dict | None = None) -> bytes:
    return json.dumps({"inputs": [input0, GOOD_INPUT1], **(extra or {})}).encode()


MALFORMED = [
    ("not json", b"{inputs:", {}, "malformed inference request JSON"),
    ("no inputs field", b"{}", {}, "missing field `inputs`"),
    ("count short", infer_body({"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [1.0]}), {}, "needs 16"),
    ("count long", infer_body({"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [1.0] * 17}), {}, "more elements"),
    ("2^40 elements", infer_body({"name": "INPUT0", "shape": [1, 2**40], "datatype": "FP32", "data": [1.0]}), {}, "needs 1099511627776"),
    ("2^40 binary", infer_body({"name": "INPUT0", "shape": [1, 2**40], "datatype": "FP32", "parameters": {"binary_data_size": 64}}) + b"\0" * 64, "header", "unexpected shape"),
    ("wrong dtype", infer_body({"name": "INPUT0", "shape": [1, 16], "datatype": "INT32", "data": [1] * 16}), {}, "data-type is 'INT32'"),
    ("wrong shape", infer_body({"name": "INPUT0", "shape": [1, 15], "datatype": "FP32", "data": [1.0] * 15}), {}, "unexpected shape"),
    ("string in FP32", infer_body({"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": ["x"] * 16}), {}, "not a valid FP32"),
    ("unknown dtype", infer_body({"name": "INPUT0", "shape": [1, 16], "datatype": "FP33", "data": [1.0] * 16}), {}, "unknown datatype"),
    ("no data", infer_body({"name": "INPUT0", "shape": [1, 16], "datatype": "FP32"}), {}, "has no data"),
    ("unknown input", json.dumps({"inputs": [{**GOOD_INPUT1, "name": "INPUT0"}, GOOD_INPUT1, {**GOOD_INPUT1, "name": "X"}]}).encode(), {}, "unexpected inference input 'X'"),
    ("header outside body", infer_body({"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [1.0] * 16}), {"Inference-Header-Content-Length": "100000"}, "larger than the request body"),
    ("header not a number", infer_body({"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [1.0] * 16}), {"Inference-Header-Content-Length": "x"}, "non-negative integer"),
    ("binary sizes do not add up", infer_body({"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "parameters": {"binary_data_size": 64}}) + b"\0" * 60, "header", "larger than the 60 bytes"),
    ("extra binary bytes", infer_body({"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "parameters": {"binary_data_size": 64}}) + b"\0" * 70, "header", "accounts for"),
    ("binary size mismatch", infer_body({"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "parameters": {"binary_data_size": 60}}) + b"\0" * 60, "header", "byte size mismatch"),
    ("bad gzip", b"not gzip", {"Content-Encoding": "gzip"}, "not valid gzip"),
    ("bad parameter", infer_body({"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [1.0] * 16}, extra={"parameters": {"priority": [1]}}), {}, "parameter 'priority'"),
]


@pytest.mark.parametrize("case", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_bodies_are_400_and_the_server_keeps_serving(add_sub_gateway, case):
    _, body, headers, needle = case
    if headers == "header":
        # The JSON header is everything before the binary tail.
        json_len = body.index(b"\0") if b"\0" in body else len(body)
        headers = {"Inference-Header-Content-Length": str(json_len)}
    status, _, answer = raw(add_sub_gateway, "POST", "/v2/models/add_sub/infer", body, headers)
    assert_json_error(status, answer, 400, needle)
    a, b = add_sub_inputs()
    ok = raw(add_sub_gateway, "POST", "/v2/models/add_sub/infer", json.dumps({"inputs": [
        {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": a.flatten().tolist()},
        {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32", "data": b.flatten().tolist()},
    ]}).encode())
    assert ok[0] == 200


def test_status_codes_and_routes(add_sub_gateway):
    status, _, body = raw(add_sub_gateway, "POST", "/v2/models/nope/infer", infer_body(GOOD_INPUT1))
    assert_json_error(status, body, 404, "unknown model")
    status, _, body = raw(add_sub_gateway, "GET", "/v2/nowhere")
    assert_json_error(status, body, 404, "no such endpoint")
    status, _, body = raw(add_sub_gateway, "GET", "/v2/models/add_sub/infer")
    assert_json_error(status, body, 405, "not allowed")
    status, _, body = raw(add_sub_gateway, "POST", "/v2/cudasharedmemory/region/x/register", b"{}")
    assert_json_error(status, body, 501, "CUDA shared memory")
    status, _, body = raw(add_sub_gateway, "POST", "/v2/repository/models/add_sub/load")
    assert_json_error(status, body, 503, "explicit")
    status, _, body = raw(add_sub_gateway, "GET", "/v2/health/ready")
    assert (status, body) == (200, b"")
    status, _, body = raw(add_sub_gateway, "GET", "/v2/models/nope/ready")
    assert (status, body) == (400, b"")
    status, _, body = raw(add_sub_gateway, "GET", "/v2/models/add%5Fsub")
    assert status == 200 and json.loads(body)["name"] == "add_sub"
    status, _, body = raw(add_sub_gateway, "GET", "/v2/systemsharedmemory/status")
    assert status in (200, 400, 503), body
    index = raw(add_sub_gateway, "POST", "/v2/repository/index", b'{"ready": true}')
    assert index[0] == 200 and {m["name"] for m in json.loads(index[2])} >= {"add_sub"}


def test_queue_full_is_503_with_retry_after(gateway_factory, repo_copy):
    # A queue of one behind a long batching delay: concurrent requests beyond it are refused.
    repo = repo_copy("add_sub")
    config = repo / "add_sub" / "config.pbtxt"
    config.write_text(config.read_text().replace(
        "dynamic_batching {}",
        "dynamic_batching { max_queue_delay_microseconds: 2000000 default_queue_policy { max_queue_size: 1 } }",
    ))
    gateway = gateway_factory(repo)
    client = http_client(gateway, concurrency=4)
    a, b = add_sub_inputs()
    inputs = [httpclient.InferInput("INPUT0", [1, 16], "FP32"), httpclient.InferInput("INPUT1", [1, 16], "FP32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    request = json.dumps({"inputs": [
        {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [0.0] * 16},
        {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32", "data": [0.0] * 16},
    ]}).encode()
    pending = []
    # On a loaded machine the queued request may already have run (its 2 s window passed) before the
    # probe arrives: then fill the queue again. Bounded at five attempts.
    for _ in range(5):
        pending += [client.async_infer("add_sub", inputs) for _ in range(2)]
        # Until the queue holds a request (the scrape says so), not a fixed sleep.
        deadline = time.monotonic() + 30
        while not re.search(r'nv_inference_pending_request_count\{[^}]*model="add_sub"[^}]*\} [1-9]', scrape(gateway)):
            assert time.monotonic() < deadline, scrape(gateway)
            time.sleep(0.02)
        status, headers, body = raw(gateway, "POST", "/v2/models/add_sub/infer", request)
        if status != 200:
            break
    assert_json_error(status, body, 503, "queue size")
    assert headers.get("retry-after") == "1"
    assert re.search(r'onnx_gateway_http_requests_total\{route="infer",code="503"\} [1-9]', scrape(gateway))
    for p in pending:
        try:
            p.get_result()
        except InferenceServerException:
            pass
    client.close()


def test_connections_past_the_cap_are_answered_503(gateway_factory, repo_copy):
    gateway = gateway_factory(repo_copy("add_sub"), "--http-max-connections", "2")
    host, port = gateway.http_addr.rsplit(":", 1)
    # Two keep-alive connections hold both slots (readiness was checked over gRPC, not HTTP).
    held = [http.client.HTTPConnection(host, int(port), timeout=30) for _ in range(2)]

    assert [ready_status(conn) for conn in held] == [200, 200]
    status, headers, body = raw(gateway, "GET", "/v2/health/ready")
    assert_json_error(status, body, 503, "--http-max-connections")
    assert headers.get("retry-after") == "1"
    assert headers.get("connection") == "close"
    gateway.wait_for_log(re.compile(r"HTTP connection refused: --http-max-connections reached.*limit=2"))
    # The held connections still serve, gRPC is not capped by HTTP's cap, and a slot frees
    # once a held connection closes (the server sees the close on its own time: poll, bounded).
    assert [ready_status(conn) for conn in held] == [200, 200]
    assert gateway.client().is_server_ready()
    held[0].close()
    deadline = time.monotonic() + 30
    while raw(gateway, "GET", "/v2/health/ready")[0] != 200:
        assert time.monotonic() < deadline, "no slot freed after a held connection closed"
        time.sleep(0.05)
    held[1].close()


def test_repository_load_unload_over_http(gateway_factory, repo_copy):
    gateway = gateway_factory(repo_copy("add_sub"), "--model-control-mode=explicit", "--strict-readiness=false")
    client = http_client(gateway)
    assert not client.is_model_ready("add_sub")
    client.load_model("add_sub")
    assert client.is_model_ready("add_sub")
    override = json.dumps({"name": "add_sub", "max_batch_size": 4, "backend": "onnxruntime",
                           "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [16]},
                                     {"name": "INPUT1", "data_type": "TYPE_FP32", "dims": [16]}],
                           "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [16]},
                                      {"name": "OUTPUT1", "data_type": "TYPE_FP32", "dims": [16]}]})
    client.load_model("add_sub", config=override)
    assert client.get_model_config("add_sub")["max_batch_size"] == 4
    index = client.get_model_repository_index()
    assert [m["state"] for m in index if m["name"] == "add_sub"] == ["READY"]
    client.unload_model("add_sub")
    assert not client.is_model_ready("add_sub")
    with pytest.raises(InferenceServerException, match="no such model"):
        client.load_model("missing_model")
    # Names in paths are percent-decoded, then validated as on gRPC: no way out of the repository.
    status, _, body = raw(gateway, "POST", "/v2/repository/models/..%2F..%2Fetc/load", b"")
    assert status == 400, body
    assert "error" in json.loads(body)
    # Triton's answer for a config override that is not a string: a repository poll failure (INTERNAL).
    status, _, body = raw(gateway, "POST", "/v2/repository/models/add_sub/load", b'{"parameters": {"config": 5}}')
    assert_json_error(status, body, 500, "Config parameter 'config' must have string type")


def test_bearer_token_on_http(gateway_factory, repo_copy, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    gateway = gateway_factory(repo_copy("add_sub"), "--auth-token-file", str(token), wait_ready=False)
    deadline = time.monotonic() + 60
    while raw(gateway, "GET", "/v2/health/ready")[0] != 200:
        assert time.monotonic() < deadline, gateway.stderr()
        time.sleep(0.05)
    status, headers, body = raw(gateway, "GET", "/v2/models/add_sub")
    assert_json_error(status, body, 401, "bearer token")
    assert headers.get("www-authenticate") == "Bearer"
    assert raw(gateway, "GET", "/v2/models/add_sub", headers={"Authorization": "Bearer wrong"})[0] == 401
    assert raw(gateway, "GET", "/v2/health/ready")[0] == 200
    assert raw(gateway, "GET", "/v2/health/live")[0] == 200
    client = http_client(gateway)
    headers = {"Authorization": "Bearer s3cret"}
    assert client.get_model_metadata("add_sub", headers=headers)["name"] == "add_sub"
    with pytest.raises(InferenceServerException):
        client.get_model_metadata("add_sub")


def test_drain_on_http(gateway_factory, repo_copy):
    gateway = gateway_factory(repo_copy("add_sub"), "--drain-delay-secs", "3")
    client = http_client(gateway)
    assert client.is_server_ready()
    gateway.process.send_signal(signal.SIGTERM)
    gateway.wait_for_log(re.compile("shutdown requested"))
    # Readiness is off at once, but requests are still served until the drain delay ends.
    assert raw(gateway, "GET", "/v2/health/ready")[0] == 400
    a, b = add_sub_inputs()
    inputs = [httpclient.InferInput("INPUT0", [1, 16], "FP32"), httpclient.InferInput("INPUT1", [1, 16], "FP32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    assert np.array_equal(client.infer("add_sub", inputs).as_numpy("OUTPUT0"), a + b)
    client.close()
    assert gateway.process.wait(timeout=30) == 0
    with pytest.raises(OSError):
        raw(gateway, "GET", "/v2/health/live")


def test_model_alias_answers_for_the_only_model(gateway_factory, repo_copy):
    gateway = gateway_factory(repo_copy("add_sub"), "--model-alias", "my-isvc")
    client = http_client(gateway)
    assert client.is_model_ready("my-isvc")
    assert client.get_model_metadata("my-isvc")["name"] == "add_sub"
    a, b = add_sub_inputs()
    inputs = [httpclient.InferInput("INPUT0", [1, 16], "FP32"), httpclient.InferInput("INPUT1", [1, 16], "FP32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    assert np.array_equal(client.infer("my-isvc", inputs).as_numpy("OUTPUT1"), a - b)
    grpc = grpcclient.InferenceServerClient(gateway.url)
    g_inputs = [grpcclient.InferInput("INPUT0", [1, 16], "FP32"), grpcclient.InferInput("INPUT1", [1, 16], "FP32")]
    g_inputs[0].set_data_from_numpy(a)
    g_inputs[1].set_data_from_numpy(b)
    assert np.array_equal(grpc.infer("my-isvc", g_inputs).as_numpy("OUTPUT0"), a + b)
    # The alias answers on every per-model RPC of both doors, not only inference.
    assert grpc.is_model_ready("my-isvc")
    assert grpc.get_model_metadata("my-isvc").name == "add_sub"
    stats = grpc.get_inference_statistics("my-isvc").model_stats
    assert [s.name for s in stats] == ["add_sub"] and stats[0].inference_stats.success.count == 2
    assert client.get_inference_statistics("my-isvc")["model_stats"][0]["name"] == "add_sub"
    assert not grpc.is_model_ready("not-the-alias")
    grpc.close()


def test_http_can_be_turned_off(gateway_factory, repo_copy):
    gateway = gateway_factory(repo_copy("add_sub"), "--allow-http=false")
    assert gateway.http_addr is None
    assert "HTTP listening" not in gateway.stderr().replace("admin HTTP listening", "")


def test_http_over_tls_and_mutual_tls(gateway_factory, repo_copy, tmp_path):
    import ssl

    from tls_certs import make_pki

    pki = make_pki(tmp_path / "pki")
    gateway = gateway_factory(
        repo_copy("add_sub"), "--http-use-ssl-mutual=true", "--http-server-cert", str(pki.server_cert),
        "--http-server-key", str(pki.server_key), "--http-root-cert", str(pki.ca_cert),
    )
    host, port = gateway.http_addr.rsplit(":", 1)

    def get(cert, key):
        context = ssl.create_default_context(cafile=str(pki.ca_cert))
        context.check_hostname = False
        if cert:
            context.load_cert_chain(str(cert), str(key))
        conn = http.client.HTTPSConnection(host, int(port), context=context, timeout=30)
        try:
            conn.request("GET", "/v2/health/ready")
            return conn.getresponse().status
        finally:
            conn.close()

    assert get(pki.client_cert, pki.client_key) == 200
    for cert, key in [(None, None), (pki.rogue_cert, pki.rogue_key)]:
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            get(cert, key)
    # Plain HTTP on the TLS port gets no HTTP answer.
    with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
        raw(gateway, "GET", "/v2/health/ready")


def test_tls_connections_past_the_cap_are_closed_before_the_handshake(gateway_factory, repo_copy, tmp_path):
    import ssl

    from tls_certs import make_pki

    pki = make_pki(tmp_path / "pki")
    gateway = gateway_factory(
        repo_copy("add_sub"), "--http-use-ssl=true", "--http-server-cert", str(pki.server_cert),
        "--http-server-key", str(pki.server_key), "--http-max-connections", "1",
    )
    host, port = gateway.http_addr.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    context.check_hostname = False

    held = http.client.HTTPSConnection(host, int(port), context=context, timeout=30)
    assert ready_status(held) == 200
    extra = http.client.HTTPSConnection(host, int(port), context=context, timeout=30)
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        ready_status(extra)
    extra.close()
    gateway.wait_for_log(re.compile(r"HTTP connection refused: --http-max-connections reached.*limit=1"))
    assert ready_status(held) == 200
    held.close()
    deadline = time.monotonic() + 30
    while True:
        fresh = http.client.HTTPSConnection(host, int(port), context=context, timeout=30)
        try:
            if ready_status(fresh) == 200:
                break
        except (ssl.SSLError, ConnectionError, OSError):
            pass
        finally:
            fresh.close()
        assert time.monotonic() < deadline, "no slot freed after the held connection closed"
        time.sleep(0.05)


def test_bad_http_tls_config_stops_startup(tmp_path, repo_copy):
    from harness import run_gateway_to_exit

    code, stderr = run_gateway_to_exit(repo_copy("add_sub"), "--http-use-ssl=true")
    assert code != 0 and "--http-server-cert" in stderr


def test_system_shared_memory_over_http(gateway_factory, repo_copy):
    import os

    import tritonclient.utils.shared_memory as shm

    gateway = gateway_factory(repo_copy("add_sub"), "--allow-client-shm=true")
    client = http_client(gateway)
    nbytes = 16 * 4
    in_key, out_key = f"/http_in_{os.getpid()}", f"/http_out_{os.getpid()}"
    in_handle = shm.create_shared_memory_region("http_in", in_key, 2 * nbytes)
    out_handle = shm.create_shared_memory_region("http_out", out_key, 2 * nbytes)
    try:
        a, b = add_sub_inputs()
        shm.set_shared_memory_region(in_handle, [a, b])
        client.register_system_shared_memory("in", in_key, 2 * nbytes)
        client.register_system_shared_memory("out", out_key, 2 * nbytes)
        status = client.get_system_shared_memory_status()
        assert sorted(r["name"] for r in status) == ["in", "out"]
        assert client.get_system_shared_memory_status("in")[0]["byte_size"] == 2 * nbytes
        inputs = [httpclient.InferInput("INPUT0", [1, 16], "FP32"), httpclient.InferInput("INPUT1", [1, 16], "FP32")]
        inputs[0].set_shared_memory("in", nbytes)
        inputs[1].set_shared_memory("in", nbytes, offset=nbytes)
        outputs = [httpclient.InferRequestedOutput("OUTPUT0"), httpclient.InferRequestedOutput("OUTPUT1")]
        outputs[0].set_shared_memory("out", nbytes)
        outputs[1].set_shared_memory("out", nbytes, offset=nbytes)
        client.infer("add_sub", inputs, outputs=outputs)
        assert np.array_equal(shm.get_contents_as_numpy(out_handle, np.float32, [1, 16]), a + b)
        assert np.array_equal(shm.get_contents_as_numpy(out_handle, np.float32, [1, 16], offset=nbytes), a - b)
        with pytest.raises(InferenceServerException):
            client.register_system_shared_memory("in", in_key, 2 * nbytes)
        client.unregister_system_shared_memory("in")
        assert [r["name"] for r in client.get_system_shared_memory_status()] == ["out"]
        client.unregister_system_shared_memory()
        assert client.get_system_shared_memory_status() == []
    finally:
        shm.destroy_shared_memory_region(in_handle)
        shm.destroy_shared_memory_region(out_handle)


def test_body_limit_applies_before_and_after_inflating(gateway_factory, repo_copy):
    gateway = gateway_factory(repo_copy("add_sub"), "--http-max-body-bytes", "4096")
    status, _, body = raw(gateway, "POST", "/v2/models/add_sub/infer", b" " * 5000)
    assert_json_error(status, body, 413, "")
    # 1 MiB of spaces inflates past the limit from a body of about a kilobyte.
    bomb = gzip.compress(b" " * (1 << 20))
    assert len(bomb) < 4096
    status, _, body = raw(gateway, "POST", "/v2/models/add_sub/infer", bomb, {"Content-Encoding": "gzip"})
    assert_json_error(status, body, 413, "--http-max-body-bytes")
    status, _, body = raw(gateway, "POST", "/v2/models/add_sub/infer", b"{}", {"Content-Encoding": "br"})
    assert_json_error(status, body, 415, "Content-Encoding")
    assert raw(gateway, "GET", "/v2/health/live")[0] == 200


def test_timeout_parameter_as_on_grpc(gateway_factory, repo_copy):
    # The batcher holds a lone request up to 5 s; its own 100 ms timeout ends the wait first.
    repo = repo_copy("add_sub")
    config = repo / "add_sub" / "config.pbtxt"
    config.write_text(config.read_text().replace(
        "dynamic_batching {}",
        "dynamic_batching { max_queue_delay_microseconds: 5000000 default_queue_policy { timeout_action: REJECT "
        "default_timeout_microseconds: 10000000 allow_timeout_override: true } }",
    ))
    gateway = gateway_factory(repo)
    body = infer_body({"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [1.0] * 16},
                      extra={"parameters": {"timeout": 100000, "priority": 0}})
    status, headers, answer = raw(gateway, "POST", "/v2/models/add_sub/infer", body)
    assert_json_error(status, answer, 503, "timeout")
    assert headers.get("retry-after") == "1"


def test_memory_budget_counts_http_bodies(gateway_factory, repo_copy):
    gateway = gateway_factory(repo_copy("add_sub"), "--max-inflight-bytes", "2000")
    a, b = add_sub_inputs()
    small = json.dumps({"inputs": [
        {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [0.0] * 16},
        {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32", "data": [0.0] * 16},
    ]}).encode()
    assert raw(gateway, "POST", "/v2/models/add_sub/infer", small)[0] == 200
    big = json.dumps({"inputs": [
        {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": a.flatten().tolist()},
        {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32", "data": b.flatten().tolist()},
    ], "id": "x" * 2000}).encode()
    status, headers, body = raw(gateway, "POST", "/v2/models/add_sub/infer", big)
    assert_json_error(status, body, 429, "budget")
    assert headers.get("retry-after") == "1"
    assert raw(gateway, "POST", "/v2/models/add_sub/infer", small)[0] == 200
