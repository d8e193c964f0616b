"""Triton's server flags that deployments written for tritonserver pass (KServe's stock Triton runtime,
Helm charts, docker run lines): accepted with Triton's meaning, through the real binary."""
from __future__ import annotations

import re
import shutil
import time
import urllib.error
import urllib.request

import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from harness import MODELS, add_sub_inputs, assert_add_sub_serves, run_gateway_to_exit


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_the_args_of_kserves_stock_triton_runtime_serve(gateway_factory, repo_copy):
    # The image swapped under an existing ServingRuntime, its args kept as written for tritonserver.
    repository = repo_copy("add_sub", "digits_classifier")
    gateway = gateway_factory(
        repository,
        "tritonserver",
        f"--model-store={repository}",
        "--allow-grpc=true",
        "--allow-http=true",
        "--model-control-mode=EXPLICIT",
        "--load-model=add_sub",
        "--strict-model-config=false",
        "--id=triton",
    )
    client = gateway.client()
    assert client.get_server_metadata().name == "triton"
    assert client.is_model_ready("add_sub")
    assert not client.is_model_ready("digits_classifier"), "explicit mode loads only --load-model"
    assert_add_sub_serves(client)


def test_compressed_responses_reach_tritonclient(gateway_factory, repo_copy):
    # grpcio accepts gzip by default, so every answer here comes back compressed.
    gateway = gateway_factory(repo_copy("add_sub"), "--grpc-infer-response-compression-level=high")
    assert_add_sub_serves(gateway.client())


def test_allow_grpc_false_leaves_http_only(gateway_factory, repo_copy):
    gateway = gateway_factory(repo_copy("add_sub"), "--allow-grpc=false", wait_ready=False)
    assert "gRPC listening" not in gateway.stderr()
    client = httpclient.InferenceServerClient(gateway.http_addr)
    deadline = time.monotonic() + 60
    while not ready_over_http(client):
        assert time.monotonic() < deadline, gateway.stderr()
        time.sleep(0.05)
    a, b = add_sub_inputs()
    inputs = [httpclient.InferInput(name, [1, 16], "FP32") for name in ("INPUT0", "INPUT1")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    assert (client.infer("add_sub", inputs).as_numpy("OUTPUT0") == a + b).all()


def ready_over_http(client) -> bool:
    try:
        return client.is_server_ready()
    except (ConnectionError, OSError, InferenceServerException):
        return False


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--allow-grpc=false", "--allow-http=false"], "would serve no inference"),
        (["--allow-grpc=false", "--grpc-uds", "/tmp/never.sock"], "--grpc-uds"),
        (["--backend-config=onnxruntime,enable-global-threadpool=1"], "enable-global-threadpool"),
    ],
)
def test_triton_flags_that_cannot_hold_stop_startup_naming_them(repo_copy, flags, message):
    code, stderr = run_gateway_to_exit(repo_copy("add_sub"), *flags)
    assert code != 0 and message in stderr, stderr


def test_allow_metrics_false_turns_metrics_off_but_not_health(gateway_factory, repo_copy):
    gateway = gateway_factory(repo_copy("add_sub"), "--allow-metrics=false")
    status, body = http_get(f"{gateway.admin_url}/metrics")
    assert status == 404 and "--allow-metrics=false" in body, body
    assert http_get(f"{gateway.admin_url}/v2/health/ready")[0] == 200


def test_log_severity_switches(tmp_path):
    # A run that logs all three: info lines at startup, a warning for another backend's setting,
    # and the error of a repository that is not there.
    run = lambda *flags: run_gateway_to_exit(tmp_path / "absent", "--backend-config=tensorflow,version=2", *flags)
    code, everything = run()
    assert code != 0 and " INFO " in everything and " WARN " in everything and " ERROR " in everything, everything
    code, no_info = run("--log-info=false")
    assert code != 0 and " INFO " not in no_info, no_info
    assert "--backend-config ignored" in no_info and " ERROR " in no_info, no_info
    code, errors_only = run("--log-info=false", "--log-warning=false")
    assert " INFO " not in errors_only and " WARN " not in errors_only and " ERROR " in errors_only, errors_only


def test_default_max_batch_size_reaches_auto_complete(gateway_factory, repo_copy):
    gateway = gateway_factory(repo_copy("digits_classifier"), "--backend-config=onnxruntime,default-max-batch-size=16")
    config = gateway.client().get_model_config("digits_classifier", as_json=True)["config"]
    assert config["max_batch_size"] == 16


def test_disable_auto_complete_config_needs_complete_configs(gateway_factory, repo_copy, tmp_path):
    repository = repo_copy("add_sub", "digits_classifier")
    # A config naming the backend only, which auto-complete would finish from the graph.
    partial = repository / "add_sub_partial"
    shutil.copytree(MODELS / "add_sub" / "1", partial / "1")
    (partial / "config.pbtxt").write_text('name: "add_sub_partial"\nbackend: "onnxruntime"\n')
    gateway = gateway_factory(repository, "--disable-auto-complete-config", "--exit-on-error=false", "--strict-readiness=false")
    client = gateway.client()
    assert client.is_model_ready("add_sub"), "a complete config loads as before"
    config = client.get_model_config("add_sub", as_json=True)["config"]
    assert config["max_batch_size"] == 8 and len(config["input"]) == 2
    index = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
    assert index["digits_classifier"]["state"] == "UNAVAILABLE"
    assert "auto-complete is off" in index["digits_classifier"]["reason"], index["digits_classifier"]
    assert index["add_sub_partial"]["state"] == "UNAVAILABLE"
    assert "the config does not list" in index["add_sub_partial"]["reason"], index["add_sub_partial"]
