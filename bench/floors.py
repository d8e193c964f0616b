#!/usr/bin/env python3
"""The gateway against its two floors, in one run, interleaved in rounds (run it through
bench/floors.sh, which builds the binaries and documents the environment variables).

Floors: (a) target/release/echo_floor, a bare tonic ModelInfer server that echoes its inputs, and
the same server running add_sub's ONNX file once per request (`--model-file`: the floor of any
server that runs the model, measured at 1 in flight, with no target); (b)
target/release/inproc_floor, ONNX Runtime in process through the gateway's runtime code with the
gateway's thread plan. Servers and in-process runs are pinned to SERVER_CORE, h2load and loadgen to
CLIENT_CORE. Successes are counted by the servers (the gateway's nv_inference_request_success delta,
the echo floor's own count): h2load only sees HTTP status, which is 200 for a gRPC error too.

Only the Python standard library is used.
"""
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROUNDS = int(os.environ.get("ROUNDS", "3"))
DURATION = float(os.environ.get("DURATION", "5"))
WARMUP_DURATION = float(os.environ.get("WARMUP_DURATION", "1"))
LATENCY_DURATION = float(os.environ.get("LATENCY_DURATION", str(DURATION)))
SERVER_CORE = os.environ.get("SERVER_CORE", "0")
CLIENT_CORE = os.environ.get("CLIENT_CORE", "1")
BIN_DIR = Path(os.environ.get("BIN_DIR", "target/release"))
OUT_DIR = Path(os.environ.get("OUT_DIR", "target/bench"))
MODELS = Path(os.environ.get("MODELS", "models"))
# Extra gateway flags for every gateway this run starts (e.g. "--log-verbose 0").
GATEWAY_FLAGS = os.environ.get("GATEWAY_FLAGS", "").split()
# In-flight counts for the add_sub comparison with the echo floor.
ADD_SUB_IN_FLIGHT = [int(m) for m in os.environ.get("ADD_SUB_IN_FLIGHT", "1,16,64").split(",")]
# In-flight counts (= in-process batch sizes) for the MLP comparison.
MLP_IN_FLIGHT = [int(m) for m in os.environ.get("MLP_IN_FLIGHT", "16,64").split(",")]
CLK_TCK = os.sysconf("SC_CLK_TCK")
ANSI = re.compile(r"\x1b\[[0-9;]*m")

# The targets (docs/PERFORMANCE.md §6): comparison name -> minimum median ratio.
TARGETS = {
    "add_sub m=1 / echo m=1": 0.90,
    "add_sub m=16 / echo m=16": 0.85,
    "mlp_bench b1 m=16 / in-process b16": 0.55,
    "mlp_bench b1 m=64 / in-process b64": 0.65,
    "add_sub_d500 adaptive m=1 / add_sub m=1": 0.80,
    "mlp_bench_d500 adaptive m=16 / mlp_bench m=16": 0.95,
}


def log(msg):
    print(msg, flush=True)


def pinned(core, argv):
    return ["taskset", "-c", core] + [str(a) for a in argv]


