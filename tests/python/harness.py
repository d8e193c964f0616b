"""Test harness: starts the real onnx-gateway binary and talks to it with the unmodified tritonclient.

The binary comes from $GATEWAY_BIN (default target/debug/onnx-gateway, relative to the repository
root). Every server binds 127.0.0.1 port 0 for both gRPC and admin HTTP; the ports are read back from
the startup log lines `gRPC listening addr=IP:PORT` and `admin HTTP listening addr=IP:PORT`.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

REPO_ROOT = Path(__file__).resolve().parents[2]
MODELS = REPO_ROOT / "models"
TEST_MODELS = REPO_ROOT / "tests" / "models"

STARTUP_TIMEOUT_S = 60.0
SHUTDOWN_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.05

GRPC_LISTENING = re.compile(r"gRPC listening addr=(\S+)")
ADMIN_LISTENING = re.compile(r"admin HTTP listening addr=(\S+)")
HTTP_LISTENING = re.compile(r"(?<!admin )HTTP listening addr=(\S+)")
# tracing's text format may colour field names; strip escapes before matching log lines.
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def gateway_binary() -> Path:
    path = Path(os.environ.get("GATEWAY_BIN", "target/debug/onnx-gateway"))
    if not path.is_absolute():
        path = REPO_ROOT / path
    if not path.exists():
        pytest.fail(f"gateway binary {path} does not exist: run `cargo build` (or set GATEWAY_BIN)")
    return path


def gateway_command(repository: Path, extra_args: list[str]) -> list[str]:
    defaults = {
        "--grpc-address": "127.0.0.1",
        "--grpc-port": "0",
        "--metrics-address": "127.0.0.1",
        "--metrics-port": "0",
        # Tests stop servers constantly; waiting out a load balancer's drain delay would only slow them.
        "--drain-delay-secs": "0",
        "--http-address": "127.0.0.1",
        "--http-port": "0",
    }
    command = [str(gateway_binary())]
    # A command line written for Triton's image starts with the command it runs.
    if extra_args[:1] == ["tritonserver"]:
        command.append(extra_args[0])
        extra_args = extra_args[1:]
    # Triton's other name for the flag, when a test passes it itself.
    if not any(arg.startswith(("--model-store", "--model-repository")) for arg in extra_args):
        command += ["--model-repository", str(repository)]
    for flag, value in defaults.items():
        # A test may set any of these itself (`--flag value` or `--flag=value`).
        if not any(arg == flag or arg.startswith(flag + "=") for arg in extra_args):
            command += [flag, value]
    return command + list(extra_args)


def gateway_env() -> dict[str, str]:
    env = dict(os.environ)
    env["NO_COLOR"] = "1"
    return env


class Gateway:
    """A running gateway process. Its stderr is drained by a thread into a buffer, so the pipe never
    fills up however much the server logs, and tests can read what it said."""

    def __init__(self, repository: Path, extra_args: list[str]):
        self.repository = repository
        self.extra_args = list(extra_args)
        self.process = subprocess.Popen(
            gateway_command(repository, extra_args),
            cwd=REPO_ROOT,
            env=gateway_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._eof = False
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()
        self.grpc_addr: str | None = None
        self.admin_addr: str | None = None
        self.http_addr: str | None = None
        self._client: grpcclient.InferenceServerClient | None = None

    def _drain(self) -> None:
        assert self.process.stderr is not None
        for raw in self.process.stderr:
            line = ANSI_ESCAPE.sub("", raw.decode("utf-8", errors="replace"))
            with self._changed:
                self._lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def stderr(self) -> str:
        with self._lock:
            return "".join(self._lines)

    def wait_for_log(self, pattern: re.Pattern, timeout: float = STARTUP_TIMEOUT_S) -> re.Match:
        """Waits until a stderr line matches; fails if the process exits or the deadline passes."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for line in self._lines[seen:]:
                    match = pattern.search(line)
                    if match:
                        return match
                seen = len(self._lines)
                if self._eof:
                    self.process.wait()
                    pytest.fail(
                        f"gateway exited with {self.process.returncode} before logging "
                        f"{pattern.pattern!r}; stderr:\n{''.join(self._lines)}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    pytest.fail(
                        f"gateway did not log {pattern.pattern!r} within {timeout}s; stderr:\n"
                        + "".join(self._lines)
                    )
                self._changed.wait(remaining)

    def wait_listening(self) -> None:
        if any(a in ("--allow-grpc=false", "--allow-grpc=0") for a in self.extra_args):
            self.wait_for_log(re.compile(r"gRPC off"))
        else:
            self.grpc_addr = self.wait_for_log(GRPC_LISTENING).group(1)
        self.admin_addr = self.wait_for_log(ADMIN_LISTENING).group(1)
        if any(a in ("--allow-http=false", "--allow-http=0") for a in self.extra_args):
            self.http_addr = None
        else:
            self.http_addr = self.wait_for_log(HTTP_LISTENING).group(1)

    @property
    def url(self) -> str:
        assert self.grpc_addr is not None, "wait_listening() first"
        return self.grpc_addr

    @property
    def admin_url(self) -> str:
        assert self.admin_addr is not None, "wait_listening() first"
        return f"http://{self.admin_addr}"

    def client(self) -> grpcclient.InferenceServerClient:
        if self._client is None:
            self._client = grpcclient.InferenceServerClient(self.url)
        return self._client

    def wait_until(self, predicate, what: str, timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Polls `predicate(client)` until it is true; gRPC errors count as 'not yet'."""
        deadline = time.monotonic() + timeout
        last_error = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(
                    f"gateway exited with {self.process.returncode} while waiting until {what}; "
                    f"stderr:\n{self.stderr()}"
                )
            try:
                if predicate(self.client()):
                    return
            except InferenceServerException as e:
                last_error = e
            time.sleep(POLL_INTERVAL_S)
        pytest.fail(f"gateway not {what} after {timeout}s (last error {last_error}); stderr:\n{self.stderr()}")

    def wait_ready(self) -> None:
        self.wait_until(lambda c: c.is_server_ready(), "ready")

    def wait_live(self) -> None:
        self.wait_until(lambda c: c.is_server_live(), "live")

    def stop(self) -> int:
        """SIGTERM, then waits for the exit; returns the exit code. Fails if it does not exit."""
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=SHUTDOWN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                pytest.fail(
                    f"gateway did not exit within {SHUTDOWN_TIMEOUT_S}s of SIGTERM; stderr:\n{self.stderr()}"
                )
        self._reader.join(timeout=5)
        return self.process.returncode


def start_gateway(repository: Path, *extra_args: str, wait_ready: bool = True) -> Gateway:
    """Starts a gateway on `repository`, waits until it listens (and, by default, is ready)."""
    gateway = Gateway(repository, list(extra_args))
    try:
        gateway.wait_listening()
        if wait_ready:
            gateway.wait_ready()
    except BaseException:
        if gateway.process.poll() is None:
            gateway.process.kill()
            gateway.process.wait()
        raise
    return gateway


def run_gateway_to_exit(repository: Path, *extra_args: str, timeout: float = STARTUP_TIMEOUT_S):
    """Runs a gateway that is expected to exit by itself; returns (exit code, stderr)."""
    try:
        done = subprocess.run(
            gateway_command(repository, list(extra_args)),
            cwd=REPO_ROOT,
            env=gateway_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        stderr = (e.stderr or b"").decode("utf-8", errors="replace")
        pytest.fail(f"gateway still running after {timeout}s; stderr:\n{stderr}")
    return done.returncode, ANSI_ESCAPE.sub("", done.stderr.decode("utf-8", errors="replace"))


# ---- helpers shared by the test modules -------------------------------------------------------

ADD_SUB_DIMS = 16


def add_sub_inputs(batch: int = 1, seed: int = 0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((batch, ADD_SUB_DIMS)).astype(np.float32)
    b = rng.standard_normal((batch, ADD_SUB_DIMS)).astype(np.float32)
    return a, b


def infer_add_sub(client, a: np.ndarray, b: np.ndarray, **kwargs):
    inputs = [
        grpcclient.InferInput("INPUT0", list(a.shape), "FP32"),
        grpcclient.InferInput("INPUT1", list(b.shape), "FP32"),
    ]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    return client.infer("add_sub", inputs, **kwargs)


def assert_add_sub_serves(client) -> None:
    """The server still answers a good request correctly (used after every bad request)."""
    a, b = add_sub_inputs(batch=2, seed=99)
    result = infer_add_sub(client, a, b)
    assert np.array_equal(result.as_numpy("OUTPUT0"), a + b)
    assert np.array_equal(result.as_numpy("OUTPUT1"), a - b)
