"""Bad requests are refused with Triton's status codes and a message that names the offending tensor,
before anything is queued or allocated, and the server keeps serving good requests afterwards.

Malformed requests that tritonclient refuses to build are sent as hand-made ModelInferRequest
protobufs through the generated stub in tritonclient.grpc.service_pb2_grpc.
"""
from __future__ import annotations

import struct

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from harness import TEST_MODELS, add_sub_inputs, assert_add_sub_serves, infer_add_sub

# A refusal must not wait on anything big: this bounds every call, so a server that tried to
# allocate or run a huge tensor fails the test with DEADLINE_EXCEEDED instead of hanging it.
CALL_TIMEOUT_S = 10
GRPC_MAX = 2**31 - 1


@pytest.fixture(scope="module")
def stub(models_gateway):
    channel = grpc.insecure_channel(
        models_gateway.url,
        options=[("grpc.max_send_message_length", GRPC_MAX), ("grpc.max_receive_message_length", GRPC_MAX)],
    )
    yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def test_stub(test_models_gateway):
    channel = grpc.insecure_channel(test_models_gateway.url)
    yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def raw_infer(stub, request: service_pb2.ModelInferRequest) -> service_pb2.ModelInferResponse:
    """Sends a hand-made request; gRPC errors surface as tritonclient's InferenceServerException."""
    try:
        return stub.ModelInfer(request, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as e:
        raise InferenceServerException(msg=e.details(), status=str(e.code())) from None


def expect_error(call, code: str, *fragments: str) -> str:
    with pytest.raises(InferenceServerException) as info:
        call()
    error = info.value
    assert error.status() == f"StatusCode.{code}", f"{error.status()}: {error.message()}"
    for fragment in fragments:
        assert fragment in error.message(), f"{fragment!r} not in {error.message()!r}"
    return error.message()


def add_sub_request(**overrides) -> service_pb2.ModelInferRequest:
    """A valid add_sub request (batch 1) with raw contents; `overrides` change INPUT0's fields."""
    a, b = add_sub_inputs()
    request = service_pb2.ModelInferRequest(model_name="add_sub")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
    request.inputs.add(name="INPUT1", datatype="FP32", shape=[1, 16])
    request.raw_input_contents.extend([a.tobytes(), b.tobytes()])
    for key, value in overrides.items():
        if key == "shape":
            del request.inputs[0].shape[:]
            request.inputs[0].shape.extend(value)
        else:
            setattr(request.inputs[0], key, value)
    return request


def identity_request(model: str, datatype: str, shape: list[int], raw: bytes) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name="INPUT0", datatype=datatype, shape=shape)
    request.raw_input_contents.append(raw)
    return request


def bytes_element(payload: bytes) -> bytes:
    return struct.pack("<I", len(payload)) + payload


def assert_identity_serves(test_client) -> None:
    data = np.array([[b"still", b""]], dtype=np.object_)
    infer_input = grpcclient.InferInput("INPUT0", [1, 2], "BYTES")
    infer_input.set_data_from_numpy(data)
    result = test_client.infer("identity_bytes", [infer_input])
    assert result.as_numpy("OUTPUT0").tolist() == data.tolist()


# ---- add_sub: tensor-level validation ---------------------------------------------------------


def test_wrong_datatype(client):
    a, b = add_sub_inputs()
    inputs = [grpcclient.InferInput("INPUT0", [1, 16], "INT32"), grpcclient.InferInput("INPUT1", [1, 16], "FP32")]
    inputs[0].set_data_from_numpy(a.astype(np.int32))
    inputs[1].set_data_from_numpy(b)
    expect_error(lambda: client.infer("add_sub", inputs), "INVALID_ARGUMENT", "INPUT0")
    assert_add_sub_serves(client)


def test_unknown_datatype_string(client, stub):
    expect_error(lambda: raw_infer(stub, add_sub_request(datatype="FP8")), "INVALID_ARGUMENT", "INPUT0")
    assert_add_sub_serves(client)


def test_wrong_rank(client, stub):
    # [1] has no room for the [16] after the batch dimension. ([16] would be refused too, but as batch
    # 16 > max_batch_size 8, which Triton checks first and reports without a tensor name.)
    expect_error(lambda: raw_infer(stub, add_sub_request(shape=[1])), "INVALID_ARGUMENT", "INPUT0")
    expect_error(lambda: raw_infer(stub, add_sub_request(shape=[1, 1, 16])), "INVALID_ARGUMENT", "INPUT0")
    assert_add_sub_serves(client)


