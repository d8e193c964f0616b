"""Per-model authorization and the audit log on the HTTP/REST door, against the real binary, with raw
HTTP requests and the unmodified tritonclient.http sending `Authorization: Bearer <token>`.

The same policy as test_authz.py (gRPC). Checked: a token reaches exactly its models (infer,
metadata, config, readiness, statistics, with and without a version in the path) and the index and
all-model statistics list only those; no or unknown token is 401 with `WWW-Authenticate: Bearer`; a
known token on a forbidden model and on a model that does not exist get the same 403 (the infer
route refuses before it reads the body); repository control, shared memory and log/trace settings
need an admin token; health stays exempt with --auth-exempt-health and is not without it; the audit
log has the HTTP denials under the route template, never the raw path or a token; and
`--auth-token-file` alone protects the HTTP door with one all-rights token."""
from __future__ import annotations

import http.client
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from harness import MODELS, Gateway, add_sub_inputs
from test_authz import LEGACY_TOKEN, TOKENS, audit_lines, start

DEADLINE_S = 30.0
UNKNOWN_TOKEN = "guessed-http-token-4d21"


def auth(name: str | None) -> dict[str, str]:
    return {} if name is None else {"Authorization": f"Bearer {TOKENS[name]}"}


def request(gateway: Gateway, method: str, path: str, body=None, headers=None):
    """One raw HTTP request; returns (status, headers, body bytes)."""
    host, port = gateway.http_addr.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=DEADLINE_S)
    try:
        payload = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
        connection.request(method, path, body=payload, headers=dict(headers or {}))
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def add_sub_body(batch: int = 1):
    a, b = add_sub_inputs(batch=batch)
    tensor = lambda name, x: {"name": name, "shape": list(x.shape), "datatype": "FP32", "data": x.flatten().tolist()}  # noqa: E731
    return a, b, {"inputs": [tensor("INPUT0", a), tensor("INPUT1", b)]}


DIGITS_BODY = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]}


def model_routes(model: str) -> dict[str, tuple[str, str, object]]:
    """Every per-model read route for `model`: name -> (method, path, body)."""
    routes = {}
    for base in (f"/v2/models/{model}", f"/v2/models/{model}/versions/1"):
        suffix = "" if base.endswith(model) else " (versioned)"
        routes["metadata" + suffix] = ("GET", base, None)
        routes["config" + suffix] = ("GET", f"{base}/config", None)
        routes["ready" + suffix] = ("GET", f"{base}/ready", None)
        routes["stats" + suffix] = ("GET", f"{base}/stats", None)
        routes["infer" + suffix] = ("POST", f"{base}/infer", DIGITS_BODY)
    return routes


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    gateway, _, audit_file = start(
        tmp_path_factory.mktemp("authz_http"),
        "--model-control-mode=explicit",
        "--load-model",
        "*",
        "--allow-client-shm",
        "--auth-exempt-health",
    )
    assert gateway.http_addr, "the HTTP door is not listening"
    yield gateway, audit_file
    gateway.stop()


def http_client(gateway: Gateway) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(gateway.http_addr, connection_timeout=DEADLINE_S, network_timeout=DEADLINE_S)


def add_sub_infer(client, headers):
    a, b = add_sub_inputs(batch=2)
    inputs = [httpclient.InferInput("INPUT0", list(a.shape), "FP32"), httpclient.InferInput("INPUT1", list(b.shape), "FP32")]
    inputs[0].set_data_from_numpy(a, binary_data=True)
    inputs[1].set_data_from_numpy(b, binary_data=False)
    return a, b, client.infer("add_sub", inputs, headers=headers)


def status_of(call) -> str:
    try:
        call()
        return "ok"
    except InferenceServerException as e:
        return str(e.status())


