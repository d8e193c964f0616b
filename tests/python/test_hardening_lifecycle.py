"""Config bounds and the model lifecycle under abuse, against the real binary: config overrides that
used to hang or exhaust the server, SIGTERM during a long load, --model-load-timeout-secs, unload
racing a load, concurrent load/unload/infer, path escapes and a truncated shared-memory object.

A model whose sessions take a second or more to build (a long chain of Add nodes, generated here)
stands in for a large model. Every wait has a deadline; sleeps only pace loops."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from harness import Gateway, add_sub_inputs, assert_add_sub_serves, infer_add_sub

DEADLINE_S = 60.0
# Enough Add nodes that ONNX Runtime takes about a second to build one session.
SLOW_NODES = 2000


def write_slow_model(repository: Path, count: int) -> None:
    """`slow`: y = x + constants through SLOW_NODES Add nodes, with `count` CPU instances."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, initializers, previous = [], [], "x"
    for i in range(SLOW_NODES):
        initializers.append(numpy_helper.from_array(np.full((16,), 1.0, np.float32), f"c{i}"))
        out = "y" if i == SLOW_NODES - 1 else f"t{i}"
        nodes.append(helper.make_node("Add", [previous, f"c{i}"], [out]))
        previous = out
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 16])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    version = repository / "slow" / "1"
    version.mkdir(parents=True)
    (version / "model.onnx").write_bytes(model.SerializeToString())
    (repository / "slow" / "config.pbtxt").write_text(
        'name: "slow"\nbackend: "onnxruntime"\nmax_batch_size: 4\n'
        'input [ { name: "x" data_type: TYPE_FP32 dims: [ 16 ] } ]\n'
        'output [ { name: "y" data_type: TYPE_FP32 dims: [ 16 ] } ]\n'
        f"instance_group [ {{ count: {count} kind: KIND_CPU }} ]\n"
        'parameters { key: "intra_op_thread_count" value: { string_value: "1" } }\n'
    )


def index_of(client) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for row in client.get_model_repository_index(as_json=True).get("models", []):
        rows.setdefault(row["name"], []).append(row)
    return rows


def refused(call, code: str) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as error:
        call()
    assert error.value.status() == f"StatusCode.{code}", error.value.message()
    return error.value


def wait_for(predicate, what: str, timeout: float = DEADLINE_S):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"not {what} after {timeout}s")
        time.sleep(0.02)


@pytest.fixture
def explicit(gateway_factory, repo_copy):
    def start(*extra: str, slow_count: int | None = None, load=("add_sub",)):
        repository = repo_copy("add_sub", "digits_classifier")
        if slow_count is not None:
            write_slow_model(repository, slow_count)
        args = ["--model-control-mode", "explicit"]
        for name in load:
            args += ["--load-model", name]
        return gateway_factory(repository, *args, *extra)

    return start


# ---- config bounds through RepositoryModelLoad overrides ---------------------------------------


def test_a_huge_batch_delay_override_is_refused_and_the_old_version_serves(explicit):
    client = explicit().client()
    config = client.get_model_config("add_sub", as_json=True)["config"]
    config["dynamic_batching"] = {
        "preferred_batch_size": [8],
        "max_queue_delay_microseconds": "18446744073709551615",
    }
    error = refused(lambda: client.load_model("add_sub", config=json.dumps(config)), "INVALID_ARGUMENT")
    assert "max_queue_delay_microseconds" in error.message()
    assert "bound 60000000" in error.message()
    # The previous version keeps serving, with its own config; a lone request returns.
    served = client.get_model_config("add_sub", as_json=True)["config"]
    assert "max_queue_delay_microseconds" not in served.get("dynamic_batching", {})
    assert_add_sub_serves(client)
    # A delay within the bound is accepted, and a request that does not fill a batch returns.
    config["dynamic_batching"]["max_queue_delay_microseconds"] = "2000"
    client.load_model("add_sub", config=json.dumps(config))
    a, b = add_sub_inputs(batch=1)
    assert np.array_equal(infer_add_sub(client, a, b, client_timeout=30).as_numpy("OUTPUT0"), a + b)


