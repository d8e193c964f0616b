"""Per-model authorization (`--auth-policy-file`) and the audit log (`--audit-log`) against the real
binary, through the unmodified tritonclient sending `authorization: Bearer <token>` headers.

Checked: a token reaches exactly its models (inference, streaming, metadata, config, readiness,
statistics) and the index lists only those; no or unknown token is UNAUTHENTICATED; a known token on a
model it may not use is PERMISSION_DENIED with the same answer whether the model exists or not;
repository control, shared memory and log/trace settings need an admin token; health stays exempt;
SIGHUP reloads the policy and a broken file keeps the last good one; `--auth-token-file` still works
beside the policy; the audit log has the denials, loads and reloads, and never a token."""
from __future__ import annotations

import hashlib
import json
import queue
import re
import signal
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from harness import MODELS, Gateway, add_sub_inputs, infer_add_sub

DEADLINE_S = 30.0
TOKENS = {
    "team-a": "team-a-secret-7f3e",
    "ops": "ops-secret-91c2",
    "digits-team": "digits-secret-5a0d",
}
LEGACY_TOKEN = "legacy-secret-0b44"


def bearer(name: str) -> dict[str, str]:
    return {"authorization": f"Bearer {TOKENS[name]}"}


def policy(rules: list[tuple[str, list[str], bool]]) -> str:
    tokens = [
        {"name": name, "sha256": hashlib.sha256(TOKENS[name].encode()).hexdigest(), "models": models, "admin": admin}
        for name, models, admin in rules
    ]
    return json.dumps({"tokens": tokens})


DEFAULT_POLICY = [("team-a", ["add_sub"], False), ("ops", ["*"], True), ("digits-team", ["digits_classifier"], False)]


def start(tmp_path: Path, *extra: str) -> tuple[Gateway, Path, Path]:
    policy_file, audit_file = tmp_path / "policy.json", tmp_path / "audit.jsonl"
    if not policy_file.exists():
        policy_file.write_text(policy(DEFAULT_POLICY))
    args = ["--auth-policy-file", str(policy_file), "--audit-log", str(audit_file), *extra]
    gateway = Gateway(MODELS, args)
    try:
        gateway.wait_listening()
        client = grpcclient.InferenceServerClient(gateway.url)
        deadline = time.monotonic() + DEADLINE_S
        while not ready(client):
            assert gateway.process.poll() is None, gateway.stderr()
            assert time.monotonic() < deadline, gateway.stderr()
            time.sleep(0.05)
        client.close()
    except BaseException:
        gateway.process.kill()
        raise
    return gateway, policy_file, audit_file


def ready(client) -> bool:
    try:
        return client.is_server_ready(headers=bearer("ops"))
    except InferenceServerException:
        return False


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    gateway, _, audit_file = start(
        tmp_path_factory.mktemp("authz"), "--model-control-mode=explicit", "--load-model", "*", "--allow-client-shm"
    )
    yield gateway, audit_file
    gateway.stop()


def status_of(call) -> str:
    try:
        call()
        return "ok"
    except InferenceServerException as e:
        return e.status()


