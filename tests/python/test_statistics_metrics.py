"""ModelStatistics as tritonclient reads it matches what was sent, and matches /metrics: both come from
one set of counters."""
from __future__ import annotations

import re
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from harness import add_sub_inputs, infer_add_sub

SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$')


def scrape(admin_url: str) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(f"{admin_url}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = SAMPLE.match(line)
        assert match, f"unparsable sample line: {line!r}"
        labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match["labels"] or ""))
        samples[(match["name"], labels)] = float(match["value"])
    return samples


def add_sub(samples, name: str, **extra: str) -> float:
    labels = frozenset({("model", "add_sub"), ("version", "1"), *extra.items()})
    return samples[(name, labels)]


def test_model_statistics_match_what_was_sent_and_metrics(gateway_factory, repo_copy):
    gateway = gateway_factory(repo_copy("add_sub"))
    client = gateway.client()
    batches = [1, 3, 2, 2]
    for i, batch in enumerate(batches):
        infer_add_sub(client, *add_sub_inputs(batch=batch, seed=i))
    bad = [grpcclient.InferInput("INPUT0", [1, 16], "INT32"), grpcclient.InferInput("INPUT1", [1, 16], "FP32")]
    bad[0].set_data_from_numpy(np.zeros((1, 16), dtype=np.int32))
    bad[1].set_data_from_numpy(np.zeros((1, 16), dtype=np.float32))
    for _ in range(2):
        with pytest.raises(InferenceServerException):
            client.infer("add_sub", bad)

    stats = client.get_inference_statistics(model_name="add_sub", as_json=True)["model_stats"]
    assert [(s["name"], s["version"]) for s in stats] == [("add_sub", "1")]
    stats = stats[0]
    inference = stats["inference_stats"]
    # proto3 JSON writes uint64 as strings and leaves zero fields out.
    count = lambda d: int(d.get("count", 0))  # noqa: E731
    assert count(inference["success"]) == len(batches)
    assert count(inference["fail"]) == 2
    assert int(stats["inference_count"]) == sum(batches)
    assert int(stats["execution_count"]) == len(batches), "sequential requests never share a batch"

    samples = scrape(gateway.admin_url)
    assert add_sub(samples, "nv_inference_request_success") == count(inference["success"])
    assert add_sub(samples, "nv_inference_request_failure", reason="REJECTED") == count(inference["fail"])
    assert add_sub(samples, "nv_inference_count") == int(stats["inference_count"])
    assert add_sub(samples, "nv_inference_exec_count") == int(stats["execution_count"])
    assert add_sub(samples, "nv_inference_queue_duration_us") == int(inference["queue"].get("ns", 0)) // 1000
    assert add_sub(samples, "onnx_gateway_request_duration_seconds_count") == len(batches)
    assert add_sub(samples, "onnx_gateway_batch_size_sum") == sum(batches)
