"""Memory stays bounded whatever clients send: one budget (--max-inflight-bytes) for every request in
flight, counted as bytes arrive; decoding that cannot amplify; typed values that must fit their
datatype; names in error texts cut to a bounded length.

Peak memory is read from the server's /proc/<pid>/status (VmHWM, the high-water mark of its resident
set). Bounds are stated per test; every call has a deadline, so a server that stalls fails instead of
hanging the test.
"""
from __future__ import annotations

import gzip
import re
import struct
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc

from harness import TEST_MODELS

MIB = 1024 * 1024
CALL_TIMEOUT_S = 60
GRPC_MAX = 2**31 - 1


def vm_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"{field} missing from /proc/{pid}/status")


def metric(admin_url: str, name: str) -> float:
    with urllib.request.urlopen(f"{admin_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def wait_for_metric(admin_url: str, name: str, value: float, timeout: float = 10.0) -> None:
    """Response bodies release their reservation when the server drops them, just after the client
    has its answer: poll until the gauge shows it (fails after `timeout`)."""
    deadline = time.monotonic() + timeout
    while metric(admin_url, name) != value:
        assert time.monotonic() < deadline, f"{name} stayed at {metric(admin_url, name)}, expected {value}"
        time.sleep(0.05)


def open_stub(gateway):
    channel = grpc.insecure_channel(
        gateway.url,
        options=[("grpc.max_send_message_length", GRPC_MAX), ("grpc.max_receive_message_length", GRPC_MAX)],
    )
    return channel, service_pb2_grpc.GRPCInferenceServiceStub(channel)


def raw_request(model: str, datatype: str, shape: list[int], raw: bytes) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="INPUT0", datatype=datatype)
    tensor.shape.extend(shape)
    request.raw_input_contents.append(raw)
    return request


def call(stub, request):
    """The status code and text of one ModelInfer call."""
    try:
        stub.ModelInfer(request, timeout=CALL_TIMEOUT_S)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        return e.code(), e.details()


def small_fp32_serves(stub) -> None:
    values = np.arange(4, dtype=np.float32).reshape(1, 4)
    response = stub.ModelInfer(raw_request("identity_fp32", "FP32", [1, 4], values.tobytes()), timeout=CALL_TIMEOUT_S)
    assert np.frombuffer(response.raw_output_contents[0], dtype=np.float32).tolist() == values.ravel().tolist()


# 256 requests of 4 MiB (1 GiB on the wire), 128 at a time over 8 connections, under a 16 MiB budget.
OVERLOAD_REQUESTS = 256
OVERLOAD_CONCURRENCY = 128
OVERLOAD_CHANNELS = 8
OVERLOAD_REQUEST_BYTES = 4 * MIB
OVERLOAD_BUDGET = 16 * MIB
# An admitted request costs about four times its wire size at its peak (request, ORT input, ORT
# output, response), so the server may grow by about 4 x the budget plus allocator slack. Measured:
# 41 MiB with the budget; 327 MiB without it (about 300 MiB of requests in flight at once).
OVERLOAD_GROWTH_BOUND_KIB = (4 * OVERLOAD_BUDGET + 48 * MIB) // 1024


