#!/usr/bin/env python3
"""Instructions per request, counted, not timed: the gateway against its floors under callgrind.

Driven by bench/instructions.sh (which builds the binaries and documents the environment). Each server
(the echo floor, the echo floor running MODEL's ONNX file, the gateway serving MODEL) runs under
`valgrind --tool=callgrind` pinned to SERVER_CORE, so the gateway sees one CPU as in a 1-core pod.
h2load sends WARMUP requests, instrumentation is switched on, h2load sends REQUESTS more at each in-flight
count, the counters are dumped, and the user-space instructions of the measured requests are split
by where they ran. Counts repeat to within a fraction of a percent whatever else the machine does,
so a change in the gateway's per-request work shows here when the timed benchmarks (floors.sh)
cannot tell it from the machine's noise. Kernel time (syscalls, the network stack, wake-ups) and
cache misses are not counted: this says how much work a request is, floors.sh how long it takes.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import floors  # noqa: E402  (the repositories, bodies, pinning and process helpers)

MODEL = os.environ.get("MODEL", "add_sub")  # add_sub or mlp_bench (floors.py's repository)
IN_FLIGHT = [int(m) for m in os.environ.get("IN_FLIGHT", "1,16").split(",")]
REQUESTS = int(os.environ.get("REQUESTS", "2000"))
WARMUP = int(os.environ.get("WARMUP", "500"))
OUT_DIR = Path(os.environ.get("OUT_DIR", "target/bench"))
BIN_DIR = floors.BIN_DIR
GATEWAY = Path(os.environ.get("GATEWAY", BIN_DIR / "onnx-gateway"))

# Where an instruction ran, by the object and the function's path: first match wins.
GROUPS = [
    ("ONNX Runtime (library, its C++ runtime, malloc)", lambda obj, fn: "onnxruntime" in obj
     or "libstdc++" in obj or (obj.startswith("libc.") and re.search(r"malloc|free|_int_", fn))),
    ("ort crate", lambda obj, fn: fn.startswith("ort::")),
    ("gateway (onnx_gateway::)", lambda obj, fn: fn.startswith("onnx_gateway::")),
    ("HTTP/2 and gRPC (h2, hyper, tonic, http, prost, bytes)", lambda obj, fn: re.match(
        r"(h2|hyper|hyper_util|tonic|http|http_body|http_body_util|prost|bytes|tower)::", fn)),
    ("tokio", lambda obj, fn: re.match(r"tokio(_util)?::", fn)),
    ("allocator (mimalloc)", lambda obj, fn: re.match(r"_?mi_", fn)),
    ("memcpy, memmove, memset, memcmp", lambda obj, fn: obj.startswith("libc.") and re.search(r"mem(cpy|move|set|cmp)", fn)),
    ("other (std, core, alloc, tracing, libc)", lambda obj, fn: True),
]
log = floors.log


def servers(repo):
    """(label, argv, the pattern its listening address is printed with)."""
    return [
        ("echo", floors.echo_argv(), r"listening addr=(\S+)"),
        ("echo running the model", floors.echo_argv(repo / MODEL / "1" / "model.onnx"),
         r"listening addr=(\S+)"),
        ("gateway", floors.gateway_argv(repo, [], GATEWAY), r"gRPC listening addr=(\S+)"),
    ]


def h2load(addr, body, in_flight, count):
    argv = [
        "h2load", "-c", "1", "-m", in_flight, "-n", count, "-d", body,
        "-H", "content-type: application/grpc", "-H", "te: trailers",
        f"http://{addr}/inference.GRPCInferenceService/ModelInfer",
    ]
    out = subprocess.run(floors.pinned(floors.CLIENT_CORE, argv), capture_output=True, text=True).stdout
    m = re.search(r"(\d+) succeeded", out)
    return int(m.group(1)) if m else 0


def wait_until_served(addr, body, proc, timeout=300):
    """The gateway binds before its models load: wait for a first answered request."""
    deadline = time.monotonic() + timeout
    while h2load(addr, body, 1, 1) != 1:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{proc.args[0]} did not answer within {timeout} s")
        time.sleep(1)


def count_one(work, label, argv, pattern, body, in_flight):
    """Instructions of REQUESTS requests at `in_flight`: the dumped callgrind profile's path."""
    out = work / f"callgrind.{len(list(work.glob('callgrind.*')))}"
    log_path = work / "server.log"
    # Instrumentation starts off and is switched on after the warm-up: counters zeroed mid-run
    # instead would charge the frames then on the stack (main, the runtime's loop) with their callees.
    vg = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(floors.pinned(floors.SERVER_CORE, vg + argv), stdout=log_file,
                                stderr=subprocess.STDOUT)
    try:
        addr = floors.wait_for_line(log_path, pattern, proc, 300)
        wait_until_served(addr, body, proc)
        h2load(addr, body, in_flight, WARMUP)
        subprocess.run(["callgrind_control", "--instr=on", str(proc.pid)], check=True, capture_output=True)
        answered = h2load(addr, body, in_flight, REQUESTS)
        subprocess.run(["callgrind_control", "--dump=measured", str(proc.pid)], check=True,
                       capture_output=True)
    finally:
        floors.stop_process(proc)
    if answered != REQUESTS:
        raise RuntimeError(f"{label}: {answered} of {REQUESTS} requests answered")
    dumps = sorted(work.glob(out.name + ".*"))
    if not dumps:
        raise RuntimeError(f"{label}: callgrind wrote no dump")
    return dumps[0]


