"""perf_analyzer (from the tritonclient 2.40.0 wheel, fetched by scripts/setup into .perf_analyzer/)
runs a short measurement against the gateway over HTTP, as over gRPC, and its requests show in the
model's statistics."""
from __future__ import annotations

import os
import re
import subprocess

import pytest
import tritonclient.http as httpclient

from harness import REPO_ROOT

PERF_ANALYZER = REPO_ROOT / ".perf_analyzer" / "perf_analyzer"


def perf_analyzer_or_skip():
    if not PERF_ANALYZER.exists():
        message = "perf_analyzer is missing: run scripts/setup"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    probe = subprocess.run([str(PERF_ANALYZER), "--version"], capture_output=True, text=True, timeout=30)
    if "libb64" in probe.stderr:
        message = f"perf_analyzer cannot start: {probe.stderr.strip()} (apt-get install libb64-0d)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return PERF_ANALYZER


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_perf_analyzer_measures_the_gateway(gateway_factory, repo_copy, protocol):
    binary = perf_analyzer_or_skip()
    gateway = gateway_factory(repo_copy("add_sub"))
    url = gateway.http_addr if protocol == "http" else gateway.url
    # Stability 999%: on a shared machine latency varies; this checks the client works, not speed.
    done = subprocess.run(
        [str(binary), "-m", "add_sub", "-i", protocol, "-u", url, "--concurrency-range", "2",
         "--measurement-mode", "count_windows", "--measurement-request-count", "50",
         "--stability-percentage", "999", "--max-trials", "10"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    throughput = re.search(r"Throughput: ([0-9.]+) infer/sec", done.stdout)
    assert throughput and float(throughput.group(1)) > 0, done.stdout
    stats = httpclient.InferenceServerClient(gateway.http_addr).get_inference_statistics("add_sub")
    model = stats["model_stats"][0]
    assert model["inference_count"] >= 50
    assert model["inference_stats"]["fail"]["count"] == 0
