"""The image's root filesystem, assembled by scripts/image-rootfs (the one list of files that
deploy/Dockerfile and scripts/image also use), and the gateway running inside it under chroot: no shell,
no package manager, only the binary, libonnxruntime, the libraries they load, the CA bundle and the
nonroot user. The gateway serves add_sub through the unmodified tritonclient from inside that root.

chroot needs root: as another user the chroot tests skip, except where CI=true, where they fail. The
binary is $GATEWAY_BIN (the debug build in CI); the image's size target applies to the stripped
release build, which scripts/image measures (see docs/kubernetes.md), not to this test.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from harness import (
    MODELS,
    REPO_ROOT,
    assert_add_sub_serves,
    gateway_binary,
    run_gateway_to_exit,
    start_gateway,
)

IMAGE_ROOTFS = REPO_ROOT / "scripts" / "image-rootfs"
SCRIPTS_IMAGE = REPO_ROOT / "scripts" / "image"
ORT_LIBRARY = REPO_ROOT / ".onnxruntime" / "lib" / "libonnxruntime.so"
NONROOT = "65532:65532"
# The image's own environment (deploy/Dockerfile, scripts/image): the absolute library path.
IMAGE_ORT_DYLIB_PATH = "/opt/onnxruntime/lib/libonnxruntime.so"
CHROOT = shutil.which("chroot") or "/usr/sbin/chroot"


def require_root() -> None:
    if os.geteuid() == 0:
        return
    message = "chroot needs root"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}, and CI=true: run the image tests as root in CI")
    pytest.skip(message)


def build_rootfs(dest: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(IMAGE_ROOTFS), *extra, str(gateway_binary()), str(ORT_LIBRARY), str(dest)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory) -> tuple[Path, list[str]]:
    """One root filesystem for the module (the debug binary is large), with add_sub under /models.
    Returns the root and the list of paths image-rootfs printed."""
    root = tmp_path_factory.mktemp("image") / "rootfs"
    done = build_rootfs(root)
    assert done.returncode == 0, done.stderr
    shutil.copytree(MODELS / "add_sub", root / "models" / "add_sub")
    return root, done.stdout.split()


def all_paths(root: Path) -> set[str]:
    """Every file, symlink and directory under root, relative to it."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# --------------------------------------------------------------------------------------------------
# The file list


def test_rootfs_holds_exactly_the_listed_files(rootfs):
    root, listed = rootfs
    listed_entries = {p.rstrip("/") for p in listed}
    present = {p for p in all_paths(root) if not (root / p).is_dir() or (root / p).is_symlink()}
    # Directories are only there to hold the listed files (models/ is listed as the mount point; the
    # add_sub copy is this test's own doing).
    present -= {p for p in present if p.startswith("models/")}
    assert present == listed_entries - {"models"}
    for required in (
        "usr/local/bin/onnx-gateway",
        "opt/onnxruntime/lib/libonnxruntime.so",
        "etc/ssl/certs/ca-certificates.crt",
        "etc/passwd",
        "etc/group",
    ):
        assert required in listed_entries, required
    names = {Path(p).name for p in listed_entries}
    for library in ("libc.so.6", "libstdc++.so.6", "libgcc_s.so.1", "libm.so.6"):
        assert library in names, f"{library} missing from {sorted(names)}"
    assert any(Path(p).name.startswith("ld-linux") for p in listed_entries), listed_entries


def test_rootfs_has_no_shell_and_names_the_nonroot_user(rootfs):
    root, _ = rootfs
    for shell in ("bin/sh", "bin/bash", "usr/bin/sh", "usr/bin/env"):
        assert not (root / shell).exists(), shell
    passwd = (root / "etc" / "passwd").read_text()
    assert re.search(r"^nonroot:x:65532:65532:", passwd, re.M), passwd
    assert re.search(r"^nonroot:x:65532:", (root / "etc" / "group").read_text(), re.M)
    link = root / "opt" / "onnxruntime" / "lib" / "libonnxruntime.so"
    assert link.is_symlink() and not os.readlink(link).startswith("/"), "relative link expected"
    assert link.resolve().is_file()
    assert stat.S_IMODE((root / "usr" / "local" / "bin" / "onnx-gateway").stat().st_mode) == 0o755


def test_rootfs_refuses_a_non_empty_destination(tmp_path):
    (tmp_path / "leftover").write_text("from an earlier build")
    done = build_rootfs(tmp_path)
    assert done.returncode != 0
    assert "is not empty" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["leftover"]


