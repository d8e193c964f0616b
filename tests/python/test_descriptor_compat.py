"""The gateway's wire contract is Triton's, message by message.

The descriptors the running gateway publishes through gRPC server reflection (both the v1 and the
v1alpha reflection services) are compared with the ones compiled into the tritonclient package,
which is the oracle: every message (nested ones included), field name, number, type, label, type
name, oneof and proto3-optional flag, every enum value, and every method of GRPCInferenceService
with its request/response types and streaming flags.
"""
from __future__ import annotations

import copy

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2
from tritonclient.grpc import model_config_pb2, service_pb2

SERVICE = "inference.GRPCInferenceService"
PACKAGE = "inference"
# v1 and v1alpha reflection messages are identical on the wire; only the service name differs, so
# the v1alpha classes that grpcio-reflection ships serve both.
REFLECTION_METHODS = {
    "v1": "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "v1alpha": "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
}

FieldProto = descriptor_pb2.FieldDescriptorProto


# ---- building a comparable picture of a set of .proto files ----------------------------------


def _field(field: FieldProto, message: descriptor_pb2.DescriptorProto) -> dict:
    return {
        "number": field.number,
        "type": FieldProto.Type.Name(field.type),
        "label": FieldProto.Label.Name(field.label),
        "type_name": field.type_name.lstrip("."),
        "oneof": message.oneof_decl[field.oneof_index].name if field.HasField("oneof_index") else None,
        "proto3_optional": field.proto3_optional,
    }


def _index_message(prefix: str, message: descriptor_pb2.DescriptorProto, out: dict) -> None:
    name = f"{prefix}.{message.name}"
    out[name] = {
        "kind": "message",
        "fields": {f.name: _field(f, message) for f in message.field},
        "oneofs": sorted(o.name for o in message.oneof_decl),
        "nested_messages": sorted(n.name for n in message.nested_type),
        "nested_enums": sorted(e.name for e in message.enum_type),
        "map_entry": message.options.map_entry,
    }
    for nested in message.nested_type:
        _index_message(name, nested, out)
    for enum in message.enum_type:
        _index_enum(name, enum, out)


def _index_enum(prefix: str, enum: descriptor_pb2.EnumDescriptorProto, out: dict) -> None:
    out[f"{prefix}.{enum.name}"] = {
        "kind": "enum",
        "values": {v.name: v.number for v in enum.value},
    }


def _index_service(prefix: str, service: descriptor_pb2.ServiceDescriptorProto, out: dict) -> None:
    out[f"{prefix}.{service.name}"] = {
        "kind": "service",
        "methods": {
            m.name: {
                "input_type": m.input_type.lstrip("."),
                "output_type": m.output_type.lstrip("."),
                "client_streaming": m.client_streaming,
                "server_streaming": m.server_streaming,
            }
            for m in service.method
        },
    }


def index_files(files: list[descriptor_pb2.FileDescriptorProto], package: str = PACKAGE) -> dict:
    """Every message, enum and service of `package` in `files`, by full name."""
    out: dict = {}
    for file in files:
        if file.package != package:
            continue
        for message in file.message_type:
            _index_message(package, message, out)
        for enum in file.enum_type:
            _index_enum(package, enum, out)
        for service in file.service:
            _index_service(package, service, out)
    return out


def compare(expected: dict, actual: dict) -> list[str]:
    """Human-readable differences between two indexes; empty when they match exactly."""
    problems = []
    for name in sorted(expected.keys() - actual.keys()):
        problems.append(f"{name}: missing ({expected[name]['kind']})")
    for name in sorted(actual.keys() - expected.keys()):
        problems.append(f"{name}: not in Triton's contract ({actual[name]['kind']})")
    for name in sorted(expected.keys() & actual.keys()):
        want, got = expected[name], actual[name]
        if want["kind"] != got["kind"]:
            problems.append(f"{name}: is a {got['kind']}, Triton's is a {want['kind']}")
            continue
        members = {"message": "fields", "enum": "values", "service": "methods"}[want["kind"]]
        for member in sorted(want[members].keys() | got[members].keys()):
            w, g = want[members].get(member), got[members].get(member)
            if w != g:
                problems.append(f"{name}.{member}: expected {w}, got {g}")
        for key in want:
            if key not in ("kind", members) and want[key] != got[key]:
                problems.append(f"{name} {key}: expected {want[key]}, got {got[key]}")
    return problems


def triton_files() -> list[descriptor_pb2.FileDescriptorProto]:
    files = []
    for module in (service_pb2, model_config_pb2):
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        files.append(proto)
    return files


# ---- reflection client ------------------------------------------------------------------------


