"""Transport: the Unix socket with unmodified gRPC C-core clients (no channel options), and the bounds
on connections (handshake timeout, idle timeout, connection cap), through the real binary."""
from __future__ import annotations

import queue
import re
import shutil
import time
import socket
from functools import partial

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.service_pb2 as service_pb2
import tritonclient.grpc.service_pb2_grpc as service_pb2_grpc
from tritonclient.utils import InferenceServerException

from harness import MODELS, TEST_MODELS

DEADLINE_S = 30.0
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
PING = b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + b"12345678"
PING_ACK = b"\x00\x00\x08\x06\x01\x00\x00\x00\x00" + b"12345678"
# A bound far above the configured timeouts (1 s): only a connection that is never closed fails.
CLOSE_WAIT_S = 20.0


@pytest.fixture
def repository(tmp_path):
    repo = tmp_path / "repository"
    repo.mkdir()
    shutil.copytree(MODELS / "add_sub", repo / "add_sub")
    shutil.copytree(TEST_MODELS / "identity_fp32", repo / "identity_fp32")
    return repo


def add_sub_inputs(seed: int):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((1, 16), dtype=np.float32)
    b = rng.standard_normal((1, 16), dtype=np.float32)
    inputs = [grpcclient.InferInput("INPUT0", [1, 16], "FP32"), grpcclient.InferInput("INPUT1", [1, 16], "FP32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    return inputs, a, b


def uds_gateway(gateway_factory, repository, tmp_path, *flags):
    path = tmp_path / "gw.sock"
    gateway = gateway_factory(repository, "--grpc-uds", str(path), *flags)
    return gateway, path


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes; fails if it does not close within CLOSE_WAIT_S."""
    sock.settimeout(CLOSE_WAIT_S)
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return received
        except socket.timeout:
            pytest.fail(f"the server did not close the connection; received {received!r}")
        if not chunk:
            return received
        received += chunk


def read_frames_until(sock: socket.socket, wanted: bytes) -> bytes:
    sock.settimeout(DEADLINE_S)
    received = b""
    while wanted not in received:
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    return received


def wait_until_served(call):
    """Retries `call` while it fails with UNAVAILABLE (a client backs off after a refused
    connection); fails after DEADLINE_S."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        try:
            return call()
        except InferenceServerException as error:
            if error.status() != "StatusCode.UNAVAILABLE" or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def tcp_socket(gateway) -> socket.socket:
    host, port = gateway.url.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=DEADLINE_S)


def unix_socket(path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(DEADLINE_S)
    sock.connect(str(path))
    return sock


# ---- the Unix socket with unmodified C-core clients -----------------------------------------------


def test_tritonclient_unix_url_without_channel_options(gateway_factory, repository, tmp_path):
    gateway, path = uds_gateway(gateway_factory, repository, tmp_path)
    client = grpcclient.InferenceServerClient(f"unix://{path}")
    assert client.is_server_ready()
    assert client.get_model_metadata("add_sub").name == "add_sub"
    # Many requests on one connection: the client's HPACK table fills, evicts and is referenced.
    for i in range(300):
        inputs, a, b = add_sub_inputs(i)
        result = client.infer("add_sub", inputs, request_id=f"r{i}", headers={"x-seq": str(i)})
        assert np.array_equal(result.as_numpy("OUTPUT0"), a + b)
        assert np.array_equal(result.as_numpy("OUTPUT1"), a - b)
    # A large tensor: 32 MiB in each direction, the body passes through in many DATA frames.
    big = np.arange(4 * 2 * 1024 * 1024, dtype=np.float32).reshape(4, -1)
    tensor = grpcclient.InferInput("INPUT0", list(big.shape), "FP32")
    tensor.set_data_from_numpy(big)
    assert np.array_equal(client.infer("identity_fp32", [tensor]).as_numpy("OUTPUT0"), big)
    client.close()
    assert gateway.process.poll() is None


def test_tritonclient_streaming_over_the_unix_socket(gateway_factory, repository, tmp_path):
    _, path = uds_gateway(gateway_factory, repository, tmp_path)
    client = grpcclient.InferenceServerClient(f"unix://{path}")
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=partial(lambda q, result, error: q.put((result, error)), results))
    expected = {}
    for i in range(50):
        inputs, a, b = add_sub_inputs(1000 + i)
        expected[f"s{i}"] = a + b
        client.async_stream_infer("add_sub", inputs, request_id=f"s{i}")
    for _ in range(50):
        result, error = results.get(timeout=DEADLINE_S)
        assert error is None, error
        request_id = result.get_response().id
        assert np.array_equal(result.as_numpy("OUTPUT0"), expected.pop(request_id))
    client.stop_stream()
    client.close()
    assert not expected


def test_grpcio_default_options_over_the_unix_socket(gateway_factory, repository, tmp_path):
    _, path = uds_gateway(gateway_factory, repository, tmp_path)
    for target in (f"unix://{path}", f"unix:{path}"):
        with grpc.insecure_channel(target) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=DEADLINE_S).ready
            for i in range(20):
                _, a, b = add_sub_inputs(i)
                request = service_pb2.ModelInferRequest(model_name="add_sub")
                for name, value in (("INPUT0", a), ("INPUT1", b)):
                    tensor = request.inputs.add()
                    tensor.name, tensor.datatype = name, "FP32"
                    tensor.shape.extend(value.shape)
                    request.raw_input_contents.append(value.tobytes())
                response = stub.ModelInfer(request, timeout=DEADLINE_S)
                total = np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(1, 16)
                assert np.array_equal(total, a + b)


