"""TLS, mutual TLS and bearer-token authentication on the gRPC listener, with the real binary and the
unmodified tritonclient. Certificates are made at test time (tls_certs.py)."""
from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import socket
import ssl
import time
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc as grpcclient
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
from tls_certs import Pki, make_pki

DEADLINE_S = 60.0
TOKEN = "correct-horse-battery-staple"
BEARER = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def secure_gateway():
    """Starts gateways whose readiness must be checked with a client the test supplies (TLS or a
    token), and stops them afterwards."""
    started: list[Gateway] = []

    def start(args: list[str], client_kwargs: dict, headers: dict | None = None) -> Gateway:
        gateway = Gateway(MODELS, args)
        started.append(gateway)
        gateway.wait_listening()
        client = grpcclient.InferenceServerClient(gateway.url, **client_kwargs)
        deadline = time.monotonic() + DEADLINE_S
        while True:
            try:
                if client.is_server_ready(headers=headers):
                    break
            except InferenceServerException:
                pass
            assert gateway.process.poll() is None, gateway.stderr()
            assert time.monotonic() < deadline, f"not ready; stderr:\n{gateway.stderr()}"
            time.sleep(0.05)
        client.close()
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


def tls_args(pki: Pki, mutual: bool = False) -> list[str]:
    args = [
        "--grpc-use-ssl-mutual" if mutual else "--grpc-use-ssl",
        "--grpc-server-cert",
        str(pki.server_cert),
        "--grpc-server-key",
        str(pki.server_key),
    ]
    if mutual:
        args += ["--grpc-root-cert", str(pki.ca_cert)]
    return args


def infer_status(url: str, **client_kwargs) -> str:
    """'ok' when add_sub answers correctly through a fresh client built with `client_kwargs`, else
    the gRPC status."""
    headers = client_kwargs.pop("headers", None)
    client = grpcclient.InferenceServerClient(url, **client_kwargs)
    try:
        a, b = add_sub_inputs()
        result = infer_add_sub(client, a, b, headers=headers, client_timeout=10)
        assert (result.as_numpy("OUTPUT0") == a + b).all()
        return "ok"
    except InferenceServerException as e:
        return e.status()
    finally:
        client.close()


def test_tls(secure_gateway, pki):
    trusted = {"ssl": True, "root_certificates": str(pki.ca_cert)}
    gateway = secure_gateway(tls_args(pki), trusted)
    assert infer_status(gateway.url, **trusted) == "ok"
    # Also by name: the certificate carries localhost as well as 127.0.0.1.
    port = gateway.url.rsplit(":", 1)[1]
    assert infer_status(f"localhost:{port}", **trusted) == "ok"
    assert infer_status(gateway.url) == "StatusCode.UNAVAILABLE", "plaintext must not get through"
    wrong_ca = {"ssl": True, "root_certificates": str(pki.rogue_cert)}
    assert infer_status(gateway.url, **wrong_ca) == "StatusCode.UNAVAILABLE"


def test_mutual_tls(secure_gateway, pki):
    with_cert = {
        "ssl": True,
        "root_certificates": str(pki.ca_cert),
        "private_key": str(pki.client_key),
        "certificate_chain": str(pki.client_cert),
    }
    gateway = secure_gateway(tls_args(pki, mutual=True), with_cert)
    assert infer_status(gateway.url, **with_cert) == "ok"
    no_cert = {"ssl": True, "root_certificates": str(pki.ca_cert)}
    assert infer_status(gateway.url, **no_cert) == "StatusCode.UNAVAILABLE"
    rogue = dict(with_cert, private_key=str(pki.rogue_key), certificate_chain=str(pki.rogue_cert))
    assert infer_status(gateway.url, **rogue) == "StatusCode.UNAVAILABLE"
    assert infer_status(gateway.url) == "StatusCode.UNAVAILABLE"
    # The server keeps serving the good client after refusing the others.
    assert infer_status(gateway.url, **with_cert) == "ok"


# Each fresh client its own connection: gRPC C-core otherwise shares one between channels to the
# same address, and a check could ride a connection opened under the other certificate.
OWN_CONNECTION = {"channel_args": [("grpc.use_local_subchannel_pool", 1)]}


# No look for changed files: a test of SIGHUP must not pass by a reload the look made.
SIGHUP_ONLY = ["--reload-poll-secs", "0"]


def https_ready(address: str, ca_cert) -> int:
    """The status of GET /v2/health/ready over a fresh TLS connection trusting only `ca_cert`."""
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(ca_cert))
    conn = http.client.HTTPSConnection(host, int(port), context=context, timeout=30)
    try:
        conn.request("GET", "/v2/health/ready")
        return conn.getresponse().status
    finally:
        conn.close()


def install(source: Path, target: Path) -> None:
    """Replaces `target` in one step, as the kubelet swaps a Secret's files."""
    shutil.copyfile(source, target.with_suffix(".next"))
    os.replace(target.with_suffix(".next"), target)