def reflect(channel: grpc.Channel, method: str, requests: list) -> list:
    call = channel.stream_stream(
        method,
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    responses = list(call(iter(requests), timeout=10))
    assert len(responses) == len(requests), f"{len(requests)} reflection requests, {len(responses)} answers"
    for response in responses:
        assert not response.HasField("error_response"), (
            f"reflection error {response.error_response.error_code}: "
            f"{response.error_response.error_message}"
        )
    return responses


def reflected_files(channel: grpc.Channel, method: str, symbol: str) -> list[descriptor_pb2.FileDescriptorProto]:
    """The file defining `symbol` and, transitively, every file it imports."""
    files: dict[str, descriptor_pb2.FileDescriptorProto] = {}
    requests = [reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)]
    while requests:
        wanted = set()
        for response in reflect(channel, method, requests):
            for raw in response.file_descriptor_response.file_descriptor_proto:
                file = descriptor_pb2.FileDescriptorProto.FromString(raw)
                files[file.name] = file
        for file in list(files.values()):
            wanted.update(dep for dep in file.dependency if dep not in files)
        requests = [reflection_pb2.ServerReflectionRequest(file_by_filename=n) for n in sorted(wanted)]
    return list(files.values())


@pytest.fixture(scope="module")
def channel(models_gateway):
    with grpc.insecure_channel(models_gateway.url) as ch:
        yield ch


# ---- tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", sorted(REFLECTION_METHODS))
def test_reflection_lists_inference_service(channel, version):
    (response,) = reflect(
        channel, REFLECTION_METHODS[version], [reflection_pb2.ServerReflectionRequest(list_services="")]
    )
    services = {s.name for s in response.list_services_response.service}
    assert SERVICE in services


@pytest.mark.parametrize("version", sorted(REFLECTION_METHODS))
def test_reflected_descriptors_match_tritonclient(channel, version):
    files = reflected_files(channel, REFLECTION_METHODS[version], SERVICE)
    expected = index_files(triton_files())
    actual = index_files(files)
    assert f"{PACKAGE}.ModelConfig" in actual, "model_config.proto was not served as a dependency"
    problems = compare(expected, actual)
    assert not problems, "wire contract differs from tritonclient's:\n  " + "\n  ".join(problems)


def test_oracle_covers_the_whole_contract():
    """The oracle itself is complete: both files, the service with its streaming method, the enums."""
    expected = index_files(triton_files())
    service = expected[SERVICE]
    assert service["methods"]["ModelStreamInfer"] == {
        "input_type": "inference.ModelInferRequest",
        "output_type": "inference.ModelStreamInferResponse",
        "client_streaming": True,
        "server_streaming": True,
    }
    assert service["methods"]["ModelInfer"]["client_streaming"] is False
    assert expected["inference.ModelInferRequest"]["fields"]["raw_input_contents"]["number"] == 7
    assert expected["inference.DataType"]["values"]["TYPE_BF16"] == 14
    assert expected["inference.ModelInferRequest.ParametersEntry"]["map_entry"] is True
    assert len([n for n, v in expected.items() if v["kind"] == "message"]) > 60


def _mutated(mutate) -> dict:
    files = copy.deepcopy(triton_files())
    mutate({f.name: f for f in files})
    return index_files(files)


def _message(files: dict, path: str) -> descriptor_pb2.DescriptorProto:
    file_name, *names = path.split("/")
    found = next(m for m in files[file_name].message_type if m.name == names[0])
    for name in names[1:]:
        found = next(m for m in found.nested_type if m.name == name)
    return found


@pytest.mark.parametrize(
    "mutation, expected_problem",
    [
        (
            lambda f: setattr(_message(f, "grpc_service.proto/ModelInferRequest").field[2], "number", 99),
            "inference.ModelInferRequest.id",
        ),
        (
            lambda f: setattr(
                _message(f, "grpc_service.proto/ModelInferRequest/InferInputTensor").field[1],
                "type",
                FieldProto.TYPE_BYTES,
            ),
            "inference.ModelInferRequest.InferInputTensor.datatype",
        ),
        (
            lambda f: setattr(
                _message(f, "grpc_service.proto/ModelInferRequest").field[4], "label", FieldProto.LABEL_OPTIONAL
            ),
            "inference.ModelInferRequest.inputs",
        ),
        (
            lambda f: setattr(f["model_config.proto"].enum_type[0].value[1], "number", 42),
            "inference.DataType.TYPE_BOOL",
        ),
        (
            lambda f: setattr(f["grpc_service.proto"].service[0].method[6], "server_streaming", False),
            "inference.GRPCInferenceService.ModelStreamInfer",
        ),
        (
            lambda f: _message(f, "grpc_service.proto/InferParameter").oneof_decl[0].__setattr__(
                "name", "renamed"
            ),
            "inference.InferParameter",
        ),
    ],
    ids=["field-number", "field-type", "field-label", "enum-value", "streaming-flag", "oneof-name"],
)
def test_compare_detects_differences(mutation, expected_problem):
    """The comparison is not vacuous: one changed detail of the oracle is reported, by name."""
    problems = compare(index_files(triton_files()), _mutated(mutation))
    assert problems, "a mutated contract compared equal"
    assert any(p.startswith(expected_problem) for p in problems), problems
