#!/usr/bin/env python3
"""Ensemble overhead and response-cache hits, batch-1 requests, interleaved in rounds:

- in-process: the two composing ONNX models (models/digits_preprocess, then
  models/digits_classifier) run one after the other with onnxruntime in this process, with the
  gateway's session settings (intra-op threads = the CPUs this process may use, divided by the
  model's one instance; one inter-op thread; no spinning), no transport at all;
- the gateway's digits_pipeline ensemble (the same two steps), a new input every time;
- the client calling digits_preprocess, then digits_classifier through the gateway itself;
- with --cache (the server started with --cache-config): a cache hit (the same request again)
  on digits_pipeline, whose config enables response_cache. Without --cache, start the server
  without --cache-config so the ensemble figure has no cache lookup in it.

Each round times --requests requests of every path in turn; the report gives medians over the
rounds and the medians of the per-round ratios.

    .venv/bin/python bench/ensemble_and_cache.py --url 127.0.0.1:8001 [--rounds 10 --requests 50] [--cache]
"""
import argparse
import os
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import tritonclient.grpc as grpcclient

MODELS = Path(__file__).resolve().parent.parent / "models"


def tensor(name: str, value: np.ndarray):
    t = grpcclient.InferInput(name, list(value.shape), "FP32")
    t.set_data_from_numpy(value)
    return [t]


def timed(fn, n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - start) / n


def session(model: str, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(MODELS / model / "1" / "model.onnx"), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="127.0.0.1:8001")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--cache", action="store_true", help="also time cache hits (server has --cache-config)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="intra-op threads of the in-process sessions (the gateway's default: the CPUs it may use)")
    args = parser.parse_args()
    client = grpcclient.InferenceServerClient(args.url)
    preprocess, classifier = session("digits_preprocess", args.threads), session("digits_classifier", args.threads)
    rng = np.random.default_rng(3)
    pixels = rng.uniform(0, 255, (args.rounds * args.requests * 3 + 20, 1, 64)).astype(np.float32)
    fresh = iter(pixels)

    def in_process(_):
        (features,) = preprocess.run(["features"], {"pixels": next(fresh)})
        classifier.run(["label", "probabilities"], {"input": features})

    def two_calls(_):
        features = client.infer("digits_preprocess", tensor("pixels", next(fresh))).as_numpy("features")
        client.infer("digits_classifier", tensor("input", features))

    def ensemble(_):
        client.infer("digits_pipeline", tensor("pixels", next(fresh)))

    same = pixels[-1]

    def hit(_):
        client.infer("digits_pipeline", tensor("pixels", same))

    # The in-process chain computes what the ensemble serves (a check, not a timing).
    (features,) = preprocess.run(["features"], {"pixels": same})
    expected = classifier.run(["probabilities"], {"input": features})[0]
    served = client.infer("digits_pipeline", tensor("pixels", same)).as_numpy("probabilities")  # stores the entry
    assert np.allclose(served, expected, atol=1e-5), (served, expected)
    for fn in (in_process, two_calls, ensemble):  # one unrecorded warm-up pass
        timed(fn, 5)

    paths = {"in-process chain (onnxruntime, no transport)": in_process,
             "gateway ensemble digits_pipeline": ensemble,
             "client calls both models through the gateway": two_calls}
    if args.cache:
        paths["gateway ensemble, same request (cache hit)"] = hit
    results = {name: [] for name in paths}
    for _ in range(args.rounds):
        for name, fn in paths.items():
            results[name].append(timed(fn, args.requests))
    for name, values in results.items():
        print(f"{name}: median {np.median(values) * 1e6:.0f} us per request "
              f"(rounds {min(values) * 1e6:.0f}..{max(values) * 1e6:.0f})")
    names = list(paths)
    inproc, ens, two = (np.array(results[n]) for n in names[:3])
    for label, num, den in [("ensemble / in-process", ens, inproc), ("two calls / in-process", two, inproc),
                            ("ensemble / two calls", ens, two)]:
        print(f"{label}: median of per-round ratios {np.median(num / den):.2f} "
              f"(ratio of medians {np.median(num) / np.median(den):.2f}); "
              f"median difference {np.median(num - den) * 1e6:.0f} us")
    (stats,) = client.get_inference_statistics("digits_pipeline").model_stats
    s = stats.inference_stats
    print(f"digits_pipeline cache_hit {s.cache_hit.count} (mean {s.cache_hit.ns / max(s.cache_hit.count, 1) / 1e3:.1f} us), "
          f"cache_miss {s.cache_miss.count} (mean {s.cache_miss.ns / max(s.cache_miss.count, 1) / 1e3:.1f} us); "
          f"in-process threads {args.threads}")
    # Server side (the gateway's own clock, no transport): the ensemble's mean request time against
    # its steps' mean compute time; both include the cache-miss and two-call requests above.
    def mean_us(d) -> float:
        return d.ns / max(d.count, 1) / 1e3

    steps = {m: client.get_inference_statistics(m).model_stats[0].inference_stats for m in ("digits_preprocess", "digits_classifier")}
    compute = {m: mean_us(st.compute_infer) for m, st in steps.items()}
    queue = {m: mean_us(st.queue) for m, st in steps.items()}
    print(f"server side: digits_pipeline mean successful request {mean_us(s.success):.1f} us (count {s.success.count}); "
          + "; ".join(f"{m} mean queue {queue[m]:.1f} us, compute_infer {compute[m]:.1f} us" for m in steps))


if __name__ == "__main__":
    main()
