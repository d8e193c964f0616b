"""Ensembles (platform "ensemble") through the real binary and tritonclient: results equal the same
composition computed in-process with ONNX Runtime, steps run as a DAG, concurrent ensemble requests
batch at the composing model, metadata/config/statistics are served, bad ensembles fail their load
naming the step, a failing step fails the request with its status, and readiness follows the
composing models."""
from __future__ import annotations

import queue
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from harness import MODELS, add_sub_inputs
from test_warmup import broadcast_add_model

# add_sub(a, b) -> (a + b, a - b). The pipeline: s, d = add_sub(A, B); OUT_SUM, OUT_DIFF =
# add_sub(s, d) (= 2A, 2B); DOUBLE_A = add_sub(A, A).OUTPUT0, independent of the first two steps.
PIPELINE_STEPS = """
ensemble_scheduling { step [
  { model_name: "add_sub" model_version: -1
    input_map { key: "INPUT0" value: "s" } input_map { key: "INPUT1" value: "d" }
    output_map { key: "OUTPUT0" value: "OUT_SUM" } output_map { key: "OUTPUT1" value: "OUT_DIFF" } },
  { model_name: "add_sub" model_version: 1
    input_map { key: "INPUT0" value: "A" } input_map { key: "INPUT1" value: "B" }
    output_map { key: "OUTPUT0" value: "s" } output_map { key: "OUTPUT1" value: "d" } },
  { model_name: "add_sub" model_version: -1
    input_map { key: "INPUT0" value: "A" } input_map { key: "INPUT1" value: "A" }
    output_map { key: "OUTPUT0" value: "DOUBLE_A" } }
] }
"""


def ensemble_config(name: str, steps: str, inputs=("A", "B"), outputs=("OUT_SUM", "OUT_DIFF", "DOUBLE_A"), dims="16", mbs=8) -> str:
    tensor = lambda n: f'{{ name: "{n}" data_type: TYPE_FP32 dims: [ {dims} ] }}'
    return (
        f'name: "{name}"\nplatform: "ensemble"\nmax_batch_size: {mbs}\n'
        f"input [ {', '.join(map(tensor, inputs))} ]\noutput [ {', '.join(map(tensor, outputs))} ]\n{steps}"
    )


def write_ensemble(repository, name: str, config: str) -> None:
    (repository / name / "1").mkdir(parents=True)
    (repository / name / "config.pbtxt").write_text(config)


def pipeline_repository(tmp_path, add_sub_scheduling: str | None = None):
    repository = tmp_path / "repository"
    shutil.copytree(MODELS / "add_sub", repository / "add_sub")
    if add_sub_scheduling is not None:
        config = (repository / "add_sub" / "config.pbtxt").read_text()
        (repository / "add_sub" / "config.pbtxt").write_text(config.replace("dynamic_batching {}", add_sub_scheduling))
    write_ensemble(repository, "pipeline", ensemble_config("pipeline", PIPELINE_STEPS))
    return repository


