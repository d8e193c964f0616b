#!/usr/bin/env python3
"""Rebuilds the libraries package.py packed: checks every chunk's sha256, joins them, checks the
archive's, unpacks it and checks every library's, then links libonnxruntime.so to the versioned
file. Any mismatch or missing chunk stops with a message naming it and exit status 1, leaving no
half-written library behind. Standard library only (it runs on the device machine).

    python3 scripts/gpu/reassemble.py --chunks .whl/chunks --out .whl/ort-gpu/lib
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import tarfile
from pathlib import Path

MANIFEST = "MANIFEST.json"


def fail(message: str) -> None:
    print(f"reassemble: {message}", file=sys.stderr)
    sys.exit(1)


def joined_archive(chunks_dir: Path, manifest: dict) -> bytes:
    parts = []
    for chunk in manifest["chunks"]:
        path = chunks_dir / chunk["name"]
        if not path.is_file():
            fail(f"chunk {chunk['name']} is missing from {chunks_dir}")
        data = path.read_bytes()
        if len(data) != chunk["size"] or hashlib.sha256(data).hexdigest() != chunk["sha256"]:
            fail(f"chunk {chunk['name']} does not match its checksum (corrupt or partial transfer)")
        parts.append(data)
    archive = b"".join(parts)
    if hashlib.sha256(archive).hexdigest() != manifest["archive"]["sha256"]:
        fail("the joined archive does not match its checksum")
    return archive


def unpack(archive: bytes, manifest: dict, out: Path) -> None:
    wanted = {lib["name"]: lib for lib in manifest["libraries"]}
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:xz") as tar:
        for member in tar.getmembers():
            if member.name not in wanted or not member.isfile():
                fail(f"unexpected archive entry {member.name!r}")
            data = tar.extractfile(member).read()
            if hashlib.sha256(data).hexdigest() != wanted[member.name]["sha256"]:
                fail(f"library {member.name} does not match its checksum")
            partial = out / (member.name + ".partial")
            partial.write_bytes(data)
            partial.chmod(0o755)
            partial.replace(out / member.name)
            del wanted[member.name]
    if wanted:
        fail(f"the archive lacks {', '.join(sorted(wanted))}")


def link_unversioned(out: Path) -> None:
    for versioned in out.glob("libonnxruntime.so.*"):
        link = out / "libonnxruntime.so"
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(versioned.name, link)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=Path, required=True, help="folder with the chunks and MANIFEST.json")
    parser.add_argument("--out", type=Path, required=True, help="folder for the libraries")
    args = parser.parse_args()
    manifest_path = args.chunks / MANIFEST
    if not manifest_path.is_file():
        fail(f"{manifest_path} is missing")
    manifest = json.loads(manifest_path.read_text())
    unpack(joined_archive(args.chunks, manifest), manifest, args.out)
    link_unversioned(args.out)
    names = ", ".join(lib["name"] for lib in manifest["libraries"])
    print(f"reassembled {names} into {args.out}")


if __name__ == "__main__":
    main()
