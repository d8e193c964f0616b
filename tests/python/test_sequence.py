"""The sequence batcher, through tritonclient against the real binary: Direct and Oldest, each
control tensor, the idle timeout, integer and string correlation ids, implicit state carried and
reset, concurrent sequences batched across slots, and the stream path (tests/compat_models/extra)."""
from __future__ import annotations

import queue
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from harness import REPO_ROOT, start_gateway

EXTRA = REPO_ROOT / "tests" / "compat_models" / "extra"
ECHO_OUTPUTS = ["OUT_INPUT", "OUT_START", "OUT_END", "OUT_READY", "OUT_CORRID"]


@pytest.fixture(scope="module")
def gateway():
    gateway = start_gateway(EXTRA)
    yield gateway
    gateway.stop()


def int_input(value: int, name: str = "INPUT"):
    tensor = grpcclient.InferInput(name, [1, 1], "INT32")
    tensor.set_data_from_numpy(np.array([[value]], dtype=np.int32))
    return [tensor]


def send(client, model, value, sequence_id, start=False, end=False):
    result = client.infer(model, int_input(value), sequence_id=sequence_id,
                          sequence_start=start, sequence_end=end)
    return {name: result.as_numpy(name) for name in
            [o.name for o in result.get_response().outputs]}


@pytest.mark.parametrize("model", ["sequence_direct", "sequence_oldest"])
def test_control_tensors_are_fed(gateway, model):
    client = gateway.client()
    first = send(client, model, 5, 4242, start=True)
    assert first["OUT_INPUT"].tolist() == [[5]]
    assert first["OUT_START"].tolist() == [[1]]
    assert first["OUT_END"].tolist() == [[0]]
    assert first["OUT_READY"].tolist() == [[1]]
    assert first["OUT_CORRID"].tolist() == [[4242]]
    middle = send(client, model, 6, 4242)
    assert (middle["OUT_START"].tolist(), middle["OUT_END"].tolist()) == ([[0]], [[0]])
    last = send(client, model, 7, 4242, end=True)
    assert (last["OUT_START"].tolist(), last["OUT_END"].tolist()) == ([[0]], [[1]])
    # The sequence ended: continuing it without START is refused, as Triton does.
    with pytest.raises(InferenceServerException) as error:
        send(client, model, 8, 4242)
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert error.value.message() == (
        f"inference request for sequence 4242 to model '{model}' must specify the START flag on "
        "the first request of the sequence")


def test_string_correlation_ids(gateway):
    client = gateway.client()
    out = send(client, "sequence_string", 1, "session-a", start=True)
    assert out["OUT_CORRID"].tolist() == [[b"session-a"]]
    out = send(client, "sequence_string", 2, "session-a", end=True)
    assert out["OUT_CORRID"].tolist() == [[b"session-a"]]
    with pytest.raises(InferenceServerException) as error:
        send(client, "sequence_direct", 1, "not-a-number", start=True)
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_correlation_id_and_batch_size_rules(gateway):
    client = gateway.client()
    with pytest.raises(InferenceServerException) as error:
        send(client, "sequence_direct", 1, 0, start=True)
    assert "must specify a non-zero or non-empty correlation ID" in error.value.message()
    two = grpcclient.InferInput("INPUT", [2, 1], "INT32")
    two.set_data_from_numpy(np.array([[1], [2]], dtype=np.int32))
    with pytest.raises(InferenceServerException) as error:
        client.infer("sequence_direct", [two], sequence_id=9, sequence_start=True)
    assert "must specify batch-size 1 due to requirements of sequence batcher" in error.value.message()


def test_state_is_carried_and_reset_at_start(gateway):
    client = gateway.client()
    outputs = [send(client, "sequence_state", v, 77, start=(i == 0))["OUTPUT"].item()
               for i, v in enumerate([3, 4, 5])]
    assert outputs == [3, 7, 12]
    # START again on the same id: the state starts from zeros.
    assert send(client, "sequence_state", 10, 77, start=True)["OUTPUT"].item() == 10
    assert send(client, "sequence_state", 1, 77, end=True)["OUTPUT"].item() == 11
    # Another sequence has its own state.
    assert send(client, "sequence_state", 2, 78, start=True)["OUTPUT"].item() == 2


def test_idle_sequence_loses_its_slot(gateway):
    """max_sequence_idle_microseconds is 1 s for sequence_direct: a sequence silent for longer is
    released (sleeping past it is enough whatever the machine's speed), one that keeps talking is not."""
    client = gateway.client()
    send(client, "sequence_direct", 1, 555, start=True)
    send(client, "sequence_direct", 1, 556, start=True)
    for _ in range(3):
        time.sleep(0.4)
        send(client, "sequence_direct", 1, 556)
    time.sleep(1.5)
    for sequence_id in (555, 556):
        with pytest.raises(InferenceServerException) as error:
            send(client, "sequence_direct", 1, sequence_id)
        assert "must specify the START flag" in error.value.message()


def batch_sizes(client, model):
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return {int(b["batch_size"]) for b in stats.get("batch_stats", [])}


@pytest.mark.parametrize("model", ["sequence_direct", "sequence_oldest"])
def test_concurrent_sequences_share_batches(gateway, model):
    """Four sequences in lock-step from four threads: some execution holds more than one row."""
    client = gateway.client()
    barrier = threading.Barrier(4)
    errors = []

    def run(sequence_id):
        try:
            own = grpcclient.InferenceServerClient(gateway.url)
            for step in range(20):
                barrier.wait(timeout=30)
                out = send(own, model, step, sequence_id, start=(step == 0), end=(step == 19))
                assert out["OUT_INPUT"].item() == step
                assert out["OUT_CORRID"].item() == sequence_id
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(1000 + i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert max(batch_sizes(client, model)) > 1


def test_stream_keeps_sequence_order(gateway):
    client = gateway.client()
    results = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    values = [2, 3, 4, 5]
    try:
        for sequence_id in (31, 32):
            for i, v in enumerate(values):
                client.async_stream_infer("sequence_state", int_input(v * (sequence_id - 30)),
                                          request_id=f"{sequence_id}_{i}", sequence_id=sequence_id,
                                          sequence_start=(i == 0), sequence_end=(i == len(values) - 1))
        got = {31: [], 32: []}
        for _ in range(2 * len(values)):
            result, error = results.get(timeout=30)
            assert error is None, error
            got[int(result.get_response().id.split("_")[0])].append(result.as_numpy("OUTPUT").item())
    finally:
        client.stop_stream()
    assert got[31] == [2, 5, 9, 14]
    assert got[32] == [4, 10, 18, 28]