# ---- connection bounds ----------------------------------------------------------------------------


@pytest.mark.parametrize("sent", [b"", PREFACE[:10]], ids=["nothing", "half-a-preface"])
def test_a_connection_without_a_preface_is_closed(gateway_factory, repository, tmp_path, sent):
    gateway, path = uds_gateway(gateway_factory, repository, tmp_path, "--grpc-handshake-timeout-secs", "1")
    for connect in (lambda: tcp_socket(gateway), lambda: unix_socket(path)):
        with connect() as sock:
            sock.sendall(sent)
            read_until_closed(sock)
    assert gateway.client().is_server_ready()


def test_a_connection_idle_past_the_timeout_is_closed_and_clients_reconnect(gateway_factory, repository, tmp_path):
    gateway, path = uds_gateway(gateway_factory, repository, tmp_path, "--grpc-idle-timeout-secs", "1")
    for connect in (lambda: tcp_socket(gateway), lambda: unix_socket(path)):
        with connect() as sock:
            sock.sendall(PREFACE + EMPTY_SETTINGS)
            received = read_until_closed(sock)
            assert received[3] == 0x4, "the server's SETTINGS came first"
    # A client whose connection was closed while idle gets a new one for its next call.
    client = grpcclient.InferenceServerClient(f"unix://{path}")
    for i in range(2):
        inputs, a, b = add_sub_inputs(i)
        assert np.array_equal(client.infer("add_sub", inputs).as_numpy("OUTPUT0"), a + b)
        if i == 0:
            # Two raw connections idle out one after the other, so the client's own connection
            # (idle since the call above) was closed well before the next call is sent.
            for _ in range(2):
                with unix_socket(path) as sock:
                    sock.sendall(PREFACE + EMPTY_SETTINGS)
                    read_until_closed(sock)
    client.close()


def test_the_connection_cap_refuses_connections_past_it(gateway_factory, repository, tmp_path):
    # Three: the harness's own client (it waited for readiness) keeps one connection open.
    gateway, path = uds_gateway(gateway_factory, repository, tmp_path, "--grpc-max-connections", "3")
    held = [tcp_socket(gateway), unix_socket(path)]
    for sock in held:
        sock.sendall(PREFACE + EMPTY_SETTINGS)
        assert sock.recv(9)[3] == 0x4, "admitted connections are served"
    for connect in (lambda: tcp_socket(gateway), lambda: unix_socket(path)):
        with connect() as extra:
            extra.sendall(PREFACE + EMPTY_SETTINGS)
            assert read_until_closed(extra) == b"", "refused before any HTTP/2 byte"
    refused_client = grpcclient.InferenceServerClient(f"unix://{path}")
    with pytest.raises(InferenceServerException) as refused:
        refused_client.is_server_ready(client_timeout=DEADLINE_S)
    assert refused.value.status() == "StatusCode.UNAVAILABLE"
    refused_client.close()
    gateway.wait_for_log(re.compile(r"connection refused: --grpc-max-connections reached.*limit=3"))
    # The held connections still serve, and their slots free when they close.
    for sock in held:
        sock.sendall(PING)
        assert PING_ACK in read_frames_until(sock, PING_ACK)
        sock.close()
    client = grpcclient.InferenceServerClient(f"unix://{path}")
    inputs, a, b = add_sub_inputs(3)
    wait_until_served(lambda: client.infer("add_sub", inputs))
    assert np.array_equal(client.infer("add_sub", inputs).as_numpy("OUTPUT0"), a + b)
    client.close()