def test_sighup_renews_the_tls_certificate_of_both_doors(secure_gateway, pki, tmp_path):
    # cert-manager renewing a Secret under a running pod: after SIGHUP new connections on both
    # doors get the new certificate, a connection opened before keeps serving, and a renewal
    # that does not load keeps the certificate in force.
    renewed = make_pki(tmp_path / "renewed")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    install(pki.server_cert, cert)
    install(pki.server_key, key)
    old_ca = {"ssl": True, "root_certificates": str(pki.ca_cert), **OWN_CONNECTION}
    new_ca = {"ssl": True, "root_certificates": str(renewed.ca_cert), **OWN_CONNECTION}
    files = ["--grpc-server-cert", str(cert), "--grpc-server-key", str(key)]
    http_files = ["--http-server-cert", str(cert), "--http-server-key", str(key)]
    gateway = secure_gateway(["--grpc-use-ssl", *files, "--http-use-ssl=true", *http_files, *SIGHUP_ONLY], old_ca)
    held = grpcclient.InferenceServerClient(gateway.url, **old_ca)
    assert_add_sub_serves(held)
    assert https_ready(gateway.http_addr, pki.ca_cert) == 200
    assert infer_status(gateway.url, **new_ca) == "StatusCode.UNAVAILABLE"

    install(renewed.server_cert, cert)
    install(renewed.server_key, key)
    gateway.process.send_signal(signal.SIGHUP)
    for door in ("gRPC", "HTTP"):
        gateway.wait_for_log(re.compile(rf'TLS certificate and key reloaded.*door="?{door}'))
    assert infer_status(gateway.url, **new_ca) == "ok"
    assert infer_status(gateway.url, **old_ca) == "StatusCode.UNAVAILABLE"
    assert https_ready(gateway.http_addr, renewed.ca_cert) == 200
    with pytest.raises(ssl.SSLError):
        https_ready(gateway.http_addr, pki.ca_cert)
    assert_add_sub_serves(held)

    # A key that does not match the certificate: refused, and the renewed pair stays in force.
    install(pki.server_key, key)
    gateway.process.send_signal(signal.SIGHUP)
    failed = gateway.wait_for_log(re.compile(r"TLS reload failed.*"))
    assert "--grpc-server-key" in failed.group(0) or "--http-server-key" in failed.group(0), failed.group(0)
    assert infer_status(gateway.url, **new_ca) == "ok"
    assert https_ready(gateway.http_addr, renewed.ca_cert) == 200
    held.close()


def project_secret(directory: Path, version: str, files: dict[str, Path]) -> None:
    """Lays `files` out as the kubelet projects a Secret: `name -> ..data/name`, `..data` a link to
    the version's directory, swapped in one rename on each update."""
    (directory / version).mkdir(parents=True)
    for name, source in files.items():
        shutil.copyfile(source, directory / version / name)
        if not (directory / name).is_symlink():
            (directory / name).symlink_to(Path("..data") / name)
    (directory / "..data_tmp").symlink_to(version)
    os.replace(directory / "..data_tmp", directory / "..data")


def test_a_rotated_secret_is_reloaded_with_no_signal(secure_gateway, pki, tmp_path):
    secret = tmp_path / "secret"
    token = tmp_path / "token.txt"
    token.write_text(TOKEN)
    project_secret(secret, "..v1", {"tls.crt": pki.server_cert, "tls.key": pki.server_key, "token": token})
    old_ca = {"ssl": True, "root_certificates": str(pki.ca_cert), **OWN_CONNECTION}
    args = ["--grpc-use-ssl", "--grpc-server-cert", str(secret / "tls.crt"), "--grpc-server-key",
            str(secret / "tls.key"), "--auth-token-file", str(secret / "token"), "--reload-poll-secs", "1"]
    gateway = secure_gateway(args, old_ca, headers=BEARER)
    assert infer_status(gateway.url, headers=BEARER, **old_ca) == "ok"

    renewed = make_pki(tmp_path / "renewed")
    token.write_text("rotated-token-3")
    project_secret(secret, "..v2", {"tls.crt": renewed.server_cert, "tls.key": renewed.server_key, "token": token})
    gateway.wait_for_log(re.compile(r"TLS certificate and key reloaded"))
    gateway.wait_for_log(re.compile(r"authorization policy reloaded"))
    new_ca = {"ssl": True, "root_certificates": str(renewed.ca_cert), **OWN_CONNECTION}
    rotated = {"authorization": "Bearer rotated-token-3"}
    assert infer_status(gateway.url, headers=rotated, **new_ca) == "ok"
    assert infer_status(gateway.url, headers=BEARER, **new_ca) == "StatusCode.UNAUTHENTICATED"
    assert infer_status(gateway.url, headers=rotated, **old_ca) == "StatusCode.UNAVAILABLE"


