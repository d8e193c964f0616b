"""Production lifecycle against the real binary: drain on SIGTERM under load, model control (poll and
explicit), the Unix socket listener, load shedding and HTTP/2 settings.

Every wait polls with a deadline; sleeps only pace client loops (and let keepalive pings happen).
Servers bind 127.0.0.1 port 0 or a Unix socket in a temporary directory."""
from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.service_pb2 as service_pb2
import tritonclient.grpc.service_pb2_grpc as service_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from harness import (
    MODELS,
    Gateway,
    add_sub_inputs,
    assert_add_sub_serves,
    infer_add_sub,
    run_gateway_to_exit,
)

DEADLINE_S = 30.0


def wait_for(predicate, what: str, timeout: float = DEADLINE_S, gateway: Gateway | None = None):
    """Polls `predicate` until it is truthy; on timeout fails with `gateway`'s log, when given,
    so that a failure on CI says what the server was doing."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            log = f"; gateway stderr:\n{gateway.stderr()}" if gateway is not None else ""
            pytest.fail(f"not {what} after {timeout}s{log}")
        time.sleep(0.02)


def http_ready(gateway: Gateway) -> int | None:
    """Status of GET /v2/health/ready, or None when the admin server no longer answers."""
    try:
        with urllib.request.urlopen(gateway.admin_url + "/v2/health/ready", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, ConnectionError):
        return None


def grpc_health(channel: grpc.Channel) -> int | None:
    try:
        request = health_pb2.HealthCheckRequest(service="")
        return health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status
    except grpc.RpcError:
        return None


def pending_requests(gateway: Gateway, model: str) -> int:
    with urllib.request.urlopen(gateway.admin_url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(
        int(float(line.rsplit(" ", 1)[1]))
        for line in text.splitlines()
        if line.startswith("nv_inference_pending_request_count{") and f'model="{model}"' in line
    )


def set_dynamic_batching(repository: Path, model: str, text: str) -> None:
    config = repository / model / "config.pbtxt"
    config.write_text(config.read_text().replace("dynamic_batching {}", text))


class Load:
    """Client threads that send add_sub requests until stopped, each on its own connection, recording
    (send time, outcome, model_version). Outcome is 'ok', 'WRONG' or the gRPC status name."""

    def __init__(self, url: str, threads: int = 4):
        self.url = url
        self.stop = threading.Event()
        self.results: list[tuple[float, str, str]] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self, seed: int) -> None:
        client = grpcclient.InferenceServerClient(self.url)
        a, b = add_sub_inputs(batch=1, seed=seed)
        while not self.stop.is_set():
            sent = time.monotonic()
            try:
                result = infer_add_sub(client, a, b, client_timeout=DEADLINE_S)
                correct = np.array_equal(result.as_numpy("OUTPUT0"), a + b) and np.array_equal(
                    result.as_numpy("OUTPUT1"), a - b
                )
                outcome = ("ok" if correct else "WRONG", result.get_response().model_version)
            except InferenceServerException as e:
                outcome = (e.status(), "")
                time.sleep(0.01)
            with self._lock:
                self.results.append((sent, *outcome))
        client.close()

    def wait_for_results(self, n: int) -> None:
        wait_for(lambda: len(self.snapshot()) >= n, f"{n} requests answered")

    def snapshot(self) -> list[tuple[float, str, str]]:
        with self._lock:
            return list(self.results)

    def finish(self) -> list[tuple[float, str, str]]:
        self.stop.set()
        for t in self._threads:
            t.join(timeout=DEADLINE_S)
            assert not t.is_alive(), "a client thread hung"
        return self.snapshot()


# ---- drain ------------------------------------------------------------------------------------


# Both async runtimes: the multi-threaded one, and the current-thread one that a one-CPU budget gets.
REACTORS = pytest.mark.parametrize("reactor", [[], ["--reactor-threads", "1"]], ids=["default", "one-thread"])


@REACTORS
def test_sigterm_under_load_answers_everything_accepted_and_exits_zero(gateway_factory, repo_copy, reactor):
    gateway = gateway_factory(repo_copy("add_sub"), "--drain-delay-secs", "3", *reactor)
    channel = grpc.insecure_channel(gateway.url)
    try:
        load = Load(gateway.url)
        load.wait_for_results(50)
        sigterm_at = time.monotonic()
        gateway.process.send_signal(signal.SIGTERM)
        # Readiness turns off at once, on both the gRPC health service and the HTTP endpoint ...
        wait_for(lambda: grpc_health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING, "NOT_SERVING")
        wait_for(lambda: http_ready(gateway) == 400, "HTTP not-ready", gateway=gateway)
        not_ready_at = time.monotonic()
        # ... while requests go on being served through the drain delay.
        wait_for(
            lambda: any(sent > not_ready_at and outcome == "ok" for sent, outcome, _ in load.snapshot()),
            "serving after readiness turned off",
        )
        assert gateway.process.wait(timeout=DEADLINE_S) == 0, gateway.stderr()
        results = load.finish()
    finally:
        channel.close()
        gateway.stop()

    outcomes = Counter(outcome for _, outcome, _ in results)
    assert outcomes["WRONG"] == 0
    assert set(outcomes) <= {"ok", "StatusCode.UNAVAILABLE"}, outcomes
    assert all(outcome == "ok" for sent, outcome, _ in results if sent < sigterm_at), outcomes
    late = grpcclient.InferenceServerClient(gateway.url)
    a, b = add_sub_inputs()
    with pytest.raises(InferenceServerException) as refused:
        infer_add_sub(late, a, b, client_timeout=10)
    assert refused.value.status() == "StatusCode.UNAVAILABLE"
    assert "shutdown complete" in gateway.stderr()


@REACTORS
def test_drain_finishes_queued_requests_before_exiting(gateway_factory, repo_copy, reactor):
    repository = repo_copy("add_sub")
    # A single request waits 1.5 s for a batch that never fills: it is still queued at SIGTERM.
    set_dynamic_batching(
        repository,
        "add_sub",
        "dynamic_batching { preferred_batch_size: [ 8 ] max_queue_delay_microseconds: 1500000 }",
    )
    gateway = gateway_factory(repository, *reactor)
    clients = [grpcclient.InferenceServerClient(gateway.url) for _ in range(3)]
    inputs = [add_sub_inputs(seed=i) for i in range(3)]
    with ThreadPoolExecutor(3) as pool:
        futures = [
            pool.submit(infer_add_sub, c, a, b, client_timeout=DEADLINE_S) for c, (a, b) in zip(clients, inputs)
        ]
        wait_for(lambda: pending_requests(gateway, "add_sub") == 3, "3 requests queued", gateway=gateway)
        gateway.process.send_signal(signal.SIGTERM)
        for future, (a, b) in zip(futures, inputs):
            result = future.result(timeout=DEADLINE_S)
            assert np.array_equal(result.as_numpy("OUTPUT0"), a + b)
    assert gateway.process.wait(timeout=DEADLINE_S) == 0, gateway.stderr()
    for client in clients:
        client.close()


def test_exit_timeout_bounds_the_drain(gateway_factory, repo_copy):
    repository = repo_copy("add_sub")
    # This request would wait a minute for its batch; the exit timeout is one second.
    set_dynamic_batching(
        repository,
        "add_sub",
        "dynamic_batching { preferred_batch_size: [ 8 ] max_queue_delay_microseconds: 60000000 }",
    )
    gateway = gateway_factory(repository, "--exit-timeout-secs", "1")
    client = grpcclient.InferenceServerClient(gateway.url)
    a, b = add_sub_inputs()
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(infer_add_sub, client, a, b, client_timeout=DEADLINE_S)
        wait_for(lambda: pending_requests(gateway, "add_sub") == 1, "the request queued", gateway=gateway)
        gateway.process.send_signal(signal.SIGTERM)
        assert gateway.process.wait(timeout=DEADLINE_S) == 0, gateway.stderr()
        with pytest.raises(InferenceServerException) as cut:
            future.result(timeout=DEADLINE_S)
    assert cut.value.status() == "StatusCode.UNAVAILABLE"
    assert "exit timeout reached" in gateway.stderr()
    client.close()


def test_sigterm_during_startup_exits_zero():
    gateway = Gateway(MODELS, [])
    try:
        gateway.wait_listening()
        # Models are still loading (or just loaded): either way the signal drains, it does not kill.
        gateway.process.send_signal(signal.SIGTERM)
        assert gateway.process.wait(timeout=DEADLINE_S) == 0, gateway.stderr()
    finally:
        gateway.stop()


# ---- model control: poll ----------------------------------------------------------------------


def test_poll_swaps_in_a_new_version_without_failing_a_request(gateway_factory, repo_copy):
    repository = repo_copy("add_sub")
    gateway = gateway_factory(repository, "--model-control-mode", "poll", "--repository-poll-secs", "1")
    client = gateway.client()
    not_ready = threading.Event()
    stop_probe = threading.Event()

    def probe():
        prober = grpcclient.InferenceServerClient(gateway.url)
        while not stop_probe.is_set():
            if not prober.is_server_ready():
                not_ready.set()
            time.sleep(0.01)
        prober.close()

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    load = Load(gateway.url)
    try:
        load.wait_for_results(20)
        shutil.copytree(repository / "add_sub" / "1", repository / "add_sub" / "2")
        wait_for(lambda: client.get_model_metadata("add_sub").versions == ["2"], "version 2 serving", gateway=gateway)
        wait_for(
            lambda: any(version == "2" for _, _, version in load.snapshot()[-20:]),
            "responses from version 2",
        )
        results = load.finish()
    finally:
        load.stop.set()
        stop_probe.set()
        prober.join(timeout=DEADLINE_S)
    outcomes = Counter(outcome for _, outcome, _ in results)
    assert outcomes == Counter(ok=len(results)), outcomes
    versions = [version for _, _, version in results]
    assert versions[0] == "1" and "2" in versions
    # Once version 2 answered, version 1 never did again (latest-1 policy: 2 replaces 1).
    assert "1" not in versions[versions.index("2") + 20 :]
    assert not not_ready.is_set(), "readiness dropped during the reload"
    index = client.get_model_repository_index(as_json=True)["models"]
    assert index == [{"name": "add_sub", "version": "2", "state": "READY"}]


def test_poll_adds_removes_and_survives_a_broken_reload(gateway_factory, repo_copy):
    repository = repo_copy("add_sub")
    gateway = gateway_factory(repository, "--model-control-mode", "poll", "--repository-poll-secs", "1")
    client = gateway.client()

    shutil.copytree(MODELS / "digits_classifier", repository / "digits_classifier")
    wait_for(lambda: client.is_model_ready("digits_classifier"), "the added model ready", gateway=gateway)
    assert client.is_server_ready()

    shutil.rmtree(repository / "digits_classifier")
    wait_for(lambda: not client.is_model_ready("digits_classifier"), "the removed model gone", gateway=gateway)
    names = [m["name"] for m in client.get_model_repository_index(as_json=True)["models"]]
    assert names == ["add_sub"]

    broken = repository / "add_sub" / "2"
    broken.mkdir()
    (broken / "model.onnx").write_bytes(b"this is not an ONNX model")
    gateway.wait_for_log(re.compile(r"model reload failed.*model=add_sub"), timeout=DEADLINE_S)
    assert client.get_model_metadata("add_sub").versions == ["1"]
    assert client.is_server_ready()
    assert_add_sub_serves(client)

    # Fixed in place: the next scan loads it.
    shutil.copy(repository / "add_sub" / "1" / "model.onnx", broken / "model.onnx")
    wait_for(
        lambda: client.get_model_metadata("add_sub").versions == ["2"],
        "the repaired version serving",
        gateway=gateway,
    )
    assert_add_sub_serves(client)


def test_poll_loads_a_model_added_while_the_others_load(gateway_factory, repo_copy):
    """The poller's baseline is the repository before the startup load, so a model added while
    the startup models load (or before the poller's first scan) is found at the first poll. A
    baseline taken once serving started would already hold it, and it would never load."""
    repository = repo_copy("add_sub")
    slow = repository / "slow_warmup"
    shutil.copytree(MODELS / "mlp_bench", slow)
    config = (slow / "config.pbtxt").read_text().replace('name: "mlp_bench"', 'name: "slow_warmup"')
    # About 1000 runs at batch 64 (1-2 s here): the startup load lasts long enough to add a model.
    warmup = (
        'model_warmup [ { name: "long" batch_size: 64 count: 1000 inputs { key: "input" '
        "value { data_type: TYPE_FP32 dims: [ 256 ] zero_data: true } } } ]\n"
    )
    (slow / "config.pbtxt").write_text(config + warmup)
    gateway = gateway_factory(
        repository, "--model-control-mode", "poll", "--repository-poll-secs", "1", wait_ready=False
    )
    client = gateway.client()
    gateway.wait_live()
    assert not client.is_server_ready(), "the warm-up should still be running"
    shutil.copytree(MODELS / "digits_classifier", repository / "digits_classifier")
    gateway.wait_ready()
    wait_for(
        lambda: client.is_model_ready("digits_classifier"),
        "the model added during startup ready",
        gateway=gateway,
    )
    assert client.is_model_ready("slow_warmup") and client.is_model_ready("add_sub")


# ---- model control: explicit ------------------------------------------------------------------


def test_explicit_load_unload_and_config_override(gateway_factory, repo_copy):
    repository = repo_copy("add_sub", "digits_classifier")
    gateway = gateway_factory(repository, "--model-control-mode", "explicit", "--load-model", "add_sub")
    client = gateway.client()
    index = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
    assert index["add_sub"]["state"] == "READY"
    assert index["digits_classifier"]["state"] == "UNAVAILABLE"
    assert not client.is_model_ready("digits_classifier")

    client.load_model("digits_classifier")
    assert client.is_model_ready("digits_classifier")

    # Triton's `config` parameter: a JSON ModelConfig that replaces config.pbtxt for this load.
    config = client.get_model_config("add_sub", as_json=True)["config"]
    assert config["max_batch_size"] == 8
    config["max_batch_size"] = 4
    config["dynamic_batching"] = {}
    client.load_model("add_sub", config=json.dumps(config))
    assert client.get_model_config("add_sub", as_json=True)["config"]["max_batch_size"] == 4
    a, b = add_sub_inputs(batch=4)
    assert np.array_equal(infer_add_sub(client, a, b).as_numpy("OUTPUT0"), a + b)
    a, b = add_sub_inputs(batch=5)
    with pytest.raises(InferenceServerException) as too_big:
        infer_add_sub(client, a, b)
    assert too_big.value.status() == "StatusCode.INVALID_ARGUMENT"

    # An override the model cannot honour is refused and what was serving stays.
    config["input"][0]["name"] = "NOT_AN_INPUT"
    with pytest.raises(InferenceServerException) as bad:
        client.load_model("add_sub", config=json.dumps(config))
    assert bad.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert client.get_model_config("add_sub", as_json=True)["config"]["max_batch_size"] == 4

    client.unload_model("digits_classifier")
    assert not client.is_model_ready("digits_classifier")
    index = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
    assert index["digits_classifier"]["state"] == "UNAVAILABLE"
    assert client.is_server_ready()


def test_explicit_names_cannot_leave_the_repository(gateway_factory, repo_copy, tmp_path):
    repository = repo_copy("add_sub")
    # A loadable model right beside the repository: the target of an escape.
    shutil.copytree(MODELS / "digits_classifier", tmp_path / "outside")
    gateway = gateway_factory(repository, "--model-control-mode", "explicit", "--load-model", "add_sub")
    client = gateway.client()
    for name in ["..", "../outside", f"../{tmp_path.name}/outside", "a/b", "/etc", ".hidden"]:
        with pytest.raises(InferenceServerException) as refused:
            client.load_model(name)
        assert refused.value.status() == "StatusCode.INVALID_ARGUMENT", name
        with pytest.raises(InferenceServerException) as refused:
            client.unload_model(name)
        assert refused.value.status() == "StatusCode.INVALID_ARGUMENT", name
    with pytest.raises(InferenceServerException) as missing:
        client.load_model("outside")
    # Triton's answer for a name the repository does not hold.
    assert missing.value.status() == "StatusCode.INTERNAL"
    assert "failed to load 'outside', failed to poll from model repository" in missing.value.message()
    assert str(repository) not in missing.value.message()
    assert client.is_server_ready()
    assert [m["name"] for m in client.get_model_repository_index(as_json=True)["models"]] == ["add_sub"]


@pytest.mark.parametrize("mode", ["none", "poll"])
def test_repository_control_is_refused_unless_explicit(gateway_factory, repo_copy, mode):
    gateway = gateway_factory(repo_copy("add_sub"), "--model-control-mode", mode)
    client = gateway.client()
    for call in (lambda: client.load_model("add_sub"), lambda: client.unload_model("add_sub")):
        with pytest.raises(InferenceServerException) as refused:
            call()
        assert refused.value.status() == "StatusCode.UNAVAILABLE"
        assert "explicit" in refused.value.message()
    assert_add_sub_serves(client)
    gateway.stop()


# ---- listeners --------------------------------------------------------------------------------


def test_unix_socket_serves_tritonclient_and_a_raw_stub(gateway_factory, repo_copy, tmp_path):
    repository = repo_copy("add_sub")
    path = tmp_path / "gateway.sock"
    # A socket file left by a process that did not clean up (killed, or a restarted sidecar).
    first = gateway_factory(repository, "--grpc-uds", str(path))
    first.process.kill()
    first.process.wait()
    assert path.is_socket()

    gateway = gateway_factory(repository, "--grpc-uds", str(path))
    gateway.wait_for_log(re.compile(r"gRPC listening on Unix socket"))
    client = grpcclient.InferenceServerClient(f"unix://{path}")
    assert client.is_server_ready()
    assert_add_sub_serves(client)

    channel = grpc.insecure_channel(f"unix://{path}")
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    a, b = add_sub_inputs(batch=2, seed=5)
    request = service_pb2.ModelInferRequest(model_name="add_sub")
    for name, value in (("INPUT0", a), ("INPUT1", b)):
        tensor = request.inputs.add()
        tensor.name, tensor.datatype = name, "FP32"
        tensor.shape.extend(value.shape)
        request.raw_input_contents.append(value.tobytes())
    response = stub.ModelInfer(request, timeout=DEADLINE_S)
    total = np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(2, 16)
    assert np.array_equal(total, a + b)
    client.close()
    channel.close()
    assert gateway.stop() == 0
    assert not path.exists(), "the socket file is removed at exit"


def test_a_path_that_is_not_a_socket_is_never_replaced(repo_copy, tmp_path):
    precious = tmp_path / "notes.txt"
    precious.write_text("keep me")
    code, stderr = run_gateway_to_exit(repo_copy("add_sub"), "--grpc-uds", str(precious))
    assert code != 0
    assert "not a socket" in stderr
    assert precious.read_text() == "keep me"


def test_ipv6_loopback(gateway_factory, repo_copy):
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    gateway = gateway_factory(repo_copy("add_sub"), "--grpc-address", "::1", wait_ready=False)
    assert gateway.url.startswith("[::1]:")
    gateway.wait_ready()
    assert_add_sub_serves(gateway.client())
    gateway.stop()


def test_connection_concurrency_sheds_instead_of_hanging(gateway_factory, repo_copy):
    gateway = gateway_factory(repo_copy("add_sub", "mlp_bench"), "--grpc-connection-concurrency", "1")
    client = grpcclient.InferenceServerClient(gateway.url)  # one connection, many threads
    data = np.random.default_rng(1).standard_normal((8, 256)).astype(np.float32)

    def call(_):
        tensor = grpcclient.InferInput("input", [8, 256], "FP32")
        tensor.set_data_from_numpy(data)
        try:
            client.infer("mlp_bench", [tensor], client_timeout=DEADLINE_S)
            return "ok"
        except InferenceServerException as e:
            return e.status()

    with ThreadPoolExecutor(16) as pool:
        outcomes = Counter(pool.map(call, range(160)))
    assert set(outcomes) == {"ok", "StatusCode.RESOURCE_EXHAUSTED"}, outcomes
    assert_add_sub_serves(client)
    assert call(0) == "ok"
    client.close()
    gateway.stop()


def test_stream_limit_queues_and_keepalive_pings_keep_connections(gateway_factory, repo_copy):
    gateway = gateway_factory(
        repo_copy("add_sub"),
        "--grpc-max-concurrent-streams",
        "1",
        "--grpc-connection-concurrency",
        "0",
        "--grpc-keepalive-secs",
        "1",
        "--grpc-keepalive-timeout-secs",
        "5",
    )
    client = grpcclient.InferenceServerClient(gateway.url)
    # Past the stream limit calls wait for a free stream on the client side: all are answered.
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: infer_add_sub(client, *add_sub_inputs(seed=i)), range(32)))
    assert len(results) == 32
    # The idle connection outlives a few keepalive rounds: the client answers the server's pings.
    time.sleep(2.5)
    assert_add_sub_serves(client)
    client.close()
    gateway.stop()