def test_an_instance_count_of_100000_is_refused_before_anything_is_built(explicit):
    gateway = explicit("--max-instances-per-model", "8")
    client = gateway.client()
    config = client.get_model_config("add_sub", as_json=True)["config"]
    config["instance_group"] = [{"count": 100000, "kind": "KIND_CPU"}]
    error = refused(lambda: client.load_model("add_sub", config=json.dumps(config)), "INVALID_ARGUMENT")
    assert "instance_group[0].count is 100000" in error.message()
    assert "bound 8" in error.message() and "--max-instances-per-model" in error.message()
    # Over the bound in all, though each group is within it.
    config["instance_group"] = [{"count": 5, "kind": "KIND_CPU"}, {"count": 5, "kind": "KIND_CPU"}]
    error = refused(lambda: client.load_model("add_sub", config=json.dumps(config)), "INVALID_ARGUMENT")
    assert "10 instances in all" in error.message()
    assert_add_sub_serves(client)
    assert "model loaded" not in gateway.stderr().split("startup complete")[-1]


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("max_batch_size", 1 << 20, "max_batch_size is 1048576"),
        ("default_model_filename", "../../digits_classifier/1/model.onnx", "default_model_filename"),
    ],
)
def test_other_bounded_fields_name_themselves(explicit, field, value, needle):
    client = explicit().client()
    config = client.get_model_config("add_sub", as_json=True)["config"]
    config[field] = value
    error = refused(lambda: client.load_model("add_sub", config=json.dumps(config)), "INVALID_ARGUMENT")
    assert needle in error.message()
    assert_add_sub_serves(client)


# ---- loads bounded in time and cancellable -----------------------------------------------------


def test_sigterm_during_a_long_load_exits_within_the_exit_timeout(repo_copy):
    repository = repo_copy("add_sub")
    # About a minute of session building at least: far longer than the deadline below.
    write_slow_model(repository, count=60)
    gateway = Gateway(
        repository,
        [
            "--model-control-mode", "explicit", "--load-model", "slow",
            "--max-instances-per-model", "64", "--exit-timeout-secs", "2",
        ],
    )
    try:
        gateway.wait_listening()
        time.sleep(1.0)  # let the load get under way
        assert gateway.process.poll() is None
        gateway.process.send_signal(signal.SIGTERM)
        gateway.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        gateway.process.kill()
        gateway.process.wait()
        pytest.fail(f"still running 30 s after SIGTERM during a load; stderr:\n{gateway.stderr()}")
    finally:
        if gateway.process.poll() is None:
            gateway.process.kill()
    log = gateway.stderr()
    assert "shutdown complete" in log
    assert "model loaded" not in log


def test_a_load_past_the_load_timeout_fails_cleanly(explicit):
    gateway = explicit("--model-load-timeout-secs", "1", "--max-instances-per-model", "64", slow_count=30)
    client = gateway.client()
    error = refused(lambda: client.load_model("slow"), "DEADLINE_EXCEEDED")
    assert "--model-load-timeout-secs" in error.message()
    assert not client.is_model_ready("slow")
    rows = index_of(client)["slow"]
    assert any(r.get("state") == "UNAVAILABLE" and "timeout" in r.get("reason", "") for r in rows), rows
    # Other models load and serve meanwhile, and the server stays ready only for what it holds.
    client.load_model("digits_classifier")
    assert client.is_model_ready("digits_classifier")
    assert_add_sub_serves(client)
    # The timed-out load stops building: it never installs anything later.
    wait_for(lambda: "timed-out load stopped" in gateway.stderr(), "the timed-out load stopped")
    assert not client.is_model_ready("slow")


# ---- a race-free lifecycle ---------------------------------------------------------------------