def split_by_group(profile):
    """Self instructions per group, from callgrind_annotate's list of functions."""
    text = subprocess.run(["callgrind_annotate", "--threshold=100", str(profile)], check=True,
                          capture_output=True, text=True).stdout
    total = int(re.search(r"([\d,]+) \(100.0%\)\s+PROGRAM TOTALS", text).group(1).replace(",", ""))
    groups = Counter()
    for line in text.splitlines():
        m = re.match(r"\s*([\d,]+) \(\s*[\d.]+%\)\s+\S*?:(.*) \[(.*)\]\s*$", line)
        if not m:
            continue
        fn, obj = m.group(2).strip().lstrip("<"), Path(m.group(3)).name
        name = next(g for g, match in GROUPS if match(obj, fn))
        groups[name] += int(m.group(1).replace(",", ""))
    return total, groups


def table(results, in_flight):
    labels = [label for label, m in results if m == in_flight]
    head = "| instructions per request | " + " | ".join(labels) + " |"
    rows = [head, "|---" + "|---:" * len(labels) + "|"]
    for group, _ in GROUPS:
        cells = [f"{results[(l, in_flight)]['groups'].get(group, 0):,.0f}" for l in labels]
        rows.append(f"| {group} | " + " | ".join(cells) + " |")
    rows.append("| **all user-space** | " + " | ".join(f"**{results[(l, in_flight)]['total']:,.0f}**"
                                                      for l in labels) + " |")
    return "\n".join(rows)


def main():
    for tool in ["valgrind", "callgrind_control", "callgrind_annotate", "h2load", "taskset"]:
        if shutil.which(tool) is None:
            sys.exit(f"instructions: {tool} is missing (valgrind: apt-get install valgrind; h2load: scripts/setup)")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="instructions-"))
    try:
        repo, _ = floors.make_repositories(work)
        body = floors.make_body(work, repo, MODEL)
        results = {}
        for m in IN_FLIGHT:
            for label, argv, pattern in servers(repo):
                total, groups = split_by_group(count_one(work, label, argv, pattern, body, m))
                per = {g: v / REQUESTS for g, v in groups.items()}
                results[(label, m)] = {"total": total / REQUESTS, "groups": per}
                log(f"  {label}, {m} in flight: {total / REQUESTS:,.0f} instructions per request")
        text = "\n\n".join(f"{MODEL}, {m} in flight ({REQUESTS} requests after {WARMUP}):\n\n" + table(results, m)
                           for m in IN_FLIGHT)
        (OUT_DIR / "instructions.md").write_text(text + "\n")
        with open(OUT_DIR / "instructions.jsonl", "w") as f:
            for (label, m), v in results.items():
                f.write(json.dumps({"server": label, "in_flight": m, **v}) + "\n")
        log("\n" + text + f"\n\n(written to {OUT_DIR / 'instructions.md'} and {OUT_DIR / 'instructions.jsonl'})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    try:
        main()
    except (RuntimeError, subprocess.CalledProcessError) as e:
        sys.exit(f"instructions: {e}")
