"""Encrypted model files (`model.onnx.enc`) against the real binary. The files are made here with an
independent implementation of the format (Python's `cryptography` AESGCM):

    b"OGWENC01" | sha256(key)[:8] | 12-byte nonce | AES-256-GCM(ciphertext + tag), aad = "<model>/<version>"

Checked: loading and inference with hex and raw key files and two keys at once (rotation); no key, a
wrong key, a tampered file and a file moved to another model each refuse that model with UNAVAILABLE
and a reason while the other models serve; no plaintext copy of the graph appears on disk, in /tmp,
/dev/shm or among the process's open files; the `encrypt-model` command writes the same format."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from tritonclient.utils import InferenceServerException

from harness import (
    MODELS,
    REPO_ROOT,
    assert_add_sub_serves,
    gateway_binary,
    run_gateway_to_exit,
    start_gateway,
)

MAGIC = b"OGWENC01"


def encrypt(key: bytes, plaintext: bytes, model: str, version: int) -> bytes:
    nonce = os.urandom(12)
    sealed = AESGCM(key).encrypt(nonce, plaintext, f"{model}/{version}".encode())
    return MAGIC + hashlib.sha256(key).digest()[:8] + nonce + sealed


def add_sub_graph(marker: str = "") -> bytes:
    """add_sub's ONNX graph, optionally with a unique doc string to look for elsewhere."""
    model = onnx.load(str(MODELS / "add_sub" / "1" / "model.onnx"))
    if marker:
        model.doc_string = marker
    return model.SerializeToString()


def add_sealed_model(repo: Path, name: str, sealed: bytes, version: int = 1) -> None:
    """`name` as a copy of add_sub whose version holds only the encrypted file."""
    config = (MODELS / "add_sub" / "config.pbtxt").read_text()
    (repo / name / str(version)).mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(config.replace('name: "add_sub"', f'name: "{name}"'))
    (repo / name / str(version) / "model.onnx.enc").write_bytes(sealed)


def add_plain_model(repo: Path, name: str) -> None:
    shutil.copytree(MODELS / name, repo / name)


def key_files(tmp_path: Path) -> tuple[bytes, Path, bytes, Path]:
    """Two keys: one in a 64-hex-character file (with a newline), one as 32 raw bytes."""
    hex_key, raw_key = os.urandom(32), os.urandom(32)
    hex_file, raw_file = tmp_path / "key.hex", tmp_path / "key.raw"
    hex_file.write_text(hex_key.hex() + "\n")
    raw_file.write_bytes(raw_key)
    return hex_key, hex_file, raw_key, raw_file


