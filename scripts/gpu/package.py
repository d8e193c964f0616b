#!/usr/bin/env python3
"""Packs ONNX Runtime's GPU libraries for a machine that reaches no registry and receives at most
64 MiB per transfer.

Takes the four libraries out of the onnxruntime-gpu wheel (or any files given with --file), puts
them in one xz-compressed tar, splits that into chunks smaller than --chunk-mib, and writes
MANIFEST.json with the sha256 and size of every library, of the whole archive and of every chunk.
reassemble.py checks all three levels on the other side. Standard library only.

    python3 scripts/gpu/package.py --wheel .whl/onnxruntime_gpu-1.31.1-*.whl --out .whl/chunks
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import sys
import tarfile
import zipfile
from pathlib import Path

ORT_VERSION = "1.31.1"
WHEEL_LIBRARIES = [
    f"onnxruntime/capi/libonnxruntime.so.{ORT_VERSION}",
    "onnxruntime/capi/libonnxruntime_providers_shared.so",
    "onnxruntime/capi/libonnxruntime_providers_cuda.so",
    "onnxruntime/capi/libonnxruntime_providers_tensorrt.so",
]
# A command's transfer to the device carries the whole working tree too (about 6.5 MB of tracked
# files), all within 64 MiB: a 48 MiB chunk leaves room for the tree to grow.
DEFAULT_CHUNK_MIB = 48
MANIFEST = "MANIFEST.json"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def libraries_from_wheel(wheel: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        missing = [n for n in WHEEL_LIBRARIES if n not in names]
        if missing:
            sys.exit(f"{wheel} lacks {', '.join(missing)}: is it onnxruntime-gpu {ORT_VERSION}?")
        return {Path(n).name: archive.read(n) for n in WHEEL_LIBRARIES}


def build_archive(files: dict[str, bytes], preset: int) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz", preset=preset) as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o755
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def write_chunks(archive: bytes, out: Path, chunk_bytes: int) -> list[dict]:
    chunks = []
    for index, start in enumerate(range(0, len(archive), chunk_bytes)):
        piece = archive[start : start + chunk_bytes]
        name = f"ort-gpu.tar.xz.{index:03d}"
        (out / name).write_bytes(piece)
        chunks.append({"name": name, "size": len(piece), "sha256": sha256(piece)})
    return chunks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--wheel", type=Path, help="the onnxruntime-gpu wheel")
    source.add_argument("--file", type=Path, action="append", help="a library to pack (repeatable)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the chunks and manifest")
    parser.add_argument("--chunk-mib", type=float, default=DEFAULT_CHUNK_MIB, help="largest chunk, MiB")
    parser.add_argument("--preset", type=int, default=6, help="xz preset 0-9")
    args = parser.parse_args()

    files = libraries_from_wheel(args.wheel) if args.wheel else {p.name: p.read_bytes() for p in args.file}
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("ort-gpu.tar.xz.*"):
        old.unlink()
    archive = build_archive(files, args.preset)
    chunks = write_chunks(archive, args.out, int(args.chunk_mib * 1024 * 1024))
    manifest = {
        "libraries": [{"name": n, "size": len(d), "sha256": sha256(d)} for n, d in sorted(files.items())],
        "archive": {"size": len(archive), "sha256": sha256(archive)},
        "chunks": chunks,
    }
    (args.out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"{len(files)} libraries, {sum(map(len, files.values()))} bytes -> {len(archive)} bytes xz "
          f"in {len(chunks)} chunks under {args.out}")


if __name__ == "__main__":
    main()
