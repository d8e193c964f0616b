"""scripts/gpu/package.py and reassemble.py on small fake libraries: the round trip rebuilds the
files byte for byte across several chunks, and a corrupt or missing chunk is refused by name."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from harness import REPO_ROOT

SCRIPTS = REPO_ROOT / "scripts" / "gpu"


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS / script), *args], capture_output=True, text=True)


@pytest.fixture
def packed(tmp_path):
    libs = tmp_path / "libs"
    libs.mkdir()
    # Incompressible content, so a 0.5 MiB chunk limit gives several chunks.
    files = {"libonnxruntime.so.1.31.1": os.urandom(1_500_000), "libonnxruntime_providers_shared.so": os.urandom(5_000)}
    args = []
    for name, data in files.items():
        (libs / name).write_bytes(data)
        args += ["--file", str(libs / name)]
    chunks = tmp_path / "chunks"
    done = run("package.py", *args, "--out", str(chunks), "--chunk-mib", "0.5", "--preset", "0")
    assert done.returncode == 0, done.stderr
    return files, chunks


def test_round_trip_rebuilds_every_library(packed, tmp_path):
    files, chunks = packed
    manifest = json.loads((chunks / "MANIFEST.json").read_text())
    assert len(manifest["chunks"]) >= 3
    assert all(c["size"] <= 512 * 1024 for c in manifest["chunks"])
    out = tmp_path / "lib"
    done = run("reassemble.py", "--chunks", str(chunks), "--out", str(out))
    assert done.returncode == 0, done.stderr
    for name, data in files.items():
        assert (out / name).read_bytes() == data
    assert os.readlink(out / "libonnxruntime.so") == "libonnxruntime.so.1.31.1"


def test_a_corrupt_chunk_is_refused_by_name(packed, tmp_path):
    _, chunks = packed
    second = sorted(chunks.glob("ort-gpu.tar.xz.*"))[1]
    data = bytearray(second.read_bytes())
    data[100] ^= 0xFF
    second.write_bytes(bytes(data))
    out = tmp_path / "lib"
    done = run("reassemble.py", "--chunks", str(chunks), "--out", str(out))
    assert done.returncode == 1
    assert second.name in done.stderr and "checksum" in done.stderr
    assert not out.exists() or not any(out.iterdir()), "nothing half-built is left"


def test_a_missing_chunk_is_refused_by_name(packed, tmp_path):
    _, chunks = packed
    last = sorted(chunks.glob("ort-gpu.tar.xz.*"))[-1]
    last.unlink()
    done = run("reassemble.py", "--chunks", str(chunks), "--out", str(tmp_path / "lib"))
    assert done.returncode == 1
    assert f"chunk {last.name} is missing" in done.stderr


def test_a_wheel_without_the_gpu_libraries_is_refused(tmp_path):
    import zipfile

    wheel = tmp_path / "onnxruntime-1.31.1-cp311-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("onnxruntime/capi/libonnxruntime.so.1.31.1", b"cpu only")
    done = run("package.py", "--wheel", str(wheel), "--out", str(tmp_path / "chunks"))
    assert done.returncode != 0
    assert "libonnxruntime_providers_cuda.so" in done.stderr
