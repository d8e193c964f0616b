"""System shared memory through the real tritonclient: regions created with
tritonclient.utils.shared_memory, registered over gRPC, used for inputs and outputs of models/add_sub
(INPUT0, INPUT1 FP32 [16] -> OUTPUT0 = sum, OUTPUT1 = difference; max_batch_size 8).

Starts its own gateways (shared memory on, and off) so the flag under test is explicit:
GATEWAY_BIN (default target/debug/onnx-gateway) on the example repository models/.
"""
from __future__ import annotations

import base64
import glob
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

ROOT = Path(__file__).resolve().parents[2]
MODEL = "add_sub"
SHAPE = [1, 16]
TENSOR_BYTES = 16 * 4  # FP32[1, 16]
LISTENING = re.compile(r"gRPC listening addr=(\S+)")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class Gateway:
    """A gateway process started on port 0; its address is read from its startup log."""

    def __init__(self, *extra_args: str):
        binary = os.environ.get("GATEWAY_BIN", str(ROOT / "target" / "debug" / "onnx-gateway"))
        args = [
            binary,
            "--model-repository", str(ROOT / "models"),
            "--grpc-address", "127.0.0.1", "--grpc-port", "0",
            "--metrics-address", "127.0.0.1", "--metrics-port", "0",
            "--http-address", "127.0.0.1", "--http-port", "0",
            *extra_args,
        ]
        env = dict(os.environ)
        library = _onnxruntime_library()
        if library and "ORT_DYLIB_PATH" not in env:
            env["ORT_DYLIB_PATH"] = library
        self.stderr_lines: list[str] = []
        self._address_found = threading.Event()
        self.url = ""
        self.process = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        # Drained on a thread for the whole run: a full stderr pipe would block the gateway.
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        if not self._address_found.wait(60) or not self.url:
            self.stop()
            raise RuntimeError("gateway did not log its gRPC address:\n" + self.log())
        self.client = grpcclient.InferenceServerClient(self.url)
        self._wait_ready()

    def _drain_stderr(self):
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.stderr_lines.append(line)
            match = LISTENING.search(ANSI.sub("", line))
            if match and not self._address_found.is_set():
                self.url = match.group(1)
                self._address_found.set()
        # End of stream: the process exited; wake the constructor instead of letting it time out.
        self._address_found.set()

    def _wait_ready(self):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("gateway exited during startup:\n" + self.log())
            try:
                if self.client.is_server_ready():
                    return
            except InferenceServerException:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("gateway never became ready:\n" + self.log())

    def log(self) -> str:
        return "".join(self.stderr_lines[-50:])

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _onnxruntime_library() -> str | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    capi = Path(onnxruntime.__file__).parent / "capi"
    found = sorted(glob.glob(str(capi / "libonnxruntime.so*")))
    return found[-1] if found else None


@pytest.fixture(scope="module")
def gateway():
    started = Gateway("--allow-client-shm=true")
    yield started
    started.stop()


@pytest.fixture
def client(gateway):
    yield gateway.client
    # Each test starts from an empty registry, whatever it left behind.
    gateway.client.unregister_system_shared_memory()


@pytest.fixture
def regions():
    """Creates client-side regions (unique keys) and destroys them after the test."""
    handles = []

    def create(label: str, byte_size: int):
        key = f"/onnx_gateway_test_{os.getpid()}_{label}"
        handle = shm.create_shared_memory_region(label, key, byte_size)
        handles.append(handle)
        return handle, key

    yield create
    for handle in handles:
        shm.destroy_shared_memory_region(handle)


def _inputs():
    rng = np.random.default_rng(7)
    a = rng.standard_normal(SHAPE, dtype=np.float32)
    b = rng.standard_normal(SHAPE, dtype=np.float32)
    return a, b