def refusal(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as refused:
        call()
    return refused.value


def digits_inputs():
    x = grpcclient.InferInput("input", [1, 64], "FP32")
    x.set_data_from_numpy(np.zeros((1, 64), dtype=np.float32))
    return [x]


def model_calls(client, model: str, headers):
    """Every per-model read RPC for `model`, each as a thunk."""
    return {
        "metadata": lambda: client.get_model_metadata(model, headers=headers),
        "config": lambda: client.get_model_config(model, headers=headers),
        "ready": lambda: client.is_model_ready(model, headers=headers),
        "statistics": lambda: client.get_inference_statistics(model, headers=headers),
        "infer": lambda: client.infer(model, digits_inputs(), headers=headers),
    }


def test_a_token_reaches_its_models(served):
    gateway, _ = served
    client = gateway.client()
    a, b = add_sub_inputs(batch=2)
    result = infer_add_sub(client, a, b, headers=bearer("team-a"))
    assert np.array_equal(result.as_numpy("OUTPUT0"), a + b)
    assert client.get_model_metadata("add_sub", headers=bearer("team-a")).name == "add_sub"
    assert client.get_model_config("add_sub", headers=bearer("team-a")).config.max_batch_size == 8
    assert client.is_model_ready("add_sub", headers=bearer("team-a"))
    stats = client.get_inference_statistics("add_sub", headers=bearer("team-a"))
    assert [s.name for s in stats.model_stats] == ["add_sub"]
    # Server-wide reads need only a known token.
    assert client.is_server_live(headers=bearer("team-a"))
    assert client.get_server_metadata(headers=bearer("digits-team")).name == "onnx-gateway"
    assert client.infer("digits_classifier", digits_inputs(), headers=bearer("digits-team"))


def test_no_or_unknown_token_is_unauthenticated(served):
    gateway, _ = served
    client = gateway.client()
    for headers in (None, {"authorization": "Bearer not-a-known-token"}, {"authorization": TOKENS["ops"]}):
        for name, call in model_calls(client, "add_sub", headers).items():
            assert status_of(call) == "StatusCode.UNAUTHENTICATED", name
        assert status_of(lambda: client.is_server_live(headers=headers)) == "StatusCode.UNAUTHENTICATED"
        assert status_of(lambda: client.get_model_repository_index(headers=headers)) == "StatusCode.UNAUTHENTICATED"


def test_forbidden_and_unknown_models_get_the_same_answer(served):
    gateway, _ = served
    client = gateway.client()
    forbidden = model_calls(client, "digits_classifier", bearer("team-a"))
    missing = model_calls(client, "no_such_model", bearer("team-a"))
    for name in forbidden:
        seen_forbidden, seen_missing = refusal(forbidden[name]), refusal(missing[name])
        assert seen_forbidden.status() == seen_missing.status() == "StatusCode.PERMISSION_DENIED", name
        assert seen_forbidden.message().replace("digits_classifier", "X") == seen_missing.message().replace(
            "no_such_model", "X"
        ), name
    # The statistics of every model list only those the token may see.
    stats = client.get_inference_statistics(headers=bearer("team-a"))
    assert {s.name for s in stats.model_stats} == {"add_sub"}
    # The admin token sees everything, and a model that is really missing is NOT_FOUND for it.
    assert status_of(lambda: client.get_model_metadata("no_such_model", headers=bearer("ops"))) == "StatusCode.NOT_FOUND"


def test_the_index_lists_only_permitted_models(served):
    gateway, _ = served
    client = gateway.client()
    names = lambda who: sorted(m["name"] for m in client.get_model_repository_index(headers=bearer(who), as_json=True)["models"])  # noqa: E731
    assert names("team-a") == ["add_sub"]
    assert names("digits-team") == ["digits_classifier"]
    assert names("ops") == sorted(p.name for p in MODELS.iterdir() if (p / "1").is_dir())


def test_control_shared_memory_and_settings_need_admin(served):
    gateway, _ = served
    client = gateway.client()
    admin_only = {
        "load": lambda h: client.load_model("digits_classifier", headers=h),
        "unload": lambda h: client.unload_model("no_such_model", headers=h),
        "shm_register": lambda h: client.register_system_shared_memory("r", "/no-such-region", 64, headers=h),
        "shm_status": lambda h: client.get_system_shared_memory_status(headers=h),
        "shm_unregister": lambda h: client.unregister_system_shared_memory("r", headers=h),
        "log_settings": lambda h: client.update_log_settings({"log_verbose_level": 1}, headers=h),
        "trace_settings": lambda h: client.update_trace_settings(settings={"trace_rate": "1"}, headers=h),
    }
    for name, call in admin_only.items():
        assert status_of(lambda: call(bearer("team-a"))) == "StatusCode.PERMISSION_DENIED", name
        assert status_of(lambda: call(None)) == "StatusCode.UNAUTHENTICATED", name
    assert status_of(lambda: admin_only["load"](bearer("ops"))) == "ok"
    assert status_of(lambda: admin_only["shm_status"](bearer("ops"))) == "ok"
    # Past authorization, the admin gets the RPC's own answer.
    assert status_of(lambda: admin_only["log_settings"](bearer("ops"))) == "StatusCode.UNIMPLEMENTED"
    assert status_of(lambda: admin_only["shm_register"](bearer("ops"))) != "StatusCode.PERMISSION_DENIED"


def test_streaming_is_checked_per_message(served):
    gateway, _ = served
    client = grpcclient.InferenceServerClient(gateway.url)
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)), headers=bearer("team-a"))
    try:
        a, b = add_sub_inputs()
        inputs = [grpcclient.InferInput("INPUT0", [1, 16], "FP32"), grpcclient.InferInput("INPUT1", [1, 16], "FP32")]
        inputs[0].set_data_from_numpy(a)
        inputs[1].set_data_from_numpy(b)
        client.async_stream_infer("digits_classifier", digits_inputs(), request_id="denied")
        client.async_stream_infer("add_sub", inputs, request_id="allowed")
        outcomes = {}
        for _ in range(2):
            result, error = answers.get(timeout=DEADLINE_S)
            if error is None:
                outcomes[result.get_response().id] = result
            else:
                outcomes["error"] = str(error)
        assert np.array_equal(outcomes["allowed"].as_numpy("OUTPUT0"), a + b)
        assert "permission denied" in outcomes["error"] and "digits_classifier" in outcomes["error"]
    finally:
        client.stop_stream()
        client.close()