def infer_named(client, model: str):
    a = np.arange(32, dtype=np.float32).reshape(2, 16)
    b = np.ones((2, 16), dtype=np.float32)
    inputs = [grpcclient.InferInput("INPUT0", [2, 16], "FP32"), grpcclient.InferInput("INPUT1", [2, 16], "FP32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    result = client.infer(model, inputs)
    assert np.array_equal(result.as_numpy("OUTPUT0"), a + b)
    assert np.array_equal(result.as_numpy("OUTPUT1"), a - b)


def index_by_name(client) -> dict[str, dict]:
    return {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}


def test_loads_and_infers_with_hex_and_raw_keys(tmp_path):
    hex_key, hex_file, raw_key, raw_file = key_files(tmp_path)
    repo = tmp_path / "repo"
    add_sealed_model(repo, "sealed_hex", encrypt(hex_key, add_sub_graph(), "sealed_hex", 1))
    # Rotation: a model re-encrypted with the new key beside one still on the old key, both served.
    add_sealed_model(repo, "sealed_raw", encrypt(raw_key, add_sub_graph(), "sealed_raw", 1))
    gateway = start_gateway(repo, "--model-key-file", str(hex_file), "--model-key-file", str(raw_file))
    try:
        client = gateway.client()
        infer_named(client, "sealed_hex")
        infer_named(client, "sealed_raw")
        assert client.get_model_metadata("sealed_hex").inputs[0].name == "INPUT0"
        stderr = gateway.stderr()
        for key in (hex_key, raw_key):
            assert key.hex() not in stderr and hashlib.sha256(key).digest()[:8].hex() in stderr
    finally:
        assert gateway.stop() == 0


def bad_repository(tmp_path: Path, key: bytes, wrong_key: bytes) -> Path:
    repo = tmp_path / "repo"
    graph = add_sub_graph()
    add_sealed_model(repo, "wrong_key", encrypt(wrong_key, graph, "wrong_key", 1))
    tampered = bytearray(encrypt(key, graph, "tampered", 1))
    tampered[len(tampered) // 2] ^= 0x01
    add_sealed_model(repo, "tampered", bytes(tampered))
    # Encrypted for another model's place: authenticates only as "elsewhere/1".
    add_sealed_model(repo, "moved", encrypt(key, graph, "elsewhere", 1))
    # Encrypted for version 1 of its own model, but placed as version 2.
    add_sealed_model(repo, "other_version", encrypt(key, graph, "other_version", 1), version=2)
    add_sealed_model(repo, "good", encrypt(key, graph, "good", 1))
    add_plain_model(repo, "add_sub")
    return repo


REASONS = {
    "wrong_key": "no --model-key-file holds the key with id",
    "tampered": "the file was altered, or it was encrypted for another model or version than 'tampered/1'",
    "moved": "encrypted for another model or version than 'moved/1'",
    "other_version": "encrypted for another model or version than 'other_version/2'",
}


def test_bad_files_fail_only_their_model_with_a_reason(tmp_path):
    key, wrong_key = os.urandom(32), os.urandom(32)
    key_file = tmp_path / "key"
    key_file.write_text(key.hex())
    repo = bad_repository(tmp_path, key, wrong_key)
    gateway = start_gateway(
        repo,
        "--model-key-file",
        str(key_file),
        "--model-control-mode=explicit",
        "--load-model",
        "add_sub",
        "--load-model",
        "good",
    )
    try:
        client = gateway.client()
        for model, reason in REASONS.items():
            with pytest.raises(InferenceServerException) as refused:
                client.load_model(model)
            assert refused.value.status() == "StatusCode.UNAVAILABLE", refused.value
            assert reason in refused.value.message(), refused.value.message()
            assert model in refused.value.message()
        index = index_by_name(client)
        for model, reason in REASONS.items():
            assert index[model]["state"] == "UNAVAILABLE"
            assert reason in index[model]["reason"]
        assert index["good"]["state"] == "READY"
        infer_named(client, "good")
        assert_add_sub_serves(client)
    finally:
        assert gateway.stop() == 0


def test_no_key_at_all(tmp_path):
    key = os.urandom(32)
    repo = tmp_path / "repo"
    add_sealed_model(repo, "sealed", encrypt(key, add_sub_graph(), "sealed", 1))
    add_plain_model(repo, "add_sub")
    gateway = start_gateway(repo, "--exit-on-error=false", "--strict-readiness=false")
    try:
        client = gateway.client()
        entry = index_by_name(client)["sealed"]
        assert entry["state"] == "UNAVAILABLE"
        assert "encrypted and no --model-key-file was given" in entry["reason"]
        assert_add_sub_serves(client)
    finally:
        assert gateway.stop() == 0
    # --exit-on-error (the default) applies: startup stops and says why.
    code, stderr = run_gateway_to_exit(repo)
    assert code != 0
    assert "sealed" in stderr and "no --model-key-file was given" in stderr, stderr


def test_a_bad_key_file_stops_startup(tmp_path):
    short = tmp_path / "short.key"
    short.write_bytes(b"too short")
    code, stderr = run_gateway_to_exit(MODELS, "--model-key-file", str(short))
    assert code != 0
    assert "32 raw bytes or 64 hex characters" in stderr and "too short" not in stderr, stderr


def files_under(root: Path) -> set[Path]:
    found = set()
    for dirpath, _, names in os.walk(root, onerror=lambda e: None):
        found.update(Path(dirpath) / n for n in names)
    return found


def holds(path: Path, needle: bytes) -> bool:
    """Whether the file contains `needle` (files too large to be our small graph are skipped)."""
    try:
        if not path.is_file() or path.stat().st_size > 16 * 1024 * 1024:
            return False
        return needle in path.read_bytes()
    except OSError:
        return False


def open_files(pid: int) -> list[str]:
    targets = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            targets.append(os.readlink(fd))
        except OSError:
            pass
    return targets


def test_no_plaintext_file_appears_while_loading(tmp_path):
    key = os.urandom(32)
    key_file = tmp_path / "key"
    key_file.write_bytes(key)
    marker = f"plaintext-marker-{os.urandom(8).hex()}"
    graph = add_sub_graph(marker)
    assert marker.encode() in graph
    repo = tmp_path / "repo"
    add_sealed_model(repo, "sealed", encrypt(key, graph, "sealed", 1))
    watched = [repo, Path("/tmp"), Path("/dev/shm")]
    before = set().union(*(files_under(d) for d in watched))
    gateway = start_gateway(repo, "--model-key-file", str(key_file), wait_ready=False)
    seen_fds: set[str] = set()
    stop = threading.Event()

    def watch_fds():
        while not stop.is_set():
            try:
                seen_fds.update(open_files(gateway.process.pid))
            except OSError:
                return
            stop.wait(0.002)

    watcher = threading.Thread(target=watch_fds)
    watcher.start()
    try:
        gateway.wait_ready()
        infer_named(gateway.client(), "sealed")
    finally:
        stop.set()
        watcher.join()
    try:
        after = set().union(*(files_under(d) for d in watched))
        new_files = after - before
        assert not [p for p in new_files if holds(p, marker.encode())], new_files
        assert {p.name for p in files_under(repo)} == {"config.pbtxt", "model.onnx.enc"}
        # Among every file the process held open during the load: only the encrypted model file.
        model_files = [t for t in seen_fds if "sealed" in t or t.endswith(".onnx")]
        assert all(t.endswith("model.onnx.enc") for t in model_files), model_files
        regular = [Path(t) for t in seen_fds if t.startswith("/") and Path(t).is_file()]
        assert not [p for p in regular if holds(p, marker.encode())], regular
        assert not [t for t in seen_fds if t.startswith("/memfd:")], seen_fds
    finally:
        assert gateway.stop() == 0


def test_encrypt_model_command_writes_the_format(tmp_path):
    key = os.urandom(32)
    key_file = tmp_path / "key"
    key_file.write_text(key.hex())
    repo = tmp_path / "repo"
    add_sealed_model(repo, "sealed", b"placeholder", version=3)
    out = repo / "sealed" / "3" / "model.onnx.enc"
    plaintext = MODELS / "add_sub" / "1" / "model.onnx"
    done = subprocess.run(
        [str(gateway_binary()), "encrypt-model", "--key-file", str(key_file), "--model-name", "sealed",
         "--version", "3", str(plaintext), str(out)],
        cwd=REPO_ROOT, capture_output=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    sealed = out.read_bytes()
    assert sealed[:8] == MAGIC and sealed[8:16] == hashlib.sha256(key).digest()[:8]
    opened = AESGCM(key).decrypt(sealed[16:28], sealed[28:], b"sealed/3")
    assert opened == plaintext.read_bytes()
    assert key.hex().encode() not in done.stderr
    gateway = start_gateway(repo, "--model-key-file", str(key_file))
    try:
        infer_named(gateway.client(), "sealed")
    finally:
        gateway.stop()


def test_encrypt_model_command_refuses_bad_arguments(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("not a key")
    done = subprocess.run(
        [str(gateway_binary()), "encrypt-model", "--key-file", str(key_file), "--model-name", "m",
         "--version", "1", str(MODELS / "add_sub" / "1" / "model.onnx"), str(tmp_path / "out")],
        capture_output=True, timeout=60,
    )
    assert done.returncode != 0
    assert re.search(rb"32 raw bytes or 64 hex characters", done.stderr), done.stderr
    assert not (tmp_path / "out").exists()