def test_rootfs_refuses_a_missing_input(tmp_path):
    done = subprocess.run(
        [str(IMAGE_ROOTFS), str(tmp_path / "no-such-binary"), str(ORT_LIBRARY), str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert "no-such-binary does not exist" in done.stderr
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------------------------------
# The gateway inside the root filesystem


def chroot_launcher(tmp_path: Path, root: Path, *, mount_proc: bool, ort_dylib_path: str | None) -> Path:
    """A launcher that harness.py runs as the gateway binary: it forwards the harness's flags to the
    gateway inside `root`, as the nonroot user, with only the image's environment. With mount_proc it
    mounts /proc in a private mount namespace (as a container runtime does; the mount ends with the
    process). Every step execs, so the harness's SIGTERM reaches the gateway itself."""
    env = ["NO_COLOR=1"] + ([f"ORT_DYLIB_PATH={ort_dylib_path}"] if ort_dylib_path else [])
    run = (
        f"exec env -i {' '.join(env)} {CHROOT} --userspec={NONROOT} {shlex.quote(str(root))} "
        "/usr/local/bin/onnx-gateway"
    )
    if mount_proc:
        proc = shlex.quote(str(root / "proc"))
        body = f'exec unshare --mount sh -c \'mount -t proc proc {proc} && {run} "$@"\' sh "$@"'
    else:
        body = f'{run} "$@"'
    launcher = tmp_path / "chroot-gateway"
    launcher.write_text(f"#!/bin/sh\n{body}\n")
    launcher.chmod(0o755)
    return launcher


def can_mount_proc() -> bool:
    probe = subprocess.run(
        ["unshare", "--mount", "sh", "-c", "mount -t proc proc /proc"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    return probe.returncode == 0


def serve_in_chroot(monkeypatch, launcher: Path) -> None:
    # harness.py runs $GATEWAY_BIN with its usual flags; the repository is the path inside the root.
    monkeypatch.setenv("GATEWAY_BIN", str(launcher))
    gateway = start_gateway(Path("/models"))
    try:
        client = gateway.client()
        assert client.is_server_ready()
        assert client.is_model_ready("add_sub")
        assert_add_sub_serves(client)
    finally:
        assert gateway.stop() == 0, gateway.stderr()


def test_gateway_serves_from_the_rootfs_with_proc(rootfs, tmp_path, monkeypatch):
    require_root()
    if not can_mount_proc():
        pytest.skip("no permission to mount /proc in a private mount namespace (needs CAP_SYS_ADMIN)")
    root, _ = rootfs
    (root / "proc").mkdir(exist_ok=True)
    serve_in_chroot(
        monkeypatch,
        chroot_launcher(tmp_path, root, mount_proc=True, ort_dylib_path=IMAGE_ORT_DYLIB_PATH),
    )


def test_gateway_serves_from_a_bare_chroot_with_the_image_environment(rootfs, tmp_path, monkeypatch):
    """No /proc at all: the image's absolute ORT_DYLIB_PATH needs no executable path, so it serves."""
    require_root()
    root, _ = rootfs
    assert not (root / "proc" / "self").exists()
    serve_in_chroot(
        monkeypatch,
        chroot_launcher(tmp_path, root, mount_proc=False, ort_dylib_path=IMAGE_ORT_DYLIB_PATH),
    )


def test_relative_library_without_proc_is_a_clear_startup_error(rootfs, tmp_path, monkeypatch):
    """No ORT_DYLIB_PATH: the library is looked up by name, which ort resolves against the
    executable's directory; without /proc that used to be a panic, now it is one error line."""
    require_root()
    root, _ = rootfs
    launcher = chroot_launcher(tmp_path, root, mount_proc=False, ort_dylib_path=None)
    monkeypatch.setenv("GATEWAY_BIN", str(launcher))
    code, stderr = run_gateway_to_exit(Path("/models"))
    assert code != 0
    assert "panicked" not in stderr, stderr
    assert "cannot load ONNX Runtime from the relative path libonnxruntime.so" in stderr, stderr
    assert "Mount /proc" in stderr and "ORT_DYLIB_PATH" in stderr, stderr


# --------------------------------------------------------------------------------------------------
# scripts/image: the same root filesystem as an OCI image, built with buildah


def buildah(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["buildah", "--storage-driver", "vfs", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_scripts_image_builds_the_rootfs_as_an_image():
    """Optional tool: skipped without buildah (or root). Uses the test binary under a test-only name,
    so a real onnx-gateway image in local storage is left alone."""
    require_root()
    if shutil.which("buildah") is None:
        pytest.skip("buildah is not installed (Debian: apt-get install buildah)")
    name = f"onnx-gateway-image-test-{os.getpid()}"
    done = subprocess.run(
        [str(SCRIPTS_IMAGE), "--binary", str(gateway_binary()), "--name", name],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, "STORAGE_DRIVER": "vfs"},
    )
    try:
        assert done.returncode == 0, done.stdout + done.stderr
        last = done.stdout.strip().splitlines()[-1]
        match = re.fullmatch(rf"image {name}:(\S+) (\d+) bytes", last)
        assert match, last
        version = match.group(1)
        assert re.search(rf'^version = "{re.escape(version)}"$', (REPO_ROOT / "Cargo.toml").read_text(), re.M)
        inspected = buildah("inspect", "--type", "image", f"{name}:{version}")
        assert inspected.returncode == 0, inspected.stderr
        info = json.loads(inspected.stdout)
        config = info["OCIv1"]["config"]
        assert config["User"] == NONROOT
        assert config["Entrypoint"] == ["/usr/local/bin/onnx-gateway"]
        assert f"ORT_DYLIB_PATH={IMAGE_ORT_DYLIB_PATH}" in config["Env"]
        assert set(config["ExposedPorts"]) == {"8000/tcp", "8001/tcp", "8002/tcp"}
        layers = json.loads(info["Manifest"])["layers"]
        assert int(match.group(2)) == sum(layer["size"] for layer in layers)
    finally:
        # Stored as localhost/NAME:VERSION; remove whatever this test made, whether or not it passed.
        listed = buildah("images", "--format", "{{.Name}}:{{.Tag}}").stdout.split()
        for image in listed:
            if image.rsplit(":", 1)[0].split("/")[-1] == name:
                buildah("rmi", "--force", image)


# --------------------------------------------------------------------------------------------------
# deploy/Dockerfile and scripts/image describe the same image


def dockerfile_stages(text: str) -> list[tuple[str, list[str]]]:
    """(FROM line, instructions) per stage, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", text)
    stages: list[tuple[str, list[str]]] = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append((line, []))
        elif stages:
            stages[-1][1].append(line)
    return stages


def test_dockerfile_final_stage_is_scratch_with_the_image_rootfs():
    stages = dockerfile_stages((REPO_ROOT / "deploy" / "Dockerfile").read_text())
    final_from, final = stages[-1]
    assert final_from == "FROM scratch"
    copies = [i for i in final if i.startswith("COPY")]
    assert copies == ["COPY --from=rootfs /rootfs/ /"], copies
    assert not any(i.startswith("RUN") for i in final), "a scratch stage has no shell to RUN with"
    rootfs_from, rootfs = next(s for s in stages if s[0].endswith(" AS rootfs"))
    assert "bookworm" in rootfs_from
    builder_from = next(s[0] for s in stages if s[0].endswith(" AS builder"))
    assert "bookworm" in builder_from, "glibc of the rootfs stage must be the one the binary links"
    runs = [i for i in rootfs if i.startswith("RUN image-rootfs ")]
    assert len(runs) == 1 and runs[0].endswith(" /rootfs"), rootfs
    assert "COPY scripts/image-rootfs /usr/local/bin/image-rootfs" in rootfs


def test_dockerfile_and_scripts_image_configure_the_image_alike():
    final = dockerfile_stages((REPO_ROOT / "deploy" / "Dockerfile").read_text())[-1][1]
    script = re.sub(r"\\\n", " ", SCRIPTS_IMAGE.read_text())
    config = re.search(r"buildah config (.*?)\"\$container\"", script, re.S)
    assert config, "scripts/image runs no `buildah config`"
    options = shlex.split(config.group(1))
    pairs = list(zip(options[::2], options[1::2]))

    def values(flag: str) -> list[str]:
        return [v for f, v in pairs if f == flag]

    assert f"ENTRYPOINT {json.dumps(json.loads(values('--entrypoint')[0]))}" in [
        re.sub(r'",\s*"', '", "', i) for i in final
    ]
    cmd = next(i for i in final if i.startswith("CMD "))
    assert json.loads(cmd[len("CMD ") :]) == values("--cmd")[0].split()
    assert f"ENV {values('--env')[0]}" in final
    assert f"USER {values('--user')[0]}" in final
    expose = next(i for i in final if i.startswith("EXPOSE "))
    assert sorted(expose.split()[1:]) == sorted(p.split("/")[0] for p in values("--port"))