def test_health_stays_exempt(served):
    gateway, _ = served
    with grpc.insecure_channel(gateway.url) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def audit_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_audit_lines_record_denials_and_loads_without_tokens(served):
    gateway, audit_file = served
    client = gateway.client()
    status_of(lambda: client.get_model_metadata("digits_classifier", headers=bearer("team-a")))
    status_of(lambda: client.get_model_metadata("add_sub", headers={"authorization": "Bearer guessed-token-123"}))
    client.load_model("add_sub", headers=bearer("ops"))
    status_of(lambda: client.register_system_shared_memory("audited", "/no-such-region", 64, headers=bearer("ops")))
    text = audit_file.read_text()
    for secret in [*TOKENS.values(), "guessed-token-123"]:
        assert secret not in text
    lines = audit_lines(audit_file)
    for line in lines:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"]), line
    denied = [l for l in lines if l["event"] == "denied" and l.get("token") == "team-a" and l.get("model") == "digits_classifier"]
    assert denied, lines
    assert denied[-1]["outcome"] == "permission_denied"
    assert denied[-1]["rpc"] == "/inference.GRPCInferenceService/ModelMetadata"
    assert denied[-1]["peer"].startswith("127.0.0.1:")
    assert any(l["event"] == "denied" and l["outcome"] == "unauthenticated" and "token" not in l for l in lines)
    startup = [l for l in lines if l["event"] == "model_load" and l["rpc"] == "startup"]
    assert {l["model"] for l in startup} >= {"add_sub", "digits_classifier"}
    rpc_loads = [l for l in lines if l["event"] == "model_load" and l.get("token") == "ops" and l["model"] == "add_sub"]
    assert rpc_loads and rpc_loads[-1]["outcome"] == "ok"
    assert rpc_loads[-1]["rpc"] == "/inference.GRPCInferenceService/RepositoryModelLoad"
    shm = [l for l in lines if l["event"] == "shm_register" and l.get("region") == "audited"]
    assert shm and shm[-1]["token"] == "ops" and shm[-1]["outcome"] == "failed" and shm[-1]["reason"], lines


def test_a_flood_of_denials_keeps_the_audit_log_within_its_bound(tmp_path):
    bound = 4096
    gateway, _, audit_file = start(tmp_path, "--audit-log-max-bytes", str(bound))
    try:
        client = gateway.client()
        for i in range(200):
            assert status_of(lambda: client.is_model_ready("add_sub", headers={"authorization": f"Bearer flood-{i}"})) \
                == "StatusCode.UNAUTHENTICATED"
        previous = audit_file.with_name(audit_file.name + ".1")
        for path in (audit_file, previous):
            assert path.stat().st_size <= bound, path
        # Whole JSON lines in both files, the newest denial in the current one, no token anywhere.
        lines = audit_lines(previous) + audit_lines(audit_file)
        assert lines[-1]["event"] == "denied" and lines[-1]["outcome"] == "unauthenticated"
        assert not any("flood-" in json.dumps(line) for line in lines)
        assert client.is_server_live(headers=bearer("ops")), "still serving"
    finally:
        gateway.stop()