def pipeline_inputs(a, b):
    inputs = [grpcclient.InferInput("A", list(a.shape), "FP32"), grpcclient.InferInput("B", list(b.shape), "FP32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    return inputs


def in_process_pipeline(a, b):
    session = ort.InferenceSession(str(MODELS / "add_sub" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    s, d = session.run(["OUTPUT0", "OUTPUT1"], {"INPUT0": a, "INPUT1": b})
    out_sum, out_diff = session.run(["OUTPUT0", "OUTPUT1"], {"INPUT0": s, "INPUT1": d})
    (double_a,) = session.run(["OUTPUT0"], {"INPUT0": a, "INPUT1": a})
    return {"OUT_SUM": out_sum, "OUT_DIFF": out_diff, "DOUBLE_A": double_a}


def test_results_equal_the_in_process_composition(gateway_factory, tmp_path):
    gateway = gateway_factory(pipeline_repository(tmp_path))
    client = gateway.client()
    a, b = add_sub_inputs(batch=3, seed=5)
    result = client.infer("pipeline", pipeline_inputs(a, b))
    expected = in_process_pipeline(a, b)
    for name, value in expected.items():
        assert np.array_equal(result.as_numpy(name), value), name
    only = client.infer("pipeline", pipeline_inputs(a, b), outputs=[grpcclient.InferRequestedOutput("DOUBLE_A")])
    assert [o.name for o in only.get_response().outputs] == ["DOUBLE_A"]
    assert np.array_equal(only.as_numpy("DOUBLE_A"), expected["DOUBLE_A"])

    (ens,) = client.get_inference_statistics("pipeline").model_stats
    assert ens.inference_stats.success.count == 2 and ens.inference_count == 6
    (composing,) = client.get_inference_statistics("add_sub").model_stats
    # 3 steps per ensemble request, each one counted in the composing model's statistics.
    assert composing.inference_stats.success.count == 6


def test_metadata_and_config_are_served(gateway_factory, tmp_path):
    gateway = gateway_factory(pipeline_repository(tmp_path))
    client = gateway.client()
    metadata = client.get_model_metadata("pipeline")
    assert metadata.platform == "ensemble" and list(metadata.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("A", "FP32", [-1, 16]), ("B", "FP32", [-1, 16])]
    assert [t.name for t in metadata.outputs] == ["OUT_SUM", "OUT_DIFF", "DOUBLE_A"]
    config = client.get_model_config("pipeline").config
    assert config.platform == "ensemble"
    assert [s.model_name for s in config.ensemble_scheduling.step] == ["add_sub"] * 3
    assert config.ensemble_scheduling.step[1].model_version == 1
    assert client.is_model_ready("pipeline")
    index = {m.name: m.state for m in client.get_model_repository_index().models}
    assert index == {"add_sub": "READY", "pipeline": "READY"}


def test_concurrent_ensemble_requests_batch_at_the_step(gateway_factory, tmp_path):
    # The composing model only runs a batch of exactly 4 rows (the delay is far longer than the test).
    scheduling = "dynamic_batching { preferred_batch_size: [ 4 ] max_queue_delay_microseconds: 30000000 }"
    repository = tmp_path / "repository"
    shutil.copytree(MODELS / "add_sub", repository / "add_sub")
    config = (repository / "add_sub" / "config.pbtxt").read_text()
    (repository / "add_sub" / "config.pbtxt").write_text(config.replace("dynamic_batching {}", scheduling))
    one_step = """ensemble_scheduling { step [ { model_name: "add_sub" model_version: -1
      input_map { key: "INPUT0" value: "A" } input_map { key: "INPUT1" value: "B" }
      output_map { key: "OUTPUT0" value: "S" } output_map { key: "OUTPUT1" value: "D" } } ] }"""
    write_ensemble(repository, "single", ensemble_config("single", one_step, outputs=("S", "D")))
    gateway = gateway_factory(repository)
    client = gateway.client()
    answers: queue.Queue = queue.Queue()
    sent = []
    for seed in range(4):
        a, b = add_sub_inputs(batch=1, seed=seed)
        sent.append((a, b))
        client.async_infer("single", pipeline_inputs(a, b), callback=lambda result, error, seed=seed: answers.put((seed, result, error)), request_id=str(seed))
    for _ in range(4):
        seed, result, error = answers.get(timeout=60)
        assert error is None, error
        a, b = sent[seed]
        assert np.array_equal(result.as_numpy("S"), a + b)
        assert np.array_equal(result.as_numpy("D"), a - b)
    (composing,) = client.get_inference_statistics("add_sub").model_stats
    assert composing.execution_count == 1
    assert [(s.batch_size, s.compute_infer.count) for s in composing.batch_stats] == [(4, 1)]


@pytest.mark.parametrize(
    "steps,reason",
    [
        (PIPELINE_STEPS.replace('model_name: "add_sub" model_version: 1', 'model_name: "absent" model_version: 1'), "ensemble step 1 (model 'absent'): Request for unknown model: 'absent'"),
        (PIPELINE_STEPS.replace('key: "INPUT0" value: "s"', 'key: "INPUT9" value: "s"'), "ensemble step 0 (model 'add_sub'): input_map names input 'INPUT9'"),
        (PIPELINE_STEPS.replace('key: "OUTPUT0" value: "DOUBLE_A"', 'key: "OUTPUT7" value: "DOUBLE_A"'), "ensemble step 2 (model 'add_sub'): output_map names output 'OUTPUT7'"),
        (PIPELINE_STEPS.replace("model_version: 1", "model_version: 4"), "ensemble step 1 (model 'add_sub'): Request for unknown model: 'add_sub' version 4"),
    ],
    ids=["missing_model", "unknown_input", "unknown_output", "missing_version"],
)
def test_a_bad_ensemble_fails_its_load_naming_the_step(gateway_factory, tmp_path, steps, reason):
    repository = tmp_path / "repository"
    shutil.copytree(MODELS / "add_sub", repository / "add_sub")
    write_ensemble(repository, "broken", ensemble_config("broken", steps))
    gateway = gateway_factory(repository, "--exit-on-error=false", "--strict-readiness=false")
    client = gateway.client()
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert index["broken"].state == "UNAVAILABLE"
    assert reason in index["broken"].reason, index["broken"].reason
    assert client.is_model_ready("add_sub") and not client.is_model_ready("broken")


def test_a_failing_step_fails_the_request_with_its_status(gateway_factory, tmp_path):
    repository = tmp_path / "repository"
    broadcast_add_model(repository / "vector_add" / "1" / "model.onnx")
    (repository / "vector_add" / "config.pbtxt").write_text(
        """name: "vector_add"
backend: "onnxruntime"
max_batch_size: 0
input [ { name: "X" data_type: TYPE_FP32 dims: [ -1 ] }, { name: "Y" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "Z" data_type: TYPE_FP32 dims: [ -1 ] } ]
"""
    )
    steps = """ensemble_scheduling { step [ { model_name: "vector_add" model_version: -1
      input_map { key: "X" value: "A" } input_map { key: "Y" value: "B" } output_map { key: "Z" value: "C" } } ] }"""
    write_ensemble(repository, "adder", ensemble_config("adder", steps, outputs=("C",), dims="-1", mbs=0))
    gateway = gateway_factory(repository)
    client = gateway.client()
    x, y = np.ones(3, np.float32), np.ones(4, np.float32)
    with pytest.raises(InferenceServerException) as info:
        client.infer("adder", pipeline_inputs(x, y))
    assert info.value.status() == "StatusCode.INTERNAL", info.value.message()
    assert "ensemble step 0 (model 'vector_add')" in info.value.message()
    good = client.infer("adder", pipeline_inputs(x, x))
    assert np.array_equal(good.as_numpy("C"), x + x)


def test_readiness_follows_the_composing_model(gateway_factory, tmp_path):
    repository = pipeline_repository(tmp_path)
    gateway = gateway_factory(repository, "--model-control-mode=explicit", "--strict-readiness=false")
    client = gateway.client()
    with pytest.raises(InferenceServerException) as info:
        client.load_model("pipeline")
    assert "ensemble step 0 (model 'add_sub')" in info.value.message()
    client.load_model("add_sub")
    client.load_model("pipeline")
    assert client.is_model_ready("pipeline")
    client.unload_model("add_sub")
    assert not client.is_model_ready("pipeline")
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert index["pipeline"].state == "UNAVAILABLE" and "composing model" in index["pipeline"].reason
    a, b = add_sub_inputs(batch=1)
    with pytest.raises(InferenceServerException) as info:
        client.infer("pipeline", pipeline_inputs(a, b))
    assert info.value.status() == "StatusCode.UNAVAILABLE", info.value.message()
    client.load_model("add_sub")
    assert client.is_model_ready("pipeline")
    result = client.infer("pipeline", pipeline_inputs(a, b))
    assert np.array_equal(result.as_numpy("DOUBLE_A"), a + a)


def test_the_example_digits_pipeline_matches_the_classifier(client):
    """models/digits_pipeline on 0..255 pixels predicts what digits_classifier predicts on the
    same held-out images in its own 0..16 scale, and scores as well."""
    import sys

    sys.path.insert(0, str(MODELS / "digits_classifier"))
    from digits_data import load_split

    _, x_test, _, y_test = load_split()
    x_test, y_test = x_test[:64], y_test[:64]
    pipeline_labels, direct_labels = [], []
    for start in range(0, len(x_test), 4):
        chunk = x_test[start : start + 4]
        pixels = grpcclient.InferInput("pixels", list(chunk.shape), "FP32")
        pixels.set_data_from_numpy((chunk * (255.0 / 16.0)).astype(np.float32))
        pipeline_labels.append(client.infer("digits_pipeline", [pixels]).as_numpy("label").reshape(-1))
        direct = grpcclient.InferInput("input", list(chunk.shape), "FP32")
        direct.set_data_from_numpy(chunk)
        direct_labels.append(client.infer("digits_classifier", [direct]).as_numpy("label").reshape(-1))
    pipeline_labels, direct_labels = np.concatenate(pipeline_labels), np.concatenate(direct_labels)
    assert np.array_equal(pipeline_labels, direct_labels)
    assert np.mean(pipeline_labels == y_test) > 0.9


def test_the_request_timeout_reaches_the_step(gateway_factory, tmp_path):
    # The composing model would hold a lone request for 30 s (batches of exactly 4) and time it out
    # only after 20 s by default; the ensemble request asks for 0.2 s. Only if that reaches the step
    # does the request come back as the step's timeout before the client's 10 s deadline.
    scheduling = (
        "dynamic_batching { preferred_batch_size: [ 4 ] max_queue_delay_microseconds: 30000000 "
        "default_queue_policy { timeout_action: REJECT default_timeout_microseconds: 20000000 allow_timeout_override: true } }"
    )
    gateway = gateway_factory(pipeline_repository(tmp_path, add_sub_scheduling=scheduling))
    client = gateway.client()
    a, b = add_sub_inputs(batch=1)
    with pytest.raises(InferenceServerException) as info:
        client.infer("pipeline", pipeline_inputs(a, b), timeout=200_000, client_timeout=10)
    assert info.value.status() == "StatusCode.UNAVAILABLE", info.value.message()
    assert "timeout" in info.value.message().lower()
