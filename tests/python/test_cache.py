"""The response cache through the real binary and tritonclient: `--cache-config local,size=BYTES` and
`response_cache { enable: true }`. Hits and misses are counted exactly in ModelStatistics and in
Triton's nv_cache_* metrics, a hit is the model's own answer without an execution, requests that
differ only in shape or requested outputs never share an entry, and a small cache evicts the least
recently used response."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from harness import MODELS, TEST_MODELS, add_sub_inputs, run_gateway_to_exit
from test_statistics_metrics import scrape
from test_warmup import broadcast_add_model

CACHE_ON = "\nresponse_cache { enable: true }\n"


def copy_model(repository, source, name: str, extra: str = CACHE_ON) -> None:
    shutil.copytree(source, repository / name)
    config = (repository / name / "config.pbtxt").read_text().replace(f'name: "{source.name}"', f'name: "{name}"')
    (repository / name / "config.pbtxt").write_text(config + extra)


def add_sub_request(client, model: str, seed: int, outputs: list[str] | None = None):
    a, b = add_sub_inputs(batch=1, seed=seed)
    inputs = [grpcclient.InferInput("INPUT0", [1, 16], "FP32"), grpcclient.InferInput("INPUT1", [1, 16], "FP32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    requested = [grpcclient.InferRequestedOutput(name) for name in outputs] if outputs else None
    return client.infer(model, inputs, outputs=requested), a, b


def cache_counts(client, model: str) -> tuple[int, int, int, int]:
    (stats,) = client.get_inference_statistics(model).model_stats
    s = stats.inference_stats
    return s.cache_hit.count, s.cache_miss.count, stats.execution_count, s.success.count


def model_metric(samples, name: str, model: str) -> float:
    return samples[(name, frozenset({("model", model), ("version", "1")}))]


def test_hits_and_misses_are_counted_exactly(gateway_factory, tmp_path):
    repository = tmp_path / "repository"
    copy_model(repository, MODELS / "add_sub", "cached")
    copy_model(repository, MODELS / "add_sub", "uncached", extra="")
    gateway = gateway_factory(repository, "--cache-config", "local,size=1048576")
    client = gateway.client()
    # 3 distinct requests, each sent 1 + its seed times: 3 misses, 0 + 1 + 2 = 3 hits.
    for seed in range(3):
        for _ in range(seed + 1):
            result, a, b = add_sub_request(client, "cached", seed)
            assert np.array_equal(result.as_numpy("OUTPUT0"), a + b)
            assert np.array_equal(result.as_numpy("OUTPUT1"), a - b)
    assert cache_counts(client, "cached") == (3, 3, 3, 6)
    (stats,) = client.get_inference_statistics("cached").model_stats
    assert stats.inference_count == 6
    # A model without response_cache is never cached, even with the cache configured.
    for _ in range(3):
        add_sub_request(client, "uncached", 0)
    assert cache_counts(client, "uncached") == (0, 0, 3, 3)

    samples = scrape(gateway.admin_url)
    assert model_metric(samples, "nv_cache_num_hits_per_model", "cached") == 3
    assert model_metric(samples, "nv_cache_num_misses_per_model", "cached") == 3
    assert model_metric(samples, "nv_cache_num_hits_per_model", "uncached") == 0
    assert samples[("nv_cache_num_entries", frozenset())] == 3
    assert samples[("nv_cache_num_evictions", frozenset())] == 0
    assert 0 < samples[("nv_cache_util", frozenset())] < 1
    assert ("nv_cache_hit_duration_per_model", frozenset({("model", "cached"), ("version", "1")})) in samples


def test_no_hit_across_requested_outputs(gateway_factory, tmp_path):
    repository = tmp_path / "repository"
    copy_model(repository, MODELS / "add_sub", "cached")
    gateway = gateway_factory(repository, "--cache-config", "local,size=1048576")
    client = gateway.client()
    both, a, b = add_sub_request(client, "cached", 7)
    only_sum, _, _ = add_sub_request(client, "cached", 7, outputs=["OUTPUT0"])
    only_difference, _, _ = add_sub_request(client, "cached", 7, outputs=["OUTPUT1"])
    assert cache_counts(client, "cached") == (0, 3, 3, 3)
    assert [o.name for o in only_sum.get_response().outputs] == ["OUTPUT0"]
    assert [o.name for o in only_difference.get_response().outputs] == ["OUTPUT1"]
    assert np.array_equal(only_difference.as_numpy("OUTPUT1"), a - b)
    again, _, _ = add_sub_request(client, "cached", 7, outputs=["OUTPUT0"])
    assert [o.name for o in again.get_response().outputs] == ["OUTPUT0"]
    assert np.array_equal(again.as_numpy("OUTPUT0"), a + b)
    assert cache_counts(client, "cached") == (1, 3, 3, 4)


def test_no_hit_across_shapes_with_the_same_bytes(gateway_factory, tmp_path):
    repository = tmp_path / "repository"
    copy_model(repository, TEST_MODELS / "identity_fp32", "cached_identity")
    gateway = gateway_factory(repository, "--cache-config", "local,size=1048576")
    client = gateway.client()
    values = np.arange(16, dtype=np.float32)
    for shape in ([2, 8], [4, 4], [1, 16], [4, 4]):
        tensor = grpcclient.InferInput("INPUT0", shape, "FP32")
        tensor.set_data_from_numpy(values.reshape(shape))
        result = client.infer("cached_identity", [tensor])
        assert list(result.as_numpy("OUTPUT0").shape) == shape
        assert np.array_equal(result.as_numpy("OUTPUT0").ravel(), values)
    assert cache_counts(client, "cached_identity") == (1, 3, 3, 4)


def test_a_small_cache_evicts_the_least_recently_used(gateway_factory, tmp_path):
    # One add_sub response with its key is about 600 bytes here: two fit in 1500, three do not.
    repository = tmp_path / "repository"
    copy_model(repository, MODELS / "add_sub", "cached")
    gateway = gateway_factory(repository, "--cache-config", "local,size=1500")
    client = gateway.client()
    for seed in (1, 2, 3):  # the third evicts seed 1
        add_sub_request(client, "cached", seed)
    samples = scrape(gateway.admin_url)
    assert samples[("nv_cache_num_entries", frozenset())] == 2
    assert samples[("nv_cache_num_evictions", frozenset())] == 1
    result, a, b = add_sub_request(client, "cached", 1)  # evicted: runs again, evicts seed 2
    assert np.array_equal(result.as_numpy("OUTPUT0"), a + b)
    add_sub_request(client, "cached", 3)  # still there
    assert cache_counts(client, "cached") == (1, 4, 4, 5)
    samples = scrape(gateway.admin_url)
    assert samples[("nv_cache_num_entries", frozenset())] == 2
    assert samples[("nv_cache_num_evictions", frozenset())] == 2
    assert samples[("nv_cache_util", frozenset())] <= 1


def test_a_bad_cache_config_stops_startup(repo_copy):
    code, stderr = run_gateway_to_exit(repo_copy("add_sub"), "--cache-config", "redis,size=10")
    assert code != 0
    assert "cache 'redis' is not available" in stderr, stderr


def test_without_cache_config_no_cache_metrics(gateway_factory, tmp_path):
    repository = tmp_path / "repository"
    copy_model(repository, MODELS / "add_sub", "cached")
    gateway = gateway_factory(repository)
    client = gateway.client()
    for _ in range(2):
        add_sub_request(client, "cached", 0)
    assert cache_counts(client, "cached") == (0, 0, 2, 2)
    assert not any(name.startswith("nv_cache_") for name, _ in scrape(gateway.admin_url))


def test_only_successes_are_cached(gateway_factory, tmp_path):
    repository = tmp_path / "repository"
    broadcast_add_model(repository / "vector_add" / "1" / "model.onnx")
    (repository / "vector_add" / "config.pbtxt").write_text(
        """name: "vector_add"