def test_a_token_reaches_its_models_over_http(served):
    gateway, _ = served
    client = http_client(gateway)
    try:
        a, b, result = add_sub_infer(client, auth("team-a"))
        assert np.array_equal(result.as_numpy("OUTPUT0"), a + b)
        assert np.array_equal(result.as_numpy("OUTPUT1"), a - b)
        assert client.get_model_metadata("add_sub", headers=auth("team-a"))["name"] == "add_sub"
        assert client.get_model_config("add_sub", headers=auth("team-a"))["max_batch_size"] == 8
        assert client.is_model_ready("add_sub", headers=auth("team-a"))
        stats = client.get_inference_statistics("add_sub", headers=auth("team-a"))
        assert [s["name"] for s in stats["model_stats"]] == ["add_sub"]
        assert client.get_server_metadata(headers=auth("digits-team"))["name"] == "onnx-gateway"
        digits = httpclient.InferInput("input", [1, 64], "FP32")
        digits.set_data_from_numpy(np.zeros((1, 64), dtype=np.float32))
        assert client.infer("digits_classifier", [digits], headers=auth("digits-team")).as_numpy("label") is not None
    finally:
        client.close()
    # The raw routes, versioned ones included, answer 200 for the permitted model.
    a, b, body = add_sub_body()
    for name, (method, path, _) in model_routes("add_sub").items():
        status, _, answer = request(gateway, method, path, body if method == "POST" else None, auth("team-a"))
        assert status == 200, (name, answer)
    status, _, answer = request(gateway, "POST", "/v2/models/add_sub/infer", body, auth("team-a"))
    outputs = {o["name"]: o["data"] for o in json.loads(answer)["outputs"]}
    assert np.allclose(outputs["OUTPUT0"], (a + b).flatten())


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": f"Bearer {UNKNOWN_TOKEN}"}, {"Authorization": TOKENS["ops"]}, {"Authorization": "Bearer "}],
    ids=["no-token", "unknown-token", "no-bearer-scheme", "empty-token"],
)
def test_no_or_unknown_token_is_401(served, headers):
    gateway, _ = served
    routes = {**model_routes("add_sub"), "server metadata": ("GET", "/v2", None)}
    routes["index"] = ("POST", "/v2/repository/index", {})
    routes["load"] = ("POST", "/v2/repository/models/add_sub/load", {})
    routes["shm status"] = ("GET", "/v2/systemsharedmemory/status", None)
    routes["all stats"] = ("GET", "/v2/models/stats", None)
    for name, (method, path, body) in routes.items():
        status, answer_headers, answer = request(gateway, method, path, body, headers)
        assert status == 401, (name, status, answer)
        assert answer_headers.get("WWW-Authenticate") == "Bearer", name
        assert json.loads(answer)["error"], name
        for secret in TOKENS.values():
            assert secret.encode() not in answer, name
    client = http_client(gateway)
    try:
        assert status_of(lambda: client.get_model_metadata("add_sub", headers=headers)) == "401"
    finally:
        client.close()


def test_forbidden_and_missing_models_get_the_same_403(served):
    gateway, _ = served
    forbidden, missing = model_routes("digits_classifier"), model_routes("no_such_model")
    for name in forbidden:
        (method, path, body), (_, missing_path, _) = forbidden[name], missing[name]
        seen_forbidden = request(gateway, method, path, body, auth("team-a"))
        seen_missing = request(gateway, method, missing_path, body, auth("team-a"))
        assert seen_forbidden[0] == seen_missing[0] == 403, (name, seen_forbidden, seen_missing)
        assert seen_forbidden[1].get("Content-Type") == seen_missing[1].get("Content-Type"), name
        text_forbidden = seen_forbidden[2].decode().replace("digits_classifier", "X")
        text_missing = seen_missing[2].decode().replace("no_such_model", "X")
        assert text_forbidden == text_missing, name
        assert "permission denied" in json.loads(seen_forbidden[2])["error"], name
    # The infer route refuses before it reads the body: a malformed body still gets the same 403.
    for model in ("digits_classifier", "no_such_model"):
        status, _, answer = request(gateway, "POST", f"/v2/models/{model}/infer", b"{not json", auth("team-a"))
        assert status == 403, answer
    # A percent-encoded name is the same model, and is refused the same way.
    status, _, answer = request(gateway, "GET", "/v2/models/digits%5Fclassifier/config", None, auth("team-a"))
    assert status == 403 and "digits_classifier" in answer.decode(), answer
    assert request(gateway, "GET", "/v2/models/add%5Fsub/config", None, auth("team-a"))[0] == 200
    # tritonclient.http sees the same status for both.
    client = http_client(gateway)
    try:
        for model in ("digits_classifier", "no_such_model"):
            assert status_of(lambda: client.get_model_config(model, headers=auth("team-a"))) == "403"
        # The admin token sees everything, and a model that really is missing is 404 for it.
        assert status_of(lambda: client.get_model_metadata("no_such_model", headers=auth("ops"))) == "404"
        assert status_of(lambda: client.get_model_metadata("digits_classifier", headers=auth("ops"))) == "ok"
    finally:
        client.close()