def _inline_infer(client, a, b):
    inputs = [grpcclient.InferInput("INPUT0", SHAPE, "FP32"), grpcclient.InferInput("INPUT1", SHAPE, "FP32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    result = client.infer(MODEL, inputs)
    return result.as_numpy("OUTPUT0"), result.as_numpy("OUTPUT1")


def _shm_inputs(region: str, in0_offset: int = 0, in1_offset: int = TENSOR_BYTES, byte_size: int = TENSOR_BYTES):
    inputs = [grpcclient.InferInput("INPUT0", SHAPE, "FP32"), grpcclient.InferInput("INPUT1", SHAPE, "FP32")]
    inputs[0].set_shared_memory(region, byte_size, offset=in0_offset)
    inputs[1].set_shared_memory(region, byte_size, offset=in1_offset)
    return inputs


def _shm_outputs(region: str, byte_size: int = TENSOR_BYTES):
    outputs = [grpcclient.InferRequestedOutput("OUTPUT0"), grpcclient.InferRequestedOutput("OUTPUT1")]
    outputs[0].set_shared_memory(region, byte_size, offset=0)
    outputs[1].set_shared_memory(region, byte_size, offset=byte_size)
    return outputs


def _register_io(client, regions, a, b):
    """Input region holding INPUT0 then INPUT1, output region with room for both outputs."""
    in_handle, in_key = regions("input_data", 2 * TENSOR_BYTES)
    out_handle, out_key = regions("output_data", 2 * TENSOR_BYTES)
    shm.set_shared_memory_region(in_handle, [a, b])
    client.register_system_shared_memory("input_data", in_key, 2 * TENSOR_BYTES)
    client.register_system_shared_memory("output_data", out_key, 2 * TENSOR_BYTES)
    return in_handle, out_handle


def _expect_error(code: str, call, *args, **kwargs) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call(*args, **kwargs)
    assert info.value.status() == f"StatusCode.{code}", str(info.value)
    return info.value


def _still_serving(client):
    a, b = _inputs()
    out0, out1 = _inline_infer(client, a, b)
    np.testing.assert_allclose(out0, a + b, rtol=1e-6)
    np.testing.assert_allclose(out1, a - b, rtol=1e-6)


def test_server_metadata_lists_system_shared_memory(client):
    assert "system_shared_memory" in client.get_server_metadata().extensions


def test_inputs_and_outputs_through_regions_match_inline(client, regions):
    a, b = _inputs()
    _, out_handle = _register_io(client, regions, a, b)

    result = client.infer(MODEL, _shm_inputs("input_data"), outputs=_shm_outputs("output_data"))

    # The response describes the outputs but carries none of their bytes.
    for name in ("OUTPUT0", "OUTPUT1"):
        output = result.get_output(name)
        assert output is not None and list(output.shape) == SHAPE and output.datatype == "FP32"
    assert all(len(raw) == 0 for raw in result.get_response().raw_output_contents)

    out0 = shm.get_contents_as_numpy(out_handle, np.float32, SHAPE, offset=0)
    out1 = shm.get_contents_as_numpy(out_handle, np.float32, SHAPE, offset=TENSOR_BYTES)
    inline0, inline1 = _inline_infer(client, a, b)
    np.testing.assert_array_equal(out0, inline0)
    np.testing.assert_array_equal(out1, inline1)
    np.testing.assert_allclose(out0, a + b, rtol=1e-6)
    np.testing.assert_allclose(out1, a - b, rtol=1e-6)


def test_shared_and_inline_tensors_mix_in_one_request(client, regions):
    a, b = _inputs()
    _, out_handle = _register_io(client, regions, a, b)

    # INPUT0 from the region, INPUT1 inline; OUTPUT0 into the region, OUTPUT1 inline.
    inputs = [grpcclient.InferInput("INPUT0", SHAPE, "FP32"), grpcclient.InferInput("INPUT1", SHAPE, "FP32")]
    inputs[0].set_shared_memory("input_data", TENSOR_BYTES)
    inputs[1].set_data_from_numpy(b)
    outputs = [grpcclient.InferRequestedOutput("OUTPUT0"), grpcclient.InferRequestedOutput("OUTPUT1")]
    outputs[0].set_shared_memory("output_data", TENSOR_BYTES)
    result = client.infer(MODEL, inputs, outputs=outputs)

    np.testing.assert_allclose(shm.get_contents_as_numpy(out_handle, np.float32, SHAPE), a + b, rtol=1e-6)
    # tritonclient finds OUTPUT1's bytes by position, so the shared-memory output must keep its
    # (empty) place in raw_output_contents, as Triton does.
    np.testing.assert_allclose(result.as_numpy("OUTPUT1").reshape(SHAPE), a - b, rtol=1e-6)


def test_status_lists_what_was_registered(client, regions):
    _, key = regions("status_a", 256)
    client.register_system_shared_memory("status_a", key, 128, offset=64)
    client.register_system_shared_memory("status_b", key, 32)

    status = client.get_system_shared_memory_status()
    assert set(status.regions) == {"status_a", "status_b"}
    a = status.regions["status_a"]
    assert (a.name, a.key, a.offset, a.byte_size) == ("status_a", key, 64, 128)

    one = client.get_system_shared_memory_status("status_b")
    assert set(one.regions) == {"status_b"}
    assert one.regions["status_b"].byte_size == 32

    as_json = client.get_system_shared_memory_status(as_json=True)
    assert {r["name"] for r in as_json["regions"].values()} == {"status_a", "status_b"}

    error = _expect_error("NOT_FOUND", client.get_system_shared_memory_status, "never_registered")
    assert "never_registered" in error.message()


def test_unregister_one_then_all(client, regions):
    _, key = regions("unreg", 64)
    for name in ("unreg_a", "unreg_b", "unreg_c"):
        client.register_system_shared_memory(name, key, 64)

    client.unregister_system_shared_memory("unreg_a")
    assert set(client.get_system_shared_memory_status().regions) == {"unreg_b", "unreg_c"}
    # Unregistering a name that is not registered succeeds, as in Triton.
    client.unregister_system_shared_memory("unreg_a")

    client.unregister_system_shared_memory()
    assert len(client.get_system_shared_memory_status().regions) == 0
    # A freed name can be registered again.
    client.register_system_shared_memory("unreg_a", key, 64)


def test_registration_errors(client, regions):
    _, key = regions("reg_err", 64)
    client.register_system_shared_memory("reg_err", key, 64)

    error = _expect_error("ALREADY_EXISTS", client.register_system_shared_memory, "reg_err", key, 64)
    assert "reg_err" in error.message()
    error = _expect_error("INVALID_ARGUMENT", client.register_system_shared_memory, "too_big", key, 65)
    assert "too_big" in error.message()
    _expect_error("INVALID_ARGUMENT", client.register_system_shared_memory, "past_end", key, 8, offset=60)
    _expect_error("INVALID_ARGUMENT", client.register_system_shared_memory, "escape", "/../etc/passwd", 8)
    # Triton answers INTERNAL for a key it cannot open.
    error = _expect_error(
        "INTERNAL", client.register_system_shared_memory, "missing", f"/onnx_gateway_missing_{os.getpid()}", 8
    )
    assert "onnx_gateway_missing" in error.message()
    assert set(client.get_system_shared_memory_status().regions) == {"reg_err"}


def test_out_of_bounds_input_is_invalid_argument_and_the_server_keeps_serving(client, regions):
    a, b = _inputs()
    _register_io(client, regions, a, b)

    # Offset past the end of the region.
    error = _expect_error(
        "INVALID_ARGUMENT", client.infer, MODEL, _shm_inputs("input_data", in1_offset=3 * TENSOR_BYTES)
    )
    assert "input_data" in error.message()
    # Offset inside, but offset + byte size past the end.
    error = _expect_error(
        "INVALID_ARGUMENT", client.infer, MODEL, _shm_inputs("input_data", in1_offset=TENSOR_BYTES + 4)
    )
    assert "input_data" in error.message()
    _still_serving(client)


def test_out_of_bounds_output_is_invalid_argument(client, regions):
    a, b = _inputs()
    _register_io(client, regions, a, b)
    outputs = [grpcclient.InferRequestedOutput("OUTPUT0")]
    outputs[0].set_shared_memory("output_data", TENSOR_BYTES, offset=TENSOR_BYTES + 8)
    error = _expect_error("INVALID_ARGUMENT", client.infer, MODEL, _shm_inputs("input_data"), outputs=outputs)
    assert "output_data" in error.message()
    _still_serving(client)


def test_unknown_region_is_invalid_argument(client):
    error = _expect_error("INVALID_ARGUMENT", client.infer, MODEL, _shm_inputs("no_such_region"))
    assert "no_such_region" in error.message()

    a, b = _inputs()
    inputs = [grpcclient.InferInput("INPUT0", SHAPE, "FP32"), grpcclient.InferInput("INPUT1", SHAPE, "FP32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    outputs = [grpcclient.InferRequestedOutput("OUTPUT0")]
    outputs[0].set_shared_memory("no_such_output_region", TENSOR_BYTES)
    error = _expect_error("INVALID_ARGUMENT", client.infer, MODEL, inputs, outputs=outputs)
    assert "no_such_output_region" in error.message()
    _still_serving(client)


def test_byte_size_that_does_not_match_the_tensor_is_invalid_argument(client, regions):
    a, b = _inputs()
    _register_io(client, regions, a, b)
    # In bounds, but 60 bytes cannot hold FP32[1, 16].
    error = _expect_error(
        "INVALID_ARGUMENT", client.infer, MODEL, _shm_inputs("input_data", byte_size=TENSOR_BYTES - 4)
    )
    assert "INPUT0" in error.message()

    outputs = [grpcclient.InferRequestedOutput("OUTPUT0")]
    outputs[0].set_shared_memory("output_data", TENSOR_BYTES // 2)
    error = _expect_error("INVALID_ARGUMENT", client.infer, MODEL, _shm_inputs("input_data"), outputs=outputs)
    assert "OUTPUT0" in error.message()
    _still_serving(client)


def test_unregistering_while_requests_run_never_breaks_the_server(client, regions):
    a, b = _inputs()
    in_handle, in_key = regions("churn_in", 2 * TENSOR_BYTES)
    shm.set_shared_memory_region(in_handle, [a, b])
    stop = threading.Event()
    failures: list[str] = []

    def churn():
        while not stop.is_set():
            try:
                client.register_system_shared_memory("churn_in", in_key, 2 * TENSOR_BYTES)
            except InferenceServerException as e:
                if e.status() != "StatusCode.ALREADY_EXISTS":
                    failures.append(str(e))
            client.unregister_system_shared_memory("churn_in")

    churner = threading.Thread(target=churn)
    churner.start()
    try:
        successes = 0
        for _ in range(200):
            try:
                result = client.infer(MODEL, _shm_inputs("churn_in"))
            except InferenceServerException as e:
                # Losing the race with unregister is a client error, never a server failure.
                assert e.status() == "StatusCode.INVALID_ARGUMENT", str(e)
                continue
            successes += 1
            np.testing.assert_allclose(result.as_numpy("OUTPUT0").reshape(SHAPE), a + b, rtol=1e-6)
    finally:
        stop.set()
        churner.join()
    assert not failures, failures
    assert client.is_server_ready()
    _still_serving(client)


def test_cuda_shared_memory_register_is_unimplemented(client):
    handle = base64.b64encode(bytes(64))
    error = _expect_error("UNIMPLEMENTED", client.register_cuda_shared_memory, "cuda", handle, 0, 64)
    assert error.message()
    # Status and unregister over no CUDA regions succeed, as on a CPU-only Triton (test_compat.py).
    client.unregister_cuda_shared_memory()


def test_with_client_shm_disabled_registration_is_refused(regions):
    gateway = Gateway("--allow-client-shm=false")
    try:
        client = gateway.client
        _, key = regions("disabled", 64)
        error = _expect_error("UNAVAILABLE", client.register_system_shared_memory, "disabled", key, 64)
        assert "--allow-client-shm" in error.message()
        _expect_error("UNAVAILABLE", client.get_system_shared_memory_status)
        # A request naming a region fails; inline requests are unaffected.
        with pytest.raises(InferenceServerException):
            client.infer(MODEL, _shm_inputs("disabled"))
        _still_serving(client)
    finally:
        gateway.stop()