backend: "onnxruntime"
max_batch_size: 0
input [ { name: "X" data_type: TYPE_FP32 dims: [ -1 ] }, { name: "Y" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "Z" data_type: TYPE_FP32 dims: [ -1 ] } ]
response_cache { enable: true }
"""
    )
    gateway = gateway_factory(repository, "--cache-config", "local,size=1048576")
    client = gateway.client()

    def send(x, y):
        inputs = [grpcclient.InferInput("X", list(x.shape), "FP32"), grpcclient.InferInput("Y", list(y.shape), "FP32")]
        inputs[0].set_data_from_numpy(x)
        inputs[1].set_data_from_numpy(y)
        return client.infer("vector_add", inputs)

    three, four = np.ones(3, np.float32), np.ones(4, np.float32)
    for _ in range(2):  # fails in ONNX Runtime both times: nothing stored, so no hit either
        with pytest.raises(InferenceServerException) as info:
            send(three, four)
        assert info.value.status() == "StatusCode.INTERNAL"
    (stats,) = client.get_inference_statistics("vector_add").model_stats
    assert (stats.inference_stats.cache_hit.count, stats.inference_stats.cache_miss.count) == (0, 0)
    assert stats.inference_stats.fail.count == 2
    for _ in range(2):
        assert np.array_equal(send(three, three).as_numpy("Z"), three + three)
    assert cache_counts(client, "vector_add")[:2] == (1, 1)