def test_unload_racing_a_load_never_resurrects_the_model(explicit):
    gateway = explicit(slow_count=2)
    client = gateway.client()
    with ThreadPoolExecutor(1) as pool:
        loading = pool.submit(client.load_model, "slow")
        wait_for(
            lambda: any(r.get("state") == "LOADING" for r in index_of(client).get("slow", [])),
            "the load under way",
        )
        # Waits for the load, then unloads what it installed.
        client.unload_model("slow")
        loading.result(timeout=DEADLINE_S)
    assert not client.is_model_ready("slow")
    time.sleep(0.5)  # a resurrecting load would have installed by now
    assert not client.is_model_ready("slow")
    assert index_of(client)["slow"][0]["state"] == "UNAVAILABLE"


def test_concurrent_load_unload_and_infer_never_hang(explicit):
    gateway = explicit()
    url = gateway.url
    stop = threading.Event()
    unexpected: list[str] = []

    def control(action: str):
        client = grpcclient.InferenceServerClient(url)
        for _ in range(15):
            try:
                getattr(client, action)("add_sub", client_timeout=DEADLINE_S)
            except InferenceServerException as e:
                if e.status() != "StatusCode.NOT_FOUND":
                    unexpected.append(f"{action}: {e.status()} {e.message()}")
        client.close()

    def infer():
        client = grpcclient.InferenceServerClient(url)
        a, b = add_sub_inputs(batch=2)
        while not stop.is_set():
            try:
                result = infer_add_sub(client, a, b, client_timeout=DEADLINE_S)
                if not np.array_equal(result.as_numpy("OUTPUT0"), a + b):
                    unexpected.append("a wrong answer")
            except InferenceServerException as e:
                if e.status() not in ("StatusCode.NOT_FOUND", "StatusCode.UNAVAILABLE"):
                    unexpected.append(f"infer: {e.status()} {e.message()}")
        client.close()

    with ThreadPoolExecutor(6) as pool:
        inferring = [pool.submit(infer) for _ in range(2)]
        controls = [pool.submit(control, a) for a in ("load_model", "unload_model", "load_model")]
        for f in controls:
            f.result(timeout=120)
        stop.set()
        for f in inferring:
            f.result(timeout=DEADLINE_S)
    assert not unexpected, unexpected[:5]
    client = gateway.client()
    # Serialized per model: the last call decides the state, whatever interleaving came before.
    client.load_model("add_sub")
    assert_add_sub_serves(client)
    client.unload_model("add_sub")
    assert not client.is_model_ready("add_sub")
    assert gateway.process.poll() is None


# ---- shared memory ----------------------------------------------------------------------------


def test_a_truncated_shared_memory_object_is_an_error_not_a_crash(gateway_factory, repo_copy):
    gateway = gateway_factory(repo_copy("add_sub"), "--allow-client-shm=true")
    client = gateway.client()
    key = f"/onnx_gateway_trunc_{os.getpid()}"
    nbytes = 2 * 16 * 4
    handle = shm.create_shared_memory_region("trunc", key, nbytes)
    try:
        a, b = add_sub_inputs(batch=1)
        shm.set_shared_memory_region(handle, [a, b])
        client.register_system_shared_memory("trunc", key, nbytes)
        inputs = [grpcclient.InferInput(n, [1, 16], "FP32") for n in ("INPUT0", "INPUT1")]
        inputs[0].set_shared_memory("trunc", 64, offset=0)
        inputs[1].set_shared_memory("trunc", 64, offset=64)
        assert np.array_equal(client.infer("add_sub", inputs).as_numpy("OUTPUT0"), a + b)
        os.truncate("/dev/shm" + key, 16)
        error = refused(lambda: client.infer("add_sub", inputs), "INVALID_ARGUMENT")
        assert "trunc" in error.message()
        assert gateway.process.poll() is None
        assert_add_sub_serves(client)
    finally:
        client.unregister_system_shared_memory()
        shm.destroy_shared_memory_region(handle)