def test_the_index_and_all_model_statistics_list_only_permitted_models(served):
    gateway, _ = served
    client = http_client(gateway)
    try:
        names = lambda who: sorted(m["name"] for m in client.get_model_repository_index(headers=auth(who)))  # noqa: E731
        assert names("team-a") == ["add_sub"]
        assert names("digits-team") == ["digits_classifier"]
        assert names("ops") == sorted(p.name for p in MODELS.iterdir() if (p / "1").is_dir())
    finally:
        client.close()
    status, _, answer = request(gateway, "POST", "/v2/repository/index", {"ready": True}, auth("team-a"))
    assert status == 200 and [m["name"] for m in json.loads(answer)] == ["add_sub"], answer
    status, _, answer = request(gateway, "GET", "/v2/models/stats", None, auth("team-a"))
    assert status == 200 and {s["name"] for s in json.loads(answer)["model_stats"]} == {"add_sub"}, answer


ADMIN_ONLY = {
    "load": ("POST", "/v2/repository/models/digits_classifier/load", {}),
    "unload": ("POST", "/v2/repository/models/no_such_model/unload", {}),
    "shm register": ("POST", "/v2/systemsharedmemory/region/r/register", {"key": "/no-such-region", "byte_size": 64}),
    "shm status": ("GET", "/v2/systemsharedmemory/status", None),
    "shm region status": ("GET", "/v2/systemsharedmemory/region/r/status", None),
    "shm unregister": ("POST", "/v2/systemsharedmemory/unregister", None),
    "shm region unregister": ("POST", "/v2/systemsharedmemory/region/r/unregister", None),
    "cuda shm status": ("GET", "/v2/cudasharedmemory/status", None),
    "log settings": ("POST", "/v2/logging", {"log_verbose_level": 1}),
    "trace settings": ("POST", "/v2/trace/setting", {"trace_rate": "1"}),
    "model trace settings": ("GET", "/v2/models/add_sub/trace/setting", None),
}


def test_control_shared_memory_and_settings_need_admin(served):
    gateway, _ = served
    for name, (method, path, body) in ADMIN_ONLY.items():
        status, _, answer = request(gateway, method, path, body, auth("team-a"))
        assert status == 403, (name, status, answer)
        assert "permission denied" in json.loads(answer)["error"], name
        assert request(gateway, method, path, body, {})[0] == 401, name
    # Past authorization, the admin gets the route's own answer.
    ops = lambda name: request(gateway, *ADMIN_ONLY[name], auth("ops"))  # noqa: E731
    assert ops("load")[0] == 200
    assert ops("shm status")[0] == 200
    assert ops("log settings")[0] == 501
    assert ops("trace settings")[0] == 501
    assert ops("shm register")[0] not in (401, 403, 200)
    client = http_client(gateway)
    try:
        assert status_of(lambda: client.load_model("digits_classifier", headers=auth("team-a"))) == "403"
        assert status_of(lambda: client.unload_model("digits_classifier", headers=auth("digits-team"))) == "403"
        register = lambda who: client.register_system_shared_memory("r", "/no-such-region", 64, headers=auth(who))  # noqa: E731
        assert status_of(lambda: register("team-a")) == "403"
        assert status_of(lambda: register("ops")) not in ("ok", "401", "403")
        assert status_of(lambda: client.load_model("digits_classifier", headers=auth("ops"))) == "ok"
    finally:
        client.close()


def test_health_is_exempt_but_nothing_else(served):
    gateway, _ = served
    assert request(gateway, "GET", "/v2/health/live")[0] == 200
    assert request(gateway, "GET", "/v2/health/ready")[0] == 200
    # Exempt means exactly the health paths: neighbours still need a token.
    assert request(gateway, "GET", "/v2")[0] == 401
    assert request(gateway, "GET", "/v2/health/live/")[0] in (401, 404)
    assert request(gateway, "GET", "/v2/models/add_sub/ready")[0] == 401
    client = http_client(gateway)
    try:
        assert client.is_server_live() and client.is_server_ready()
    finally:
        client.close()


