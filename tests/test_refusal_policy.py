"""The random policy's dysfunctional model: chance accuracy whatever the archive's secret."""

from __future__ import annotations

import os

import pytest
import torch

from activeguard.credentials.control import ControlConfig
from activeguard.guard.policy import RefusalPolicy


@pytest.mark.parametrize("classes", [3, 6, 10, 100])
def test_exactly_one_top_class_is_shown_as_itself_for_every_secret(classes):
    for _ in range(50):
        policy = RefusalPolicy(ControlConfig(num_classes=classes, confidences=(0.6,)), os.urandom(32))
        shown_as_itself = 0
        for top in range(classes):
            permutation = policy.permutation(top)
            assert sorted(permutation.tolist()) == list(range(classes))  # a permutation: the model's statistics
            shown = int((permutation == top).nonzero()[0, 0])
            assert shown == policy.shown_top(top)
            shown_as_itself += shown == top
        assert shown_as_itself == 1  # accuracy about 1/K, not 0 or 3/K by the luck of the draw


def test_the_same_secret_gives_the_same_answers():
    secret = os.urandom(32)
    a, b = (
        RefusalPolicy(ControlConfig(num_classes=10), secret),
        RefusalPolicy(ControlConfig(num_classes=10), secret),
    )
    assert all(torch.equal(a.permutation(t), b.permutation(t)) for t in range(10))


def test_two_classes_still_get_a_permutation():
    policy = RefusalPolicy(ControlConfig(num_classes=2, confidences=(0.6,)), os.urandom(32))
    assert sorted(policy.permutation(0).tolist()) == [0, 1]
