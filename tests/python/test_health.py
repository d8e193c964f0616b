"""Health as load balancers and Kubernetes see it: the standard gRPC health service and the admin
HTTP endpoints (/v2/health/live, /v2/health/ready, /metrics)."""
from __future__ import annotations

import re
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness import MODELS, add_sub_inputs, infer_add_sub


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.mark.parametrize("service", ["", "inference.GRPCInferenceService"])
def test_grpc_health_serving_when_ready(models_gateway, service):
    with grpc.insecure_channel(models_gateway.url) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=10
        )
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_grpc_health_unknown_service(models_gateway):
    with grpc.insecure_channel(models_gateway.url) as channel:
        with pytest.raises(grpc.RpcError) as info:
            health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10
            )
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_http_health_live_and_ready(models_gateway):
    assert http_get(f"{models_gateway.admin_url}/v2/health/live")[0] == 200
    assert http_get(f"{models_gateway.admin_url}/v2/health/ready")[0] == 200


def test_http_ready_is_not_200_while_a_model_failed(gateway_factory, repo_copy):
    repository = repo_copy("add_sub")
    (repository / "broken_model" / "1").mkdir(parents=True)
    (repository / "broken_model" / "1" / "model.onnx").write_bytes(b"not onnx")
    gateway = gateway_factory(repository, "--exit-on-error=false", wait_ready=False)
    gateway.wait_live()
    assert http_get(f"{gateway.admin_url}/v2/health/live")[0] == 200
    assert http_get(f"{gateway.admin_url}/v2/health/ready")[0] != 200
    with grpc.insecure_channel(gateway.url) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert response.status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_metrics_count_successes(gateway_factory):
    gateway = gateway_factory(MODELS)
    client = gateway.client()
    for seed in range(2):
        a, b = add_sub_inputs(seed=seed)
        infer_add_sub(client, a, b)
    status, text = http_get(f"{gateway.admin_url}/metrics")
    assert status == 200
    # Triton's metric name and labels, so existing dashboards work.
    lines = [
        line
        for line in text.splitlines()
        if line.startswith("nv_inference_request_success{") and 'model="add_sub"' in line and 'version="1"' in line
    ]
    assert len(lines) == 1, text
    assert float(re.split(r"\s+", lines[0].strip())[-1]) == 2.0
