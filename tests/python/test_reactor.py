"""The one-thread async runtime (`--reactor-threads 1`, the default on a one-CPU budget): tokio's
current-thread runtime on the main thread. Everything the multi-threaded runtime serves must work on
it: concurrent gRPC clients with batching, HTTP, streams, and an exit with tracing on (whose SDK waits
for its batching task, which must still get the thread). The drain tests of test_lifecycle.py run on
both runtimes."""
from __future__ import annotations

import json
import re
import threading
import urllib.request

import numpy as np
import tritonclient.grpc as grpcclient

from harness import add_sub_inputs, infer_add_sub

ONE_THREAD = re.compile(r"async runtime started reactor_threads=(\d+)")
CLIENTS = 8
REQUESTS_PER_CLIENT = 40


def batched_add_sub(repo_copy):
    repository = repo_copy("add_sub")
    config = repository / "add_sub" / "config.pbtxt"
    text = config.read_text()
    if "dynamic_batching" not in text:
        config.write_text(text + "\ndynamic_batching {}\n")
    return repository


def run_clients(url: str, errors: list) -> list[threading.Thread]:
    def run(seed: int) -> None:
        client = grpcclient.InferenceServerClient(url)
        try:
            for i in range(REQUESTS_PER_CLIENT):
                a, b = add_sub_inputs(batch=1, seed=seed * 1000 + i)
                result = infer_add_sub(client, a, b)
                if not np.array_equal(result.as_numpy("OUTPUT0"), a + b):
                    errors.append(f"client {seed}: wrong OUTPUT0 at request {i}")
        except Exception as e:  # noqa: BLE001 - every failure is reported by the test
            errors.append(f"client {seed}: {e}")
        finally:
            client.close()

    threads = [threading.Thread(target=run, args=(seed,)) for seed in range(CLIENTS)]
    for t in threads:
        t.start()
    return threads


def test_one_reactor_thread_serves_concurrent_clients_http_and_streams(gateway_factory, repo_copy):
    gateway = gateway_factory(batched_add_sub(repo_copy), "--reactor-threads", "1")
    assert gateway.wait_for_log(ONE_THREAD).group(1) == "1"

    errors: list[str] = []
    for t in run_clients(gateway.url, errors):
        t.join(timeout=120)
    assert not errors, errors
    stats = gateway.client().get_inference_statistics("add_sub", as_json=True)
    counts = stats["model_stats"][0]
    assert int(counts["inference_count"]) == CLIENTS * REQUESTS_PER_CLIENT

    # HTTP on the same thread.
    http = gateway.wait_for_log(re.compile(r"\bHTTP listening addr=(\S+)")).group(1)
    a, b = add_sub_inputs(batch=1, seed=7)
    body = json.dumps(
        {
            "inputs": [
                {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": a.ravel().tolist()},
                {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32", "data": b.ravel().tolist()},
            ]
        }
    ).encode()
    request = urllib.request.Request(
        f"http://{http}/v2/models/add_sub/infer", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        outputs = {o["name"]: o["data"] for o in json.load(response)["outputs"]}
    assert np.allclose(outputs["OUTPUT0"], (a + b).ravel())

    # A bidirectional stream.
    answers: list = []
    done = threading.Event()

    def callback(result, error):
        answers.append(error if error is not None else result)
        if len(answers) == 5:
            done.set()

    client = grpcclient.InferenceServerClient(gateway.url)
    client.start_stream(callback=callback)
    for i in range(5):
        a, b = add_sub_inputs(batch=1, seed=100 + i)
        inputs = [grpcclient.InferInput("INPUT0", [1, 16], "FP32"), grpcclient.InferInput("INPUT1", [1, 16], "FP32")]
        inputs[0].set_data_from_numpy(a)
        inputs[1].set_data_from_numpy(b)
        client.async_stream_infer("add_sub", inputs, request_id=str(i))
    assert done.wait(timeout=30), answers
    client.stop_stream()
    client.close()
    assert all(not isinstance(a, Exception) for a in answers), answers


def test_one_reactor_thread_with_tracing_exits_on_sigterm(gateway_factory, repo_copy):
    # Nothing listens on the collector port: exports fail, which must not hold the exit.
    gateway = gateway_factory(
        repo_copy("add_sub"),
        "--reactor-threads",
        "1",
        "--trace-otlp-endpoint",
        "http://127.0.0.1:9",
        "--trace-sample-ratio",
        "1",
    )
    a, b = add_sub_inputs(batch=1, seed=3)
    assert np.array_equal(infer_add_sub(gateway.client(), a, b).as_numpy("OUTPUT1"), a - b)
    assert gateway.stop() == 0