def test_wrong_dim(client, stub):
    request = add_sub_request(shape=[1, 15])
    request.raw_input_contents[0] = request.raw_input_contents[0][: 15 * 4]
    expect_error(lambda: raw_infer(stub, request), "INVALID_ARGUMENT", "INPUT0")
    assert_add_sub_serves(client)


def test_negative_dim(client, stub):
    expect_error(lambda: raw_infer(stub, add_sub_request(shape=[-1, 16])), "INVALID_ARGUMENT", "INPUT0")
    assert_add_sub_serves(client)


def test_batch_larger_than_max_batch_size(client):
    a, b = add_sub_inputs(batch=9)
    message = expect_error(lambda: infer_add_sub(client, a, b), "INVALID_ARGUMENT", "8")
    assert "batch" in message.lower()
    assert_add_sub_serves(client)


def test_inputs_disagree_on_batch_size(client):
    a, _ = add_sub_inputs(batch=1)
    _, b = add_sub_inputs(batch=2)
    message = expect_error(lambda: infer_add_sub(client, a, b), "INVALID_ARGUMENT")
    assert "INPUT0" in message or "INPUT1" in message, message
    assert_add_sub_serves(client)


def test_raw_byte_size_mismatch(client, stub):
    for size in (60, 68, 0):
        request = add_sub_request()
        request.raw_input_contents[0] = bytes(size)
        expect_error(lambda: raw_infer(stub, request), "INVALID_ARGUMENT", "INPUT0")
    assert_add_sub_serves(client)


def test_missing_input(client):
    a, _ = add_sub_inputs()
    only = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
    only.set_data_from_numpy(a)
    expect_error(lambda: client.infer("add_sub", [only]), "INVALID_ARGUMENT", "INPUT1")
    assert_add_sub_serves(client)


def test_unknown_extra_input(client, stub):
    request = add_sub_request()
    request.inputs.add(name="INPUT2", datatype="FP32", shape=[1, 16])
    request.raw_input_contents.append(bytes(64))
    expect_error(lambda: raw_infer(stub, request), "INVALID_ARGUMENT", "INPUT2")
    assert_add_sub_serves(client)


def test_duplicate_input(client, stub):
    request = add_sub_request()
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
    request.raw_input_contents.append(bytes(64))
    expect_error(lambda: raw_infer(stub, request), "INVALID_ARGUMENT", "INPUT0")
    assert_add_sub_serves(client)


def test_unknown_requested_output(client):
    a, b = add_sub_inputs()
    outputs = [grpcclient.InferRequestedOutput("OUTPUT9")]
    expect_error(lambda: infer_add_sub(client, a, b, outputs=outputs), "INVALID_ARGUMENT", "OUTPUT9")
    assert_add_sub_serves(client)


def test_raw_and_typed_contents_both_set(client, stub):
    request = add_sub_request()
    request.inputs[0].contents.fp32_contents.extend([0.0] * 16)
    expect_error(lambda: raw_infer(stub, request), "INVALID_ARGUMENT", "INPUT0")
    assert_add_sub_serves(client)


def test_typed_contents_with_wrong_count(client, stub):
    request = service_pb2.ModelInferRequest(model_name="add_sub")
    for name in ("INPUT0", "INPUT1"):
        tensor = request.inputs.add(name=name, datatype="FP32", shape=[1, 16])
        tensor.contents.fp32_contents.extend([1.0] * (15 if name == "INPUT1" else 16))
    expect_error(lambda: raw_infer(stub, request), "INVALID_ARGUMENT", "INPUT1")
    assert_add_sub_serves(client)


def test_raw_contents_count_differs_from_inputs(client, stub):
    request = add_sub_request()
    del request.raw_input_contents[1]
    expect_error(lambda: raw_infer(stub, request), "INVALID_ARGUMENT")
    assert_add_sub_serves(client)


# ---- absurd sizes: refused before any allocation ----------------------------------------------