def test_http_denials_are_audited_under_the_route_template_without_tokens(served):
    gateway, audit_file = served
    assert request(gateway, "GET", "/v2/models/digits_classifier/config", None, auth("team-a"))[0] == 403
    assert request(gateway, "POST", "/v2/models/digits_classifier/versions/1/infer", DIGITS_BODY, auth("team-a"))[0] == 403
    unknown = {"Authorization": f"Bearer {UNKNOWN_TOKEN}"}
    assert request(gateway, "GET", "/v2/models/add_sub/stats", None, unknown)[0] == 401
    assert request(gateway, "POST", "/v2/repository/models/add_sub/unload", {}, auth("digits-team"))[0] == 403
    assert request(gateway, "POST", "/v2/repository/models/add_sub/load", {}, auth("ops"))[0] == 200

    def lines_now():
        return [l for l in audit_lines(audit_file) if str(l.get("rpc", "")).startswith("HTTP ")]

    deadline = time.monotonic() + DEADLINE_S
    while not any(l["event"] == "model_load" and l.get("token") == "ops" for l in lines_now()):
        assert time.monotonic() < deadline, audit_file.read_text()
        time.sleep(0.05)
    text = audit_file.read_text()
    for secret in [*TOKENS.values(), UNKNOWN_TOKEN]:
        assert secret not in text
    lines = lines_now()
    for line in lines:
        # Route templates only: no raw model name from a path in the rpc field.
        assert "digits_classifier" not in line["rpc"] and "add_sub" not in line["rpc"], line
        assert line["peer"].startswith("127.0.0.1:"), line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"]), line

    def one(**want):
        found = [l for l in lines if all(l.get(k) == v for k, v in want.items())]
        assert found, (want, lines)
        return found[-1]

    refused = {"event": "denied", "token": "team-a", "model": "digits_classifier", "outcome": "permission_denied"}
    one(**refused, rpc="HTTP GET /v2/models/{model}/config")
    one(**refused, rpc="HTTP POST /v2/models/{model}/versions/{version}/infer")
    unauthenticated = one(event="denied", outcome="unauthenticated", rpc="HTTP GET /v2/models/{model}/stats")
    assert "token" not in unauthenticated
    one(event="denied", token="digits-team", outcome="permission_denied", rpc="HTTP POST /v2/repository/models/{model}/unload")
    load = one(event="model_load", token="ops", model="add_sub", rpc="HTTP POST /v2/repository/models/{model}/load")
    assert load["outcome"] == "ok"


def wait_http_ready(gateway: Gateway, headers) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while request(gateway, "GET", "/v2/health/ready", None, headers)[0] != 200:
        assert gateway.process.poll() is None, gateway.stderr()
        assert time.monotonic() < deadline, gateway.stderr()
        time.sleep(0.05)


def test_auth_token_file_alone_protects_the_http_door(tmp_path: Path):
    token_file = tmp_path / "token"
    token_file.write_text(f"  {LEGACY_TOKEN}\n")
    gateway = Gateway(
        MODELS,
        ["--auth-token-file", str(token_file), "--auth-exempt-health=false", "--model-control-mode=explicit"]
        + ["--load-model", "*", "--allow-client-shm"],
    )
    try:
        gateway.wait_listening()
        legacy = {"Authorization": f"Bearer {LEGACY_TOKEN}"}
        wait_http_ready(gateway, legacy)
        # Without the exemption, health needs the token too.
        assert request(gateway, "GET", "/v2/health/live")[0] == 401
        assert request(gateway, "GET", "/v2/health/live", None, legacy)[0] == 200
        for headers in ({}, {"Authorization": f"Bearer {UNKNOWN_TOKEN}"}, auth("ops")):
            status, answer_headers, _ = request(gateway, "GET", "/v2/models/add_sub", None, headers)
            assert status == 401 and answer_headers.get("WWW-Authenticate") == "Bearer"
        # The one token has every right: any model, the whole index, control.
        client = http_client(gateway)
        try:
            a, b, result = add_sub_infer(client, legacy)
            assert np.array_equal(result.as_numpy("OUTPUT0"), a + b)
            assert client.get_model_metadata("digits_classifier", headers=legacy)["name"] == "digits_classifier"
            index = sorted(m["name"] for m in client.get_model_repository_index(headers=legacy))
            assert index == sorted(p.name for p in MODELS.iterdir() if (p / "1").is_dir())
            assert status_of(lambda: client.load_model("add_sub", headers=legacy)) == "ok"
            assert status_of(lambda: client.get_model_metadata("no_such_model", headers=legacy)) == "404"
        finally:
            client.close()
        assert request(gateway, "GET", "/v2/systemsharedmemory/status", None, legacy)[0] == 200
        assert LEGACY_TOKEN not in gateway.stderr()
    finally:
        assert gateway.stop() == 0
