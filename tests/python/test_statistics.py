"""ModelStatistics through tritonclient's get_inference_statistics: after a known set of requests the
counts are exact (inference_count in rows, execution_count in model runs, success and fail counts,
per-batch-size batch_stats), as a Triton client and dashboard expect them."""
from __future__ import annotations

import queue
import shutil

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from harness import MODELS, add_sub_inputs

# Far longer than the test: a batch goes exactly when it reaches the preferred 4 rows.
HOLD_US = 30_000_000


def add_sub_repository(tmp_path, name: str, scheduling: str):
    """A repository with one add_sub copy named `name` whose scheduling block is `scheduling`."""
    repository = tmp_path / "repository"
    (repository / name / "1").mkdir(parents=True)
    shutil.copy(MODELS / "add_sub" / "1" / "model.onnx", repository / name / "1" / "model.onnx")
    config = (MODELS / "add_sub" / "config.pbtxt").read_text()
    config = config.replace('name: "add_sub"', f'name: "{name}"').replace("dynamic_batching {}", scheduling)
    assert scheduling in config
    (repository / name / "config.pbtxt").write_text(config)
    return repository


def add_sub_request(model: str, rows: int, seed: int):
    a, b = add_sub_inputs(batch=rows, seed=seed)
    inputs = [grpcclient.InferInput("INPUT0", [rows, 16], "FP32"), grpcclient.InferInput("INPUT1", [rows, 16], "FP32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    return inputs, a, b


def only_stats(client, model: str, version: str = ""):
    (stats,) = client.get_inference_statistics(model, version).model_stats
    assert stats.name == model and stats.version == "1"
    return stats


def batch_table(stats) -> dict[int, int]:
    """Executions per batch size; every duration of a batch size counts the same executions."""
    table = {}
    for entry in stats.batch_stats:
        counts = {entry.compute_input.count, entry.compute_infer.count, entry.compute_output.count}
        assert len(counts) == 1, entry
        table[entry.batch_size] = counts.pop()
    return table


def test_sequential_requests_are_counted_exactly(gateway_factory, tmp_path):
    # Without dynamic batching every request is its own execution, whatever its rows.
    repository = add_sub_repository(tmp_path, "counted", "")
    gateway = gateway_factory(repository)
    client = gateway.client()
    assert only_stats(client, "counted").execution_count == 0

    rows_sent = [1, 2, 3, 1]
    for seed, rows in enumerate(rows_sent):
        inputs, a, b = add_sub_request("counted", rows, seed)
        result = client.infer("counted", inputs)
        assert np.array_equal(result.as_numpy("OUTPUT0"), a + b)
    with pytest.raises(InferenceServerException):
        bad = grpcclient.InferInput("INPUT0", [1, 15], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 15), np.float32))
        client.infer("counted", [bad, bad])

    stats = only_stats(client, "counted", "1")
    assert stats.inference_count == sum(rows_sent)
    assert stats.execution_count == len(rows_sent)
    assert stats.last_inference > 0
    inference = stats.inference_stats
    assert inference.success.count == len(rows_sent)
    assert inference.fail.count == 1
    for duration in (inference.queue, inference.compute_input, inference.compute_infer, inference.compute_output):
        assert duration.count == len(rows_sent)
    assert inference.success.ns > 0 and inference.compute_infer.ns > 0
    assert batch_table(stats) == {1: 2, 2: 1, 3: 1}

    # The whole-server query lists the model with the same numbers; as_json works too.
    everything = client.get_inference_statistics().model_stats
    assert [s.inference_count for s in everything if s.name == "counted"] == [sum(rows_sent)]
    as_json = client.get_inference_statistics("counted", as_json=True)
    assert int(as_json["model_stats"][0]["execution_count"]) == len(rows_sent)


def test_concurrent_requests_show_one_batch(gateway_factory, tmp_path):
    scheduling = f"dynamic_batching {{ preferred_batch_size: [ 4 ] max_queue_delay_microseconds: {HOLD_US} }}"
    repository = add_sub_repository(tmp_path, "batched", scheduling)
    gateway = gateway_factory(repository)
    client = gateway.client()

    answers: queue.Queue = queue.Queue()
    expected = {}
    for seed in range(4):
        inputs, a, b = add_sub_request("batched", 1, seed)
        expected[str(seed)] = a + b
        client.async_infer("batched", inputs, lambda result, error: answers.put((result, error)), request_id=str(seed))
    for _ in range(4):
        result, error = answers.get(timeout=30)
        assert error is None, error
        response_id = result.get_response().id
        assert np.array_equal(result.as_numpy("OUTPUT0"), expected.pop(response_id))
    assert not expected

    stats = only_stats(client, "batched")
    assert stats.inference_count == 4
    assert stats.execution_count == 1
    assert stats.inference_stats.success.count == 4
    assert stats.inference_stats.fail.count == 0
    assert batch_table(stats) == {4: 1}
