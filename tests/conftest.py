"""Shared fixtures: one MNIST split and one trained LeNet-5 per test session (about 10 s)."""

from __future__ import annotations

import pytest
import torch

from activeguard.models.architectures import LeNet5, train_lenet5
from activeguard.models.data import Split, load_mnist
from tests.processes import ServerProcess
from tests.serving_fixtures import Deployment, build

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def mnist() -> Split:
    return load_mnist(seed=0)


@pytest.fixture(scope="session")
def lenet(mnist: Split) -> LeNet5:
    """The reference LeNet-5 (15 epochs, seed 0). Tests must not modify it in place."""
    return train_lenet5(mnist, epochs=15, seed=0)


@pytest.fixture(scope="session")
def deployment(lenet, mnist, tmp_path_factory) -> Deployment:
    """Keys, two users' fingerprints and licenses for the reference model."""
    return build(lenet, mnist.x_test, tmp_path_factory.mktemp("serving"), users=[4, 17])


@pytest.fixture(scope="session")
def server(deployment):
    """One real TorchServe serving the model three ways: random policy, reject policy, paper mode."""
    from handlers.packaging import package
    from handlers.server import ManagedTorchServe

    d = deployment
    package(d.model_path, d.profile(policy="random"), "guarded", d.store)
    package(d.model_path, d.profile(policy="reject"), "strict", d.store)
    package(d.model_path, d.profile(policy="reject", paper_mode=True), "paper", d.store)
    with ManagedTorchServe(
        d.store,
        {"guarded": "guarded.mar", "strict": "strict.mar", "paper": "paper.mar"},
        batch_size=8,
        max_batch_delay_ms=20,
    ) as ts:
        yield ts


@pytest.fixture(scope="session")
def fashion_archive(tmp_path_factory) -> dict:
    """An owner's existing TorchServe deployment (Fashion-MNIST ResNet + PNG handler); see protect_fixtures."""
    from tests.protect_fixtures import fashion_deployment

    return fashion_deployment(tmp_path_factory.mktemp("fashion-owner"))


@pytest.fixture
def servers():
    """Start license server processes through this; every one is stopped in teardown, even after a failure."""
    started: list[ServerProcess] = []

    def start(*args, **kwargs) -> ServerProcess:
        s = ServerProcess(*args, **kwargs)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()
