#!/usr/bin/env python3
"""Ensemble overhead and response-cache hits through a running gateway serving models/:

- digits_pipeline (an ensemble: digits_preprocess then digits_classifier) against the client
  calling the two models one after the other itself, same inputs, interleaved in rounds;
- with --cache-config on the server: a cache hit (the same request again) against a miss
  (a new request every time) on digits_pipeline, whose config enables response_cache.

    .venv/bin/python bench/ensemble_and_cache.py --url 127.0.0.1:8001 [--rounds 10 --requests 50]
"""
import argparse
import time

import numpy as np
import tritonclient.grpc as grpcclient


def tensor(name: str, value: np.ndarray):
    t = grpcclient.InferInput(name, list(value.shape), "FP32")
    t.set_data_from_numpy(value)
    return [t]


def timed(fn, n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="127.0.0.1:8001")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--requests", type=int, default=50)
    args = parser.parse_args()
    client = grpcclient.InferenceServerClient(args.url)
    rng = np.random.default_rng(3)
    pixels = rng.uniform(0, 255, (args.rounds * args.requests * 3 + 1, 1, 64)).astype(np.float32)
    fresh = iter(pixels)

    def two_calls(_):
        features = client.infer("digits_preprocess", tensor("pixels", next(fresh))).as_numpy("features")
        client.infer("digits_classifier", tensor("input", features))

    def ensemble(_):
        client.infer("digits_pipeline", tensor("pixels", next(fresh)))

    same = pixels[-1]

    def hit(_):
        client.infer("digits_pipeline", tensor("pixels", same))

    hit(0)  # stores the entry (if the server has a cache)
    results = {"two calls from the client": [], "ensemble (miss)": [], "ensemble, same request (hit)": []}
    for _ in range(args.rounds):
        results["two calls from the client"].append(timed(two_calls, args.requests))
        results["ensemble (miss)"].append(timed(ensemble, args.requests))
        results["ensemble, same request (hit)"].append(timed(hit, args.requests))
    for name, values in results.items():
        print(f"{name}: median {np.median(values) * 1e6:.0f} us per request")
    (stats,) = client.get_inference_statistics("digits_pipeline").model_stats
    s = stats.inference_stats
    print(f"digits_pipeline cache_hit {s.cache_hit.count} (mean {s.cache_hit.ns / max(s.cache_hit.count, 1) / 1e3:.1f} us), "
          f"cache_miss {s.cache_miss.count} (mean {s.cache_miss.ns / max(s.cache_miss.count, 1) / 1e3:.1f} us)")


if __name__ == "__main__":
    main()