def wait_for(predicate, what: str):
    deadline = time.monotonic() + DEADLINE_S
    while not predicate():
        assert time.monotonic() < deadline, f"not {what} after {DEADLINE_S}s"
        time.sleep(0.05)


def test_sighup_reloads_and_a_broken_policy_keeps_the_last_good_one(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(LEGACY_TOKEN + "\n")
    gateway, policy_file, audit_file = start(tmp_path, "--auth-token-file", str(token_file))
    try:
        client = gateway.client()
        legacy = {"authorization": f"Bearer {LEGACY_TOKEN}"}
        digits = lambda who: status_of(lambda: client.get_model_metadata("digits_classifier", headers=bearer(who)))  # noqa: E731
        assert digits("team-a") == "StatusCode.PERMISSION_DENIED"
        assert status_of(lambda: client.get_model_metadata("digits_classifier", headers=legacy)) == "ok"

        policy_file.write_text(policy([("team-a", ["add_sub", "digits_classifier"], False)]))
        gateway.process.send_signal(signal.SIGHUP)
        wait_for(lambda: digits("team-a") == "ok", "reloaded")
        assert digits("ops") == "StatusCode.UNAUTHENTICATED", "ops was removed from the policy"

        policy_file.write_text('{"tokens": [{"name": "team-a", "sha256": "not-a-hash"}]}')
        gateway.process.send_signal(signal.SIGHUP)
        gateway.wait_for_log(re.compile(r"keeping the last good one"), timeout=DEADLINE_S)
        assert digits("team-a") == "ok"
        # The --auth-token-file token keeps every right across reloads.
        assert status_of(lambda: client.get_model_metadata("add_sub", headers=legacy)) == "ok"
        assert status_of(lambda: client.unload_model("digits_classifier", headers=legacy)) != "StatusCode.PERMISSION_DENIED"
        reloads = [l for l in audit_lines(audit_file) if l["event"] == "policy_reload"]
        assert [l["outcome"] for l in reloads] == ["ok", "failed"]
        assert "sha256 must be 64 hex characters" in reloads[1]["reason"]
        assert LEGACY_TOKEN not in audit_file.read_text() and LEGACY_TOKEN not in gateway.stderr()
    finally:
        assert gateway.stop() == 0


@pytest.mark.parametrize(
    "content, message",
    [("{ broken", "--auth-policy-file"), ('{"tokens": [{"name": "a", "sha256": "x", "models": []}]}', "sha256 must be")],
)
def test_a_bad_policy_file_stops_startup(tmp_path, content, message):
    from harness import run_gateway_to_exit

    policy_file = tmp_path / "policy.json"
    policy_file.write_text(content)
    code, stderr = run_gateway_to_exit(MODELS, "--auth-policy-file", str(policy_file))
    assert code != 0 and message in stderr, stderr


def test_a_reload_applies_to_streams_already_open(tmp_path):
    gateway, policy_file, _ = start(tmp_path)
    client = grpcclient.InferenceServerClient(gateway.url)
    answers: queue.Queue = queue.Queue()
    try:
        client.start_stream(callback=lambda result, error: answers.put((result, error)), headers=bearer("team-a"))
        a, b = add_sub_inputs()
        inputs = [grpcclient.InferInput("INPUT0", [1, 16], "FP32"), grpcclient.InferInput("INPUT1", [1, 16], "FP32")]
        inputs[0].set_data_from_numpy(a)
        inputs[1].set_data_from_numpy(b)
        client.async_stream_infer("add_sub", inputs, request_id="before")
        result, error = answers.get(timeout=DEADLINE_S)
        assert error is None and np.array_equal(result.as_numpy("OUTPUT0"), a + b)

        policy_file.write_text(policy([("team-a", [], False), ("ops", ["*"], True)]))
        gateway.process.send_signal(signal.SIGHUP)
        gateway.wait_for_log(re.compile(r"authorization policy reloaded"), timeout=DEADLINE_S)
        client.async_stream_infer("add_sub", inputs, request_id="after")
        result, error = answers.get(timeout=DEADLINE_S)
        assert error is not None and "permission denied" in str(error) and "add_sub" in str(error)
    finally:
        client.stop_stream()
        client.close()
        assert gateway.stop() == 0
