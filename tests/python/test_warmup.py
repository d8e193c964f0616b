"""model_warmup through the real binary and tritonclient: samples run on every instance before the
model is READY, never appear in the inference statistics, and a sample that fails (missing file,
unknown input, an execution error) fails the load with a reason naming it. Also the opt-in automatic
warm-up (--model-auto-warmup) for configs without model_warmup."""
from __future__ import annotations

import re
import shutil
import threading

import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
from onnx import TensorProto, helper

from harness import MODELS, add_sub_inputs, assert_add_sub_serves, run_gateway_to_exit

WARMUP_FINISHED = re.compile(r"warm-up finished.*model=(\S+).*samples=(\d+).*instances=(\d+).*runs_per_instance=(\d+)")


def add_sub_with(repository, name: str, extra: str) -> None:
    """A copy of add_sub named `name` with `extra` appended to its config."""
    (repository / name / "1").mkdir(parents=True)
    shutil.copy(MODELS / "add_sub" / "1" / "model.onnx", repository / name / "1" / "model.onnx")
    config = (MODELS / "add_sub" / "config.pbtxt").read_text().replace('name: "add_sub"', f'name: "{name}"')
    (repository / name / "config.pbtxt").write_text(config + extra)


def sample(name: str, batch_size: int, inputs: dict[str, str], count: int = 0) -> str:
    body = " ".join(
        f'inputs {{ key: "{k}" value {{ data_type: TYPE_FP32 dims: [ 16 ] {v} }} }}' for k, v in inputs.items()
    )
    return f'model_warmup [ {{ name: "{name}" batch_size: {batch_size} count: {count} {body} }} ]\n'


def statistics(client, model: str):
    (stats,) = client.get_inference_statistics(model).model_stats
    return stats


def warmup_lines(gateway) -> list[tuple[str, int, int, int]]:
    return [
        (m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4)))
        for m in map(WARMUP_FINISHED.search, gateway.stderr().splitlines())
        if m
    ]


def test_every_kind_of_sample_runs_on_every_instance_and_stays_out_of_statistics(gateway_factory, tmp_path):
    repository = tmp_path / "repository"
    extra = sample(
        "mixed",
        4,
        {"INPUT0": "random_data: true", "INPUT1": 'input_data_file: "ones.bin"'},
        count=3,
    ) + sample("zeros", 8, {"INPUT0": "zero_data: true", "INPUT1": "zero_data: true"})
    add_sub_with(repository, "warm", extra)
    config = (repository / "warm" / "config.pbtxt").read_text()
    assert "    count: 1\n" in config
    (repository / "warm" / "config.pbtxt").write_text(config.replace("    count: 1\n", "    count: 2\n", 1))
    (repository / "warm" / "warmup").mkdir()
    (repository / "warm" / "warmup" / "ones.bin").write_bytes(np.ones((4, 16), np.float32).tobytes())

    gateway = gateway_factory(repository)
    client = gateway.client()
    # Two repeated fields merge in text format: both samples, 3 + 1 runs, on each of the 2 instances.
    assert warmup_lines(gateway) == [("warm", 2, 2, 4)]
    config = client.get_model_config("warm").config
    assert [w.name for w in config.model_warmup] == ["mixed", "zeros"]
    stats = statistics(client, "warm")
    assert stats.inference_count == 0 and stats.execution_count == 0
    assert stats.inference_stats.success.count == 0 and list(stats.batch_stats) == []
    a, b = add_sub_inputs(batch=1)
    result = infer_add_sub_named(client, "warm", a, b)
    assert np.array_equal(result.as_numpy("OUTPUT0"), a + b)
    assert statistics(client, "warm").execution_count == 1