def test_a_stalled_tls_handshake_is_closed_and_holds_up_no_other(secure_gateway, pki):
    trusted = {"ssl": True, "root_certificates": str(pki.ca_cert), **OWN_CONNECTION}
    gateway = secure_gateway(tls_args(pki) + ["--grpc-handshake-timeout-secs", "1"], trusted)
    host, port = gateway.url.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as stalled:
        stalled.sendall(b"\x16\x03\x01")  # the start of a TLS record, then nothing
        # Other clients shake hands and are served while that one waits.
        assert infer_status(gateway.url, **trusted) == "ok"
        stalled.settimeout(30)
        try:
            assert stalled.recv(1024) == b"", "the server answered a handshake that never came"
        except ConnectionResetError:
            pass
    assert infer_status(gateway.url, **trusted) == "ok"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--grpc-use-ssl"], "--grpc-server-cert"),
        (
            ["--grpc-use-ssl-mutual", "--grpc-server-cert", "{cert}", "--grpc-server-key", "{key}"],
            "--grpc-root-cert",
        ),
        (["--grpc-use-ssl", "--grpc-server-cert", "{cert}", "--grpc-server-key", "{cert}"], "--grpc-server-key"),
        (["--auth-token-file", "/nonexistent/token"], "--auth-token-file"),
    ],
)
def test_bad_security_config_fails_startup(pki, args, message):
    args = [a.format(cert=pki.server_cert, key=pki.server_key) for a in args]
    code, stderr = run_gateway_to_exit(MODELS, *args)
    assert code != 0, stderr
    assert message in stderr, stderr


def test_bearer_token(secure_gateway, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    gateway = secure_gateway(["--auth-token-file", str(token_file)], {}, headers=BEARER)
    assert infer_status(gateway.url, headers=BEARER) == "ok"
    assert infer_status(gateway.url) == "StatusCode.UNAUTHENTICATED"
    assert infer_status(gateway.url, headers={"authorization": "Bearer wrong"}) == "StatusCode.UNAUTHENTICATED"
    assert infer_status(gateway.url, headers={"authorization": TOKEN}) == "StatusCode.UNAUTHENTICATED"
    client = grpcclient.InferenceServerClient(gateway.url)
    for call in (client.is_server_live, client.get_server_metadata, lambda: client.load_model("add_sub")):
        with pytest.raises(InferenceServerException) as refused:
            call()
        assert refused.value.status() == "StatusCode.UNAUTHENTICATED"
    # Kubernetes' gRPC probes send no token: health is exempt by default.
    with grpc.insecure_channel(gateway.url) as channel:
        request = health_pb2.HealthCheckRequest(service="")
        health = health_pb2_grpc.HealthStub(channel).Check(request, timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert_add_sub_serves_with_token(client)
    client.close()


def test_sighup_rereads_the_token_file(secure_gateway, tmp_path):
    # A Secret rotated under a running pod: the new token works after SIGHUP, the old one stops, and
    # a file that cannot be used keeps the token in force.
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    gateway = secure_gateway(["--auth-token-file", str(token_file), *SIGHUP_ONLY], {}, headers=BEARER)
    rotated = {"authorization": "Bearer rotated-token-2"}
    assert infer_status(gateway.url, headers=rotated) == "StatusCode.UNAUTHENTICATED"
    token_file.write_text("rotated-token-2\n")
    gateway.process.send_signal(signal.SIGHUP)
    gateway.wait_for_log(re.compile(r"authorization policy reloaded"))
    assert infer_status(gateway.url, headers=rotated) == "ok"
    assert infer_status(gateway.url, headers=BEARER) == "StatusCode.UNAUTHENTICATED"
    token_file.write_text("  \n")
    gateway.process.send_signal(signal.SIGHUP)
    gateway.wait_for_log(re.compile(r"authorization policy not reloaded.*is empty"))
    assert infer_status(gateway.url, headers=rotated) == "ok"


def assert_add_sub_serves_with_token(client) -> None:
    a, b = add_sub_inputs(batch=2, seed=3)
    result = infer_add_sub(client, a, b, headers=BEARER)
    assert (result.as_numpy("OUTPUT1") == a - b).all()


def test_bearer_token_covers_health_when_asked(secure_gateway, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    gateway = secure_gateway(
        ["--auth-token-file", str(token_file), "--auth-exempt-health", "false"], {}, headers=BEARER
    )
    with grpc.insecure_channel(gateway.url) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        health = stub.Check(
            health_pb2.HealthCheckRequest(service=""),
            metadata=[("authorization", f"Bearer {TOKEN}")],
            timeout=10,
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_tls_and_token_together(secure_gateway, pki, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    trusted = {"ssl": True, "root_certificates": str(pki.ca_cert)}
    gateway = secure_gateway(tls_args(pki) + ["--auth-token-file", str(token_file)], trusted, headers=BEARER)
    assert infer_status(gateway.url, headers=BEARER, **trusted) == "ok"
    assert infer_status(gateway.url, **trusted) == "StatusCode.UNAUTHENTICATED"
