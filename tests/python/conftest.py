"""pytest fixtures: gateways on the example repository (models/) and the test-only one (tests/models/),
plus a factory for gateways on temporary repositories with extra flags. See harness.py."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from harness import MODELS, TEST_MODELS, Gateway, start_gateway


@pytest.fixture
def gateway_factory():
    """Starts gateways on custom repositories/flags for one test and stops them afterwards."""
    started: list[Gateway] = []

    def factory(repository: Path, *extra_args: str, wait_ready: bool = True) -> Gateway:
        gateway = start_gateway(repository, *extra_args, wait_ready=wait_ready)
        started.append(gateway)
        return gateway

    yield factory
    for gateway in started:
        gateway.stop()


def _session_gateway(repository: Path):
    gateway = start_gateway(repository)
    yield gateway
    gateway.stop()


@pytest.fixture(scope="session")
def models_gateway():
    """One gateway on the example repository models/ for the whole session."""
    yield from _session_gateway(MODELS)


@pytest.fixture(scope="session")
def test_models_gateway():
    """One gateway on the test-only repository tests/models/ (identity_<dtype> models)."""
    yield from _session_gateway(TEST_MODELS)


@pytest.fixture
def client(models_gateway) -> grpcclient.InferenceServerClient:
    return models_gateway.client()


@pytest.fixture
def test_client(test_models_gateway) -> grpcclient.InferenceServerClient:
    return test_models_gateway.client()


@pytest.fixture
def repo_copy(tmp_path):
    """Returns a function that builds a temporary repository from models/ entries plus extras."""

    def make(*model_names: str) -> Path:
        repository = tmp_path / "repository"
        repository.mkdir(exist_ok=True)
        for name in model_names:
            shutil.copytree(MODELS / name, repository / name)
        return repository

    return make