def infer_add_sub_named(client, model: str, a, b):
    inputs = [grpcclient.InferInput("INPUT0", list(a.shape), "FP32"), grpcclient.InferInput("INPUT1", list(b.shape), "FP32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    return client.infer(model, inputs)


@pytest.mark.parametrize(
    "warmup,reason",
    [
        (sample("no_file", 1, {"INPUT0": "zero_data: true", "INPUT1": 'input_data_file: "absent.bin"'}), "warm-up sample 'no_file': input 'INPUT1': input_data_file 'absent.bin' cannot be read"),
        (sample("stranger", 1, {"INPUT0": "zero_data: true", "INPUT1": "zero_data: true", "INPUT9": "zero_data: true"}), "warm-up sample 'stranger': input 'INPUT9' is not an input of the model"),
        (sample("too_big", 9, {"INPUT0": "zero_data: true", "INPUT1": "zero_data: true"}), "model_warmup[0] (warm-up sample 'too_big').batch_size is 9, above the bound 8"),
        (sample("many", 1, {"INPUT0": "zero_data: true", "INPUT1": "zero_data: true"}, count=100000), "model_warmup[0] (warm-up sample 'many').count is 100000, above the bound 1000"),
    ],
    ids=["missing_file", "unknown_input", "batch_size", "count_bound"],
)
def test_a_bad_sample_fails_the_load_naming_it(gateway_factory, tmp_path, warmup, reason):
    repository = tmp_path / "repository"
    add_sub_with(repository, "bad_warmup", warmup)
    add_sub_with(repository, "fine", "")
    gateway = gateway_factory(repository, "--exit-on-error=false", "--strict-readiness=false")
    client = gateway.client()
    gateway.wait_until(lambda c: any(m.name == "bad_warmup" and m.state == "UNAVAILABLE" for m in c.get_model_repository_index().models), "bad_warmup failed")
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert reason in index["bad_warmup"].reason, index["bad_warmup"].reason
    assert not client.is_model_ready("bad_warmup")
    assert client.is_model_ready("fine")


def broadcast_add_model(path) -> None:
    """Z = X + Y over vectors of any length: ONNX Runtime refuses unequal lengths only when it runs."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["X", "Y"], ["Z"])],
        "add",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["n"]), helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["m"])],
        [helper.make_tensor_value_info("Z", TensorProto.FLOAT, ["k"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True)
    onnx.save(model, str(path))


def test_an_execution_error_fails_the_load_and_exits_by_default(tmp_path):
    repository = tmp_path / "repository"
    broadcast_add_model(repository / "mismatch" / "1" / "model.onnx")
    (repository / "mismatch" / "config.pbtxt").write_text(
        """name: "mismatch"
backend: "onnxruntime"
max_batch_size: 0
input [ { name: "X" data_type: TYPE_FP32 dims: [ -1 ] }, { name: "Y" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "Z" data_type: TYPE_FP32 dims: [ -1 ] } ]
model_warmup [ { name: "lengths_3_and_4" batch_size: 1
  inputs { key: "X" value { data_type: TYPE_FP32 dims: [ 3 ] zero_data: true } }
  inputs { key: "Y" value { data_type: TYPE_FP32 dims: [ 4 ] zero_data: true } } } ]
"""
    )
    code, stderr = run_gateway_to_exit(repository)
    assert code != 0, stderr
    assert "warm-up sample 'lengths_3_and_4': execution failed on instance 0" in stderr, stderr


def test_a_slow_warmup_holds_readiness_until_it_is_done(gateway_factory, tmp_path):
    # 2 instances x 100 runs of the MLP at batch 64: the load is busy for a while.
    repository = tmp_path / "repository"
    shutil.copytree(MODELS / "mlp_bench", repository / "mlp_bench")
    config = (repository / "mlp_bench" / "config.pbtxt").read_text().replace("    count: 1\n", "    count: 2\n", 1)
    (repository / "mlp_bench" / "config.pbtxt").write_text(
        config
        + 'model_warmup [ { name: "slow" batch_size: 64 count: 100 inputs { key: "input" value { data_type: TYPE_FP32 dims: [ 256 ] random_data: true } } } ]\n'
    )
    gateway = gateway_factory(repository, "--model-control-mode=explicit")
    client = gateway.client()
    done = threading.Event()
    errors: list[Exception] = []

    def load():
        try:
            client_for_load = grpcclient.InferenceServerClient(gateway.url)
            client_for_load.load_model("mlp_bench")
            client_for_load.close()
        except Exception as e:  # reported below
            errors.append(e)
        done.set()

    loader = threading.Thread(target=load)
    loader.start()
    seen_not_ready = False
    while not done.is_set():
        if client.is_model_ready("mlp_bench"):
            # READY can be seen between the server answering the load and this thread's loader
            # waking up; it must never be seen before the warm-up finished (logged before install).
            assert warmup_lines(gateway) == [("mlp_bench", 1, 2, 100)], "READY before warm-up ended"
        else:
            seen_not_ready = True
    loader.join()
    assert not errors, errors
    assert seen_not_ready, "the load was never observed in progress"
    assert warmup_lines(gateway) == [("mlp_bench", 1, 2, 100)]
    assert client.is_model_ready("mlp_bench")
    assert statistics(client, "mlp_bench").execution_count == 0


def test_auto_warmup_covers_the_batch_sizes_when_asked(gateway_factory, repo_copy):
    repository = repo_copy("add_sub", "digits_classifier")
    gateway = gateway_factory(repository, "--model-auto-warmup=true")
    lines = sorted(warmup_lines(gateway))
    # add_sub batches up to 8 (sizes 1 and 8); the auto-completed digits_classifier likewise.
    names = [line[0] for line in lines]
    assert names == ["add_sub", "digits_classifier"], gateway.stderr()
    assert all(samples >= 2 for _, samples, _, _ in lines), lines
    assert statistics(gateway.client(), "add_sub").execution_count == 0
    assert_add_sub_serves(gateway.client())


def test_no_warmup_by_default(gateway_factory, repo_copy):
    gateway = gateway_factory(repo_copy("add_sub"))
    assert warmup_lines(gateway) == []
    assert_add_sub_serves(gateway.client())
