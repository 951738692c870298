"""Shared fixtures: one MNIST split and one trained LeNet-5 per test session (about 10 s)."""

from __future__ import annotations

import pytest
import torch

from activeguard.data import Split, load_mnist
from activeguard.models import LeNet5, train_lenet5

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def mnist() -> Split:
    return load_mnist(seed=0)


@pytest.fixture(scope="session")
def lenet(mnist: Split) -> LeNet5:
    """The reference LeNet-5 (15 epochs, seed 0). Tests must not modify it in place."""
    return train_lenet5(mnist, epochs=15, seed=0)