def test_shape_claiming_2_pow_40_elements(test_client, test_stub):
    request = identity_request("identity_uint8", "UINT8", [2**20, 2**20], bytes(16))
    expect_error(lambda: raw_infer(test_stub, request), "INVALID_ARGUMENT", "INPUT0")
    request = identity_request("identity_bytes", "BYTES", [2**20, 2**20], bytes_element(b"x"))
    expect_error(lambda: raw_infer(test_stub, request), "INVALID_ARGUMENT", "INPUT0")
    assert_identity_serves(test_client)


def test_shape_whose_element_count_overflows(test_client, test_stub):
    request = identity_request("identity_fp64", "FP64", [2**62, 2**62], bytes(8))
    expect_error(lambda: raw_infer(test_stub, request), "INVALID_ARGUMENT", "INPUT0")
    assert_identity_serves(test_client)


# ---- BYTES with broken length prefixes --------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        struct.pack("<I", 10) + b"x",  # claims 10 bytes, 1 follows
        b"\x01\x00",  # prefix cut short
        bytes_element(b"ok") + b"\x05\x00\x00",  # good element, then a truncated prefix
        struct.pack("<I", 0xFFFFFFFF),  # claims 4 GiB
    ],
    ids=["overlong", "short-prefix", "trailing-garbage", "4gib-claim"],
)
def test_bytes_broken_length_prefix(test_client, test_stub, raw):
    request = identity_request("identity_bytes", "BYTES", [1, 1], raw)
    expect_error(lambda: raw_infer(test_stub, request), "INVALID_ARGUMENT", "INPUT0")
    assert_identity_serves(test_client)


def test_bytes_element_count_differs_from_shape(test_client, test_stub):
    raw = bytes_element(b"a") + bytes_element(b"b")
    expect_error(
        lambda: raw_infer(test_stub, identity_request("identity_bytes", "BYTES", [1, 1], raw)),
        "INVALID_ARGUMENT",
        "INPUT0",
    )
    expect_error(
        lambda: raw_infer(test_stub, identity_request("identity_bytes", "BYTES", [1, 3], raw)),
        "INVALID_ARGUMENT",
        "INPUT0",
    )
    assert_identity_serves(test_client)


# ---- unknown models and versions (Triton's codes and texts) -----------------------------------


def test_unknown_model(client):
    a, b = add_sub_inputs()
    inputs = [grpcclient.InferInput("INPUT0", [1, 16], "FP32")]
    inputs[0].set_data_from_numpy(a)
    expected = "Request for unknown model: 'no_such_model' is not found"
    message = expect_error(lambda: client.infer("no_such_model", inputs), "NOT_FOUND", expected)
    assert message == expected
    expect_error(lambda: client.get_model_metadata("no_such_model"), "NOT_FOUND", expected)
    expect_error(lambda: client.get_model_config("no_such_model"), "NOT_FOUND", expected)
    assert_add_sub_serves(client)


def test_unknown_model_version(client):
    a, b = add_sub_inputs()
    expected = "Request for unknown model: 'add_sub' version 7 is not found"
    message = expect_error(lambda: infer_add_sub(client, a, b, model_version="7"), "NOT_FOUND", expected)
    assert message == expected
    expect_error(lambda: client.get_model_metadata("add_sub", "7"), "NOT_FOUND", expected)
    assert_add_sub_serves(client)


# ---- message size limits ----------------------------------------------------------------------


def test_request_over_max_message_bytes(gateway_factory):
    gateway = gateway_factory(TEST_MODELS, "--max-message-bytes", str(1024 * 1024))
    client = gateway.client()
    small = np.zeros((1, 1000), dtype=np.uint8)
    big = np.zeros((2, 1024 * 1024), dtype=np.uint8)
    for data, fails in ((small, False), (big, True), (small, False)):
        infer_input = grpcclient.InferInput("INPUT0", list(data.shape), "UINT8")
        infer_input.set_data_from_numpy(data)
        if fails:
            with pytest.raises(InferenceServerException) as info:
                client.infer("identity_uint8", [infer_input])
            # gRPC C++ (Triton) says RESOURCE_EXHAUSTED; tonic's decoder says OUT_OF_RANGE.
            assert info.value.status() in ("StatusCode.RESOURCE_EXHAUSTED", "StatusCode.OUT_OF_RANGE"), (
                f"{info.value.status()}: {info.value.message()}"
            )
        else:
            assert client.infer("identity_uint8", [infer_input]).as_numpy("OUTPUT0").shape == data.shape