def cpu_seconds(pid):
    """utime + stime of a whole process (all its threads), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


# ---------------------------------------------------------------- model repository and bodies


def set_dynamic_batching(text, block):
    """The config with its dynamic_batching block replaced by `block` (added when absent)."""
    text, n = re.subn(r"dynamic_batching\s*\{[^}]*\}\n?", block + "\n", text)
    if n == 0:
        text += "\n" + block + "\n"
    return text


def copy_model(repo, source, name, batching_block):
    src = MODELS / source
    dst = repo / name
    shutil.copytree(src / "1", dst / "1")
    text = (src / "config.pbtxt").read_text()
    text = re.sub(r'^name:\s*"[^"]*"', f'name: "{name}"', text, count=1, flags=re.M)
    (dst / "config.pbtxt").write_text(set_dynamic_batching(text, batching_block))


def make_repositories(work):
    """Two repositories: the no-delay models, and the 500 us window ones (served by the default
    strategy's gateway and, when the binary has it, by a gateway started with the adaptive one)."""
    no_delay = work / "repo_no_delay"
    window = work / "repo_d500"
    no_delay.mkdir()
    window.mkdir()
    no_window = "dynamic_batching {}"
    d500 = "dynamic_batching {\n  max_queue_delay_microseconds: 500\n}"
    copy_model(no_delay, "add_sub", "add_sub", no_window)
    copy_model(no_delay, "mlp_bench", "mlp_bench", no_window)
    copy_model(window, "add_sub", "add_sub_d500", d500)
    copy_model(window, "mlp_bench", "mlp_bench_d500", d500)
    return no_delay, window


def make_body(work, repo, model):
    out = work / f"{model}.body"
    subprocess.run(
        [BIN_DIR / "bench_body", "--model-repository", repo, "--model", model, "--out", out],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return out


# ---------------------------------------------------------------- servers


def echo_argv(model_file=None):
    """The echo floor's command line; with `model_file`, the floor that runs that model."""
    argv = [BIN_DIR / "echo_floor", "--listen", "127.0.0.1:0"]
    return argv + (["--model-file", model_file] if model_file else [])


def gateway_argv(repo, flags, binary=None):
    """A gateway on `repo` listening on free loopback ports, with no drain delay."""
    return [
        binary or BIN_DIR / "onnx-gateway",
        "--model-repository", repo,
        "--grpc-address", "127.0.0.1", "--grpc-port", "0",
        "--http-address", "127.0.0.1", "--http-port", "0",
        "--metrics-address", "127.0.0.1", "--metrics-port", "0",
        "--drain-delay-secs", "0",
    ] + flags


class Echo:
    """The echo floor; its count is read with SIGUSR1 (it prints `successes=N`). With `model_file`,
    the floor of a server that runs the model: every request runs that ONNX file once, inline."""

    label = "echo_floor"

    def __init__(self, work, model_file=None):
        self.out_path = work / ("echo_model.out" if model_file else "echo.out")
        self.out = open(self.out_path, "w")
        self.proc = subprocess.Popen(
            pinned(SERVER_CORE, echo_argv(model_file)),
            stdout=self.out,
            stderr=subprocess.STDOUT,
        )
        self.addr = wait_for_line(self.out_path, r"listening addr=(\S+)", self.proc, 30)

    def successes(self, model=None):
        before = self.out_path.read_text().count("successes=")
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            counts = re.findall(r"successes=(\d+)", self.out_path.read_text())
            if len(counts) > before:
                return int(counts[-1])
            time.sleep(0.01)
        raise RuntimeError("echo_floor did not report its count")

    def stop(self):
        stop_process(self.proc)
        self.out.close()


class Gateway:
    """One onnx-gateway on SERVER_CORE; successes from its /metrics."""

    def __init__(self, work, label, repo, flags):
        self.label = label
        self.log_path = work / f"gateway_{label}.log"
        self.log = open(self.log_path, "w")
        argv = gateway_argv(repo, GATEWAY_FLAGS + flags)
        self.proc = subprocess.Popen(pinned(SERVER_CORE, argv), stdout=self.log, stderr=subprocess.STDOUT)
        self.addr = wait_for_line(self.log_path, r"gRPC listening addr=(\S+)", self.proc, 60)
        self.admin = wait_for_line(self.log_path, r"admin HTTP listening addr=(\S+)", self.proc, 60)
        # The listeners bind before the models load: wait for readiness, not only for the port.
        deadline = time.monotonic() + 180
        while not self.ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gateway {label} did not become ready; log: {self.log_path}")
            time.sleep(0.1)

    def ready(self):
        try:
            with urllib.request.urlopen(f"http://{self.admin}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    # The counters read around each measurement: successes, and what the batcher formed from them.
    # key: (metric, a label the sample must also carry, or "").
    COUNTERS = {
        "successes": ("nv_inference_request_success", ""),
        "rows": ("nv_inference_count", ""),
        "executions": ("nv_inference_exec_count", ""),
        "answers_split": ("onnx_gateway_batch_answers_split_total", ""),
        "adaptive_waited": ("onnx_gateway_batch_formed_total", 'reason="adaptive_waited"'),
    }

    def counters(self, model):
        with urllib.request.urlopen(f"http://{self.admin}/metrics", timeout=10) as r:
            text = r.read().decode()
        totals = dict.fromkeys(self.COUNTERS, 0.0)
        for line in text.splitlines():
            for key, (metric, label) in self.COUNTERS.items():
                if line.startswith(metric + "{") and f'model="{model}"' in line and label in line:
                    totals[key] += float(line.rsplit(" ", 1)[1])
        return totals

    def successes(self, model):
        return int(self.counters(model)["successes"])

    def stop(self):
        stop_process(self.proc)
        self.log.close()


def wait_for_line(path, pattern, proc, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, ANSI.sub("", path.read_text()))
        if m:
            return m.group(1)
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited ({proc.returncode}); see {path}")
        time.sleep(0.05)
    raise RuntimeError(f"no '{pattern}' in {path} within {timeout} s")


def stop_process(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- measurements


def to_us(value, unit):
    return float(value) * {"us": 1.0, "ms": 1e3, "s": 1e6}[unit]


def h2load(server, model, body, in_flight, duration):
    """One h2load run: server-counted successes per second, server and client CPU per request."""
    argv = [
        "h2load", "-c", "1", "-m", in_flight, "-D", f"{max(1, round(duration * 1000))}ms", "-d", body,
        "-H", "content-type: application/grpc", "-H", "te: trailers",
        f"http://{server.addr}/inference.GRPCInferenceService/ModelInfer",
    ]
    before = server_counters(server, model)
    server_cpu = cpu_seconds(server.proc.pid)
    started = time.monotonic()
    proc = subprocess.Popen(pinned(CLIENT_CORE, argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - started
    server_cpu = cpu_seconds(server.proc.pid) - server_cpu
    after = server_counters(server, model)
    count = int(after["successes"] - before["successes"])
    if proc.returncode != 0:
        raise RuntimeError(f"h2load failed ({proc.returncode}):\n{output}")
    m = re.search(r"finished in ([\d.]+)(ms|s)", output)
    secs = float(m.group(1)) / (1000.0 if m.group(2) == "ms" else 1.0) if m else wall
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", output)
    client_cpu = usage.ru_utime + usage.ru_stime
    per = max(count, 1)
    # h2load has no percentiles, but its mean time per request covers the echo floor too.
    t = re.search(r"time for request:\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)", output)
    # h2load counts gRPC errors as done (HTTP 200); the server's count leaves them out. A handful of
    # in-flight requests can also be answered after h2load stopped reading, so only a gap is reported.
    if done and int(done.group(1)) > count + in_flight:
        log(f"  warning: {model or 'echo'} m={in_flight}: h2load saw {done.group(1)} responses, "
            f"the server counted {count} successes (gRPC errors?)")
    return {
        "req_per_s": count / secs,
        "rows_per_s": count / secs,
        "successes": count,
        "http_done": int(done.group(1)) if done else None,
        "server_cpu_us_per_req": server_cpu / per * 1e6,
        "server_cpu_us_per_row": server_cpu / per * 1e6,
        "server_core_use": server_cpu / secs,
        "client_cpu_us_per_req": client_cpu / per * 1e6,
        "client_core_use": client_cpu / secs,
        "mean_latency_us": to_us(t.group(5), t.group(6)) if t else None,
        **batching(before, after),
    }


def server_counters(server, model):
    """The gateway's counters for `model`; the echo floor has only its successes."""
    if isinstance(server, Gateway):
        return server.counters(model)
    return {"successes": server.successes(model)}


def batching(before, after):
    """What the gateway's batcher formed during a measurement: mean rows per execution, the share
    of executions whose answers left in two halves (scheduler/answer_split.rs), and the share of
    batches the adaptive strategy dispatched after a wait of its own choosing."""
    if "executions" not in before:
        return {}
    executions = after["executions"] - before["executions"]
    if executions <= 0:
        return {"mean_batch": None, "answers_split_share": None, "adaptive_waited_share": None}
    share = lambda key: (after[key] - before[key]) / executions
    return {
        "mean_batch": (after["rows"] - before["rows"]) / executions,
        "answers_split_share": share("answers_split"),
        "adaptive_waited_share": share("adaptive_waited"),
    }


def in_process(repo, model, batch, duration):
    argv = [
        BIN_DIR / "inproc_floor", "--model-repository", repo, "--model", model,
        "--batch-sizes", batch, "--duration-secs", duration, "--warmup-secs", min(1.0, duration),
    ]
    out = subprocess.run(pinned(SERVER_CORE, argv), check=True, capture_output=True, text=True).stdout
    line = json.loads(out.strip().splitlines()[-1])
    line["req_per_s"] = line["rows_per_s"] / batch
    if line.get("core_use") is not None and line["rows_per_s"] > 0:
        line["server_core_use"] = line["core_use"]
        line["server_cpu_us_per_req"] = line["core_use"] / line["req_per_s"] * 1e6
        line["server_cpu_us_per_row"] = line["core_use"] / line["rows_per_s"] * 1e6
    return line


def loadgen(server, model, concurrency, duration):
    """p50/p99 from loadgen (h2load has no percentiles), with loadgen's own CPU per request."""
    argv = [
        BIN_DIR / "loadgen", "--url", server.addr, "--model", model, "--concurrency", concurrency,
        "--duration-secs", duration, "--json",
    ]
    before = server.successes(model)
    proc = subprocess.Popen(pinned(CLIENT_CORE, argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"loadgen failed:\n{output}")
    count = server.successes(model) - before
    line = json.loads(output.strip().splitlines()[-1])
    # The CPU covers loadgen's 1 s warm-up too, so it is divided by every request the server answered.
    line["client_cpu_us_per_req"] = (usage.ru_utime + usage.ru_stime) / max(count, 1) * 1e6
    return line


# ---------------------------------------------------------------- the plan


def build_cases(echo, echo_model, gw, gw_window, gw_adaptive, bodies, no_delay_repo):
    """(name, function(duration) -> result) in the order each round runs them."""
    cases = []
    for m in ADD_SUB_IN_FLIGHT:
        cases.append((f"echo m={m}", lambda d, m=m: h2load(echo, None, bodies["add_sub"], m, d)))
        if m == 1:
            # One request at a time is where the model's own run weighs most; under load the echo
            # running it is no floor, since it runs every request alone where the gateway batches.
            cases.append(("echo running add_sub m=1", lambda d: h2load(echo_model, None, bodies["add_sub"], 1, d)))
        cases.append((f"add_sub m={m}", lambda d, m=m: h2load(gw, "add_sub", bodies["add_sub"], m, d)))
    for m in MLP_IN_FLIGHT:
        cases.append((f"mlp_bench b1 m={m}", lambda d, m=m: h2load(gw, "mlp_bench", bodies["mlp_bench"], m, d)))
    for b in [1] + MLP_IN_FLIGHT:
        cases.append((f"in-process b{b}", lambda d, b=b: in_process(no_delay_repo, "mlp_bench", b, d)))
    window = [("add_sub_d500", 1, "add_sub_d500"), ("mlp_bench_d500", 16, "mlp_bench_d500")]
    for label, m, model in window:
        cases.append((f"{label} triton m={m}",
                      lambda d, m=m, model=model: h2load(gw_window, model, bodies[model], m, d)))
        if gw_adaptive is not None:
            cases.append((f"{label} adaptive m={m}",
                          lambda d, m=m, model=model: h2load(gw_adaptive, model, bodies[model], m, d)))
    return cases


def comparisons(adaptive):
    """(name, numerator case, denominator case, what the rate is, whether the CPU-cost ratio means
    anything: only where both sides are limited by the server's core, not by a batching window)."""
    out = []
    for m in ADD_SUB_IN_FLIGHT:
        out.append((f"add_sub m={m} / echo m={m}", f"add_sub m={m}", f"echo m={m}", "req_per_s", True))
        if m == 1:
            # How far any server that runs add_sub can get (no target), and the gateway against that.
            out.append(("echo running add_sub m=1 / echo m=1", "echo running add_sub m=1", "echo m=1",
                        "req_per_s", True))
            out.append(("add_sub m=1 / echo running add_sub m=1", "add_sub m=1", "echo running add_sub m=1",
                        "req_per_s", True))
    for m in MLP_IN_FLIGHT:
        out.append((f"mlp_bench b1 m={m} / in-process b{m}", f"mlp_bench b1 m={m}", f"in-process b{m}", "rows_per_s", True))
    strategies = ["triton"] + (["adaptive"] if adaptive else [])
    for s in strategies:
        out.append((f"add_sub_d500 {s} m=1 / add_sub m=1", f"add_sub_d500 {s} m=1", "add_sub m=1", "req_per_s", False))
        if 16 in MLP_IN_FLIGHT:
            out.append((f"mlp_bench_d500 {s} m=16 / mlp_bench m=16", f"mlp_bench_d500 {s} m=16",
                        "mlp_bench b1 m=16", "rows_per_s", False))
    return out


def supports_adaptive():
    help_text = subprocess.run([BIN_DIR / "onnx-gateway", "--help"], capture_output=True, text=True).stdout
    return "--default-batching-strategy" in help_text


# ---------------------------------------------------------------- report


def machine():
    model = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                  if l.startswith("model name")), "unknown")
    try:
        cpu_max = Path("/sys/fs/cgroup/cpu.max").read_text().strip()
    except OSError:
        cpu_max = "none"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True).stdout.strip()
    return {
        "cpu": model, "nproc": os.cpu_count(), "cgroup_cpu_max": cpu_max,
        "commit": (commit or "unknown") + ("+dirty" if dirty else ""),
        "h2load": subprocess.run(["h2load", "--version"], capture_output=True, text=True).stdout.strip(),
    }


def fmt(x, digits=0):
    return "-" if x is None else f"{x:,.{digits}f}"


# Spread of a floor's rate across rounds above which the report says the machine's speed moved.
CANARY_SPREAD = 0.15


def canary_lines(results):
    """The floors' own rates per round: on a shared machine they move with the other tenants, and a
    reader needs them to tell a quiet run from a disturbed one (the ratios move less, but do move)."""
    lines = []
    for case, key in [("echo m=1", "req_per_s"), ("in-process b16", "rows_per_s")]:
        rates = [r[case][key] for r in results if case in r and r[case].get(key)]
        if not rates:
            continue
        spread = max(rates) / min(rates) - 1.0
        warning = (f" (spread {spread:.0%}: above {CANARY_SPREAD:.0%}, the machine's speed moved during the "
                   "run; read its ratios with care)" if spread > CANARY_SPREAD else f" (spread {spread:.0%})")
        lines.append(f"- {case}, {key.replace('_', ' ')} per round: " + " / ".join(fmt(x) for x in rates) + warning)
    return ["", "Machine canary (the floors' own rates):", ""] + lines if lines else []


def report(results, comps, latencies, info, load_averages):
    lines = ["# Gateway vs floors", ""]
    lines.append(f"commit {info['commit']}; {info['cpu']}, {info['nproc']} CPUs visible, cgroup cpu.max "
                 f"{info['cgroup_cpu_max']}; server on core {SERVER_CORE}, client on core {CLIENT_CORE}; "
                 f"{ROUNDS} rounds of {DURATION:g} s per measurement; {info['h2load']}; load average at "
                 f"each round's start: {', '.join(load_averages)}")
    lines += canary_lines(results)
    lines += ["", "## Ratios (per round, median)", "",
              "| comparison | " + " | ".join(f"round {r + 1}" for r in range(ROUNDS)) +
              " | median | target | CPU-cost ratio (median) |",
              "|---|" + "---:|" * (ROUNDS + 3)]
    summary = {}
    for name, num, den, key, by_cost in comps:
        ratios = [r[num][key] / r[den][key] for r in results if r[den][key] > 0]
        costs = [r[den]["server_cpu_us_per_row"] / r[num]["server_cpu_us_per_row"] for r in results
                 if by_cost and r[num].get("server_cpu_us_per_row") and r[den].get("server_cpu_us_per_row")]
        cost = f"{statistics.median(costs):.3f}x" if costs else "-"
        med = statistics.median(ratios) if ratios else None
        summary[name] = med
        target = TARGETS.get(name)
        verdict = "" if target is None or med is None else (" met" if med >= target else " not met")
        lines.append(f"| {name} | " + " | ".join(f"{x:.3f}x" for x in ratios) +
                     f" | **{fmt(med, 3)}x** | {'-' if target is None else f'>= {target:.2f}x{verdict}'} | {cost} |")
    lines += ["", "The CPU-cost ratio is the floor's server CPU per row over the gateway's (median of rounds): "
              "where the server's core is the limit (16 and 64 in flight) it is the throughput ratio both would "
              "reach on a core of their own, and a shared machine's other tenants disturb it less than "
              "throughput (see `server core use` below); at 1 in flight it compares cost per request only. "
              "`mean batch` and `answers split` are what the gateway's batcher formed during the measurement: rows "
              "per execution, the share of executions whose answers left in two halves "
              "(`onnx_gateway_batch_answers_split_total`), and the share of batches the adaptive strategy "
              "dispatched after a wait of its own choosing (`reason=\"adaptive_waited\"`).",
              "", "## Measurements (median of rounds)", "",
              "| case | req/s | rows/s | server CPU us/row | server core use | client CPU us/req | client core use | h2load mean latency us | in-process p50/p99 us | mean batch | answers split | adaptive waited |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for case in results[0]:
        vals = [r[case] for r in results]
        med = lambda k: statistics.median(v[k] for v in vals) if all(v.get(k) is not None for v in vals) else None
        p = (f"{fmt(med('p50_us'), 1)} / {fmt(med('p99_us'), 1)}" if "p50_us" in vals[0] else "-")
        lines.append(f"| {case} | {fmt(med('req_per_s'))} | {fmt(med('rows_per_s'))} | "
                     f"{fmt(med('server_cpu_us_per_row'), 1)} | {fmt(med('server_core_use'), 2)} | "
                     f"{fmt(med('client_cpu_us_per_req'), 1)} | {fmt(med('client_core_use'), 2)} | "
                     f"{fmt(med('mean_latency_us'), 1)} | {p} | {fmt(med('mean_batch'), 2)} | "
                     f"{fmt(med('answers_split_share'), 3)} | {fmt(med('adaptive_waited_share'), 3)} |")
    lines += ["", f"## Latency through the gateway (loadgen, {LATENCY_DURATION:g} s after a 1 s warm-up, once)", "",
              "| model | in flight | req/s | p50 ms | p99 ms | loadgen CPU us/req |", "|---|---:|---:|---:|---:|---:|"]
    for (model, c), line in latencies.items():
        lines.append(f"| {model} | {c} | {fmt(line['req_per_s'])} | {line['p50_ms']:.3f} | {line['p99_ms']:.3f} | "
                     f"{fmt(line['client_cpu_us_per_req'], 1)} |")
    return "\n".join(lines) + "\n", summary


def main():
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    info = machine()
    adaptive = supports_adaptive()
    log(f"== machine: {json.dumps(info)}")
    log(f"== adaptive strategy: {'measured (--default-batching-strategy adaptive)' if adaptive else 'the binary has no --default-batching-strategy: skipped'}")
    work = Path(tempfile.mkdtemp(prefix="floors-"))
    servers = []
    try:
        no_delay_repo, window_repo = make_repositories(work)
        bodies = {m: make_body(work, no_delay_repo, m) for m in ["add_sub", "mlp_bench"]}
        bodies.update({m: make_body(work, window_repo, m) for m in ["add_sub_d500", "mlp_bench_d500"]})
        echo = Echo(work)
        servers.append(echo)
        echo_model = Echo(work, no_delay_repo / "add_sub" / "1" / "model.onnx")
        servers.append(echo_model)
        gw = Gateway(work, "no_delay", no_delay_repo, [])
        servers.append(gw)
        # The 500 us models get their own gateway, so the adaptive one serves the same names.
        gw_window = Gateway(work, "triton_d500", window_repo, [])
        servers.append(gw_window)
        gw_adaptive = None
        if adaptive:
            gw_adaptive = Gateway(work, "adaptive_d500", window_repo, ["--default-batching-strategy", "adaptive"])
            servers.append(gw_adaptive)
        cases = build_cases(echo, echo_model, gw, gw_window, gw_adaptive, bodies, no_delay_repo)
        log(f"== {len(cases)} measurements per round; one warm-up round of {WARMUP_DURATION:g} s each (not recorded)")
        for name, run in cases:
            run(WARMUP_DURATION)
        results, load_averages = [], []
        for r in range(ROUNDS):
            load = Path("/proc/loadavg").read_text().split()[0]
            load_averages.append(load)
            log(f"== round {r + 1}/{ROUNDS} (load average {load})")
            row = {}
            for name, run in cases:
                row[name] = run(DURATION)
                log(f"  {name}: {json.dumps(row[name])}")
            results.append(row)
        latencies = {}
        for model, c in [("add_sub", 1), ("add_sub", 16), ("mlp_bench", 1), ("mlp_bench", 16)]:
            latencies[(model, c)] = loadgen(gw, model, c, LATENCY_DURATION)
            log(f"  loadgen {model} c={c}: {json.dumps(latencies[(model, c)])}")
        text, summary = report(results, comparisons(adaptive), latencies, info, load_averages)
        (OUT_DIR / "floors.md").write_text(text)
        with open(OUT_DIR / "floors.jsonl", "w") as f:
            f.write(json.dumps({"machine": info, "rounds": results, "medians": summary,
                                "latency": {f"{m} c={c}": v for (m, c), v in latencies.items()}}) + "\n")
        log("")
        log(text)
        log(f"(written to {OUT_DIR / 'floors.md'} and {OUT_DIR / 'floors.jsonl'})")
    finally:
        for s in servers:
            s.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    try:
        main()
    except (RuntimeError, subprocess.CalledProcessError) as e:
        sys.exit(f"floors: {e}")