def test_overload_is_refused_by_the_budget_and_memory_stays_bounded(gateway_factory):
    gateway = gateway_factory(TEST_MODELS, "--max-inflight-bytes", str(OVERLOAD_BUDGET))
    channels = [open_stub(gateway) for _ in range(OVERLOAD_CHANNELS)]
    stub = channels[0][1]
    small_fp32_serves(stub)
    pid = gateway.process.pid
    baseline = vm_kib(pid, "VmHWM")
    elements = OVERLOAD_REQUEST_BYTES // 4
    payload = np.ones(elements, dtype=np.float32).tobytes()
    request = raw_request("identity_fp32", "FP32", [1, elements], payload)
    with ThreadPoolExecutor(max_workers=OVERLOAD_CONCURRENCY) as pool:
        results = list(
            pool.map(lambda i: call(channels[i % OVERLOAD_CHANNELS][1], request), range(OVERLOAD_REQUESTS))
        )
    codes = [code for code, _ in results]
    refused = [text for code, text in results if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    others = {code for code in codes if code not in (grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED)}
    assert not others, f"unexpected codes {others}: {results}"
    assert refused, "a 16 MiB budget cannot hold 128 concurrent 4 MiB requests"
    assert codes.count(grpc.StatusCode.OK) >= 1, "requests that fit are served"
    assert all("--max-inflight-bytes 16777216" in text for text in refused), refused[0]
    growth = vm_kib(pid, "VmHWM") - baseline
    assert growth < OVERLOAD_GROWTH_BOUND_KIB, f"peak RSS grew {growth} KiB (bound {OVERLOAD_GROWTH_BOUND_KIB} KiB)"
    assert metric(gateway.admin_url, "onnx_gateway_inflight_request_bytes_peak") <= OVERLOAD_BUDGET
    # Everything was given back, the refusals are counted, and the server keeps serving.
    small_fp32_serves(stub)
    wait_for_metric(gateway.admin_url, "onnx_gateway_inflight_request_bytes", 0)
    assert metric(gateway.admin_url, "onnx_gateway_inflight_request_bytes_limit") == OVERLOAD_BUDGET
    assert metric(gateway.admin_url, "onnx_gateway_budget_refused_total") >= len(refused)
    for channel, _ in channels:
        channel.close()


def test_a_message_larger_than_the_budget_is_refused_and_the_stream_goes_on(gateway_factory):
    gateway = gateway_factory(TEST_MODELS, "--max-inflight-bytes", str(1 * MIB))
    channel, stub = open_stub(gateway)
    big = np.zeros(2 * MIB // 4, dtype=np.float32)
    code, text = call(stub, raw_request("identity_fp32", "FP32", [1, big.size], big.tobytes()))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, text
    assert "memory budget exceeded" in text and "--max-inflight-bytes 1048576" in text, text
    small_fp32_serves(stub)
    # On a stream, the messages before it are answered, then the stream ends with the budget's status
    # (the refused message's bytes were never read, so the stream cannot go on past it).
    small = np.arange(4, dtype=np.float32)
    requests = [
        raw_request("identity_fp32", "FP32", [1, 4], small.tobytes()),
        raw_request("identity_fp32", "FP32", [1, big.size], big.tobytes()),
    ]
    answers = []
    with pytest.raises(grpc.RpcError) as info:
        for answer in stub.ModelStreamInfer(iter(requests), timeout=CALL_TIMEOUT_S):
            answers.append(answer)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value
    assert "--max-inflight-bytes 1048576" in info.value.details()
    assert [a.error_message for a in answers] == [""]
    small_fp32_serves(stub)
    channel.close()


# 32 MiB of empty BYTES elements (8 Mi elements, 4 bytes each on the wire).
EMPTY_ELEMENTS = 8 * MIB


def test_bytes_elements_beyond_the_shape_are_refused_before_allocation(gateway_factory):
    gateway = gateway_factory(TEST_MODELS)
    channel, stub = open_stub(gateway)
    pid = gateway.process.pid
    baseline = vm_kib(pid, "VmHWM")
    raw = bytes(4 * EMPTY_ELEMENTS)
    # The shape declares 2 elements; the data holds 8 Mi of them.
    code, text = call(stub, raw_request("identity_bytes", "BYTES", [1, 2], raw))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, text
    assert "8388608 BYTES elements" in text and "needs 2" in text, text
    # Typed contents: same refusal.
    request = service_pb2.ModelInferRequest(model_name="identity_bytes")
    tensor = request.inputs.add(name="INPUT0", datatype="BYTES")
    tensor.shape.extend([1, 2])
    tensor.contents.bytes_contents.extend([b""] * 3)
    code, text = call(stub, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "needs 2" in text, text
    growth = vm_kib(pid, "VmHWM") - baseline
    # The request itself (32 MiB) plus its decoding buffer; no per-element list was built.
    assert growth < 3 * 32 * MIB // 1024, f"peak RSS grew {growth} KiB for a 32 MiB refused request"
    channel.close()


def test_many_empty_bytes_elements_are_charged_to_the_budget(gateway_factory):
    # Each BYTES element costs its handles in the engine and in ONNX Runtime (far more than its 4
    # wire bytes): the budget counts that cost before decoding, so it bounds this request too.
    gateway = gateway_factory(TEST_MODELS, "--max-inflight-bytes", str(256 * MIB))
    channel, stub = open_stub(gateway)
    pid = gateway.process.pid
    baseline = vm_kib(pid, "VmHWM")
    raw = bytes(4 * EMPTY_ELEMENTS)
    code, text = call(stub, raw_request("identity_bytes", "BYTES", [1, EMPTY_ELEMENTS], raw))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, text
    assert "--max-inflight-bytes 268435456" in text, text
    growth = vm_kib(pid, "VmHWM") - baseline
    assert growth < 3 * 32 * MIB // 1024, f"peak RSS grew {growth} KiB for a refused 32 MiB request"
    # A small BYTES request still works.
    items = [b"a", b"", b"xyz"]
    raw = b"".join(struct.pack("<I", len(i)) + i for i in items)
    response = stub.ModelInfer(raw_request("identity_bytes", "BYTES", [1, 3], raw), timeout=CALL_TIMEOUT_S)
    assert response.raw_output_contents[0] == raw
    channel.close()


@pytest.mark.parametrize(
    "model,datatype,field,value",
    [
        ("identity_int8", "INT8", "int_contents", 300),
        ("identity_int8", "INT8", "int_contents", -129),
        ("identity_int16", "INT16", "int_contents", 40000),
        ("identity_uint8", "UINT8", "uint_contents", 256),
        ("identity_uint16", "UINT16", "uint_contents", 70000),
    ],
)
def test_typed_values_out_of_range_are_refused(test_models_gateway, model, datatype, field, value):
    channel, stub = open_stub(test_models_gateway)
    request = service_pb2.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="INPUT0", datatype=datatype)
    tensor.shape.extend([1, 2])
    getattr(tensor.contents, field).extend([1, value])
    code, text = call(stub, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, text
    assert "INPUT0" in text and f"value {value} at index 1 is out of range for {datatype}" in text, text
    # In range: served, values intact.
    del getattr(tensor.contents, field)[:]
    getattr(tensor.contents, field).extend([1, 2])
    response = stub.ModelInfer(request, timeout=CALL_TIMEOUT_S)
    width = np.dtype(datatype.lower()).itemsize
    assert len(response.raw_output_contents[0]) == 2 * width
    channel.close()


def test_long_names_are_cut_in_error_texts(test_models_gateway):
    channel, stub = open_stub(test_models_gateway)
    long = "n" * 10_000
    # Unknown model, unknown input, unknown output: the text stays far below clients' metadata limits.
    code, text = call(stub, service_pb2.ModelInferRequest(model_name=long))
    assert code == grpc.StatusCode.NOT_FOUND and len(text) <= 4200, (code, len(text))
    request = raw_request("identity_fp32", "FP32", [1, 1], b"\0\0\0\0")
    request.inputs.add(name=long, datatype="FP32", shape=[1, 1])
    request.raw_input_contents.append(b"\0\0\0\0")
    code, text = call(stub, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, text
    assert len(text) < 1024 and "...(10000 bytes)" in text, text
    request = raw_request("identity_fp32", "FP32", [1, 1], b"\0\0\0\0")
    request.outputs.add(name=long)
    code, text = call(stub, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, text
    assert len(text) < 1024 and "...(10000 bytes)" in text, text
    small_fp32_serves(stub)
    channel.close()


# 16 MiB of empty typed BYTES elements (8 Mi elements of 2 wire bytes each).
TYPED_ELEMENTS = 8 * MIB
TYPED_WIRE = 2 * TYPED_ELEMENTS
# The codec walks the message before prost decodes it: a refused request costs its own buffer and
# little more. Measured: 22 MiB (before the walk: 313 MiB refused by count, 361 MiB by the budget).
TYPED_REFUSED_GROWTH_BOUND_KIB = (2 * TYPED_WIRE + 8 * MIB) // 1024


def typed_bytes_request(elements: int, shape: list[int]) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="identity_bytes")
    tensor = request.inputs.add(name="INPUT0", datatype="BYTES")
    tensor.shape.extend(shape)
    tensor.contents.bytes_contents.extend([b""] * elements)
    return request


def test_typed_bytes_beyond_the_shape_are_refused_before_prost_allocates_them(gateway_factory):
    gateway = gateway_factory(TEST_MODELS, "--max-inflight-bytes", "0")
    channel, stub = open_stub(gateway)
    pid = gateway.process.pid
    baseline = vm_kib(pid, "VmHWM")
    code, text = call(stub, typed_bytes_request(TYPED_ELEMENTS, [1, 2]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, text
    assert text == "input 'INPUT0' has 8388608 elements in its typed contents but its shape needs 2", text
    growth = vm_kib(pid, "VmHWM") - baseline
    assert growth < TYPED_REFUSED_GROWTH_BOUND_KIB, f"peak RSS grew {growth} KiB for a refused 16 MiB request"
    # Elements in a field the datatype does not read are refused too (prost would build them).
    request = raw_request("identity_fp32", "FP32", [1, 1], b"\0\0\0\0")
    request.inputs[0].contents.bytes_contents.extend([b""] * 1000)
    del request.raw_input_contents[:]
    request.inputs[0].contents.fp32_contents.append(1.0)
    code, text = call(stub, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "1000 elements in bytes_contents" in text, text
    small_fp32_serves(stub)
    channel.close()


def test_typed_bytes_are_charged_to_the_budget_before_prost_decodes_them(gateway_factory):
    gateway = gateway_factory(TEST_MODELS, "--max-inflight-bytes", str(256 * MIB))
    channel, stub = open_stub(gateway)
    pid = gateway.process.pid
    baseline = vm_kib(pid, "VmHWM")
    code, text = call(stub, typed_bytes_request(TYPED_ELEMENTS, [1, TYPED_ELEMENTS]))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, text
    assert "--max-inflight-bytes 268435456" in text, text
    growth = vm_kib(pid, "VmHWM") - baseline
    assert growth < TYPED_REFUSED_GROWTH_BOUND_KIB, f"peak RSS grew {growth} KiB for a refused 16 MiB request"
    # A small typed BYTES request is served, also on a stream.
    request = typed_bytes_request(0, [1, 3])
    request.inputs[0].contents.bytes_contents.extend([b"a", b"", b"xyz"])
    response = stub.ModelInfer(request, timeout=CALL_TIMEOUT_S)
    assert response.raw_output_contents[0] == b"".join(struct.pack("<I", len(i)) + i for i in (b"a", b"", b"xyz"))
    wait_for_metric(gateway.admin_url, "onnx_gateway_inflight_request_bytes", 0)
    channel.close()


def test_a_stream_message_whose_contents_miss_its_shape_is_answered_and_the_stream_goes_on(test_models_gateway):
    # As Triton: the bad message's answer carries the reason, under its id; the others are served.
    channel, stub = open_stub(test_models_gateway)
    values = np.arange(4, dtype=np.float32).tobytes()
    requests = [raw_request("identity_fp32", "FP32", [1, 4], values), typed_bytes_request(5, [1, 2]),
                raw_request("identity_fp32", "FP32", [1, 4], values)]
    for request, request_id in zip(requests, ["good-0", "bad", "good-2"]):
        request.id = request_id
    answers = {}
    for answer in stub.ModelStreamInfer(iter(requests), timeout=CALL_TIMEOUT_S):
        answers[answer.infer_response.id] = answer
    assert sorted(answers) == ["bad", "good-0", "good-2"]
    assert "has 5 elements in its typed contents but its shape needs 2" in answers["bad"].error_message
    assert answers["bad"].infer_response.model_name == "identity_bytes"
    for good_id in ("good-0", "good-2"):
        assert answers[good_id].error_message == ""
        assert answers[good_id].infer_response.raw_output_contents[0] == values
    channel.close()


def test_a_stream_message_prost_cannot_decode_ends_the_stream_with_internal(test_models_gateway):
    # Not a ModelInferRequest at all (a field header that promises more bytes than follow): nothing
    # can be answered for it; the stream ends with the decoder's status, not a clean end.
    channel = grpc.insecure_channel(test_models_gateway.url)
    call = channel.stream_stream(
        "/inference.GRPCInferenceService/ModelStreamInfer",
        request_serializer=lambda raw: raw,
        response_deserializer=service_pb2.ModelStreamInferResponse.FromString,
    )
    good = raw_request("identity_fp32", "FP32", [1, 4], np.arange(4, dtype=np.float32).tobytes())
    answers = []
    with pytest.raises(grpc.RpcError) as info:
        for answer in call(iter([good.SerializeToString(), b"\x0a\xff\x01"]), timeout=CALL_TIMEOUT_S):
            answers.append(answer)
    assert info.value.code() == grpc.StatusCode.INTERNAL, info.value
    assert [a.error_message for a in answers] == [""]
    channel.close()


def gzip_stub(gateway):
    channel = grpc.insecure_channel(
        gateway.url,
        compression=grpc.Compression.Gzip,
        options=[("grpc.max_send_message_length", GRPC_MAX), ("grpc.max_receive_message_length", GRPC_MAX)],
    )
    return channel, service_pb2_grpc.GRPCInferenceServiceStub(channel)


def test_gzip_requests_are_served(test_models_gateway):
    client = test_models_gateway.client()
    values = np.arange(8, dtype=np.float32).reshape(1, 8)
    tensor = grpcclient.InferInput("INPUT0", [1, 8], "FP32")
    tensor.set_data_from_numpy(values)
    for algorithm in ("gzip", "deflate"):
        result = client.infer("identity_fp32", [tensor], compression_algorithm=algorithm)
        assert result.as_numpy("OUTPUT0").tolist() == values.tolist()
    channel, stub = gzip_stub(test_models_gateway)
    small_fp32_serves(stub)
    channel.close()


# 48 MiB of zeros compress to about 48 KiB: what they decompress to is reserved before it exists.
GZIP_PLAIN_BYTES = 48 * MIB


def test_a_compressed_request_is_reserved_at_its_decompressed_size(gateway_factory):
    gateway = gateway_factory(TEST_MODELS, "--max-inflight-bytes", str(16 * MIB))
    channel, stub = gzip_stub(gateway)
    pid = gateway.process.pid
    elements = GZIP_PLAIN_BYTES // 4
    request = raw_request("identity_fp32", "FP32", [1, elements], bytes(GZIP_PLAIN_BYTES))
    assert len(gzip.compress(request.SerializeToString())) < MIB
    baseline = vm_kib(pid, "VmHWM")
    code, text = call(stub, request)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, text
    assert "--max-inflight-bytes 16777216" in text, text
    # Past the message size limit (64 MiB), a compressed message is refused while being sized.
    big = raw_request("identity_fp32", "FP32", [1, 20 * MIB], bytes(80 * MIB))
    code, text = call(stub, big)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "size limit" in text, text
    growth = vm_kib(pid, "VmHWM") - baseline
    # Neither was decompressed into memory (48 and 80 MiB); what the client sent is small.
    assert growth < 16 * MIB // 1024, f"peak RSS grew {growth} KiB"
    small_fp32_serves(stub)
    wait_for_metric(gateway.admin_url, "onnx_gateway_inflight_request_bytes", 0)
    channel.close()
