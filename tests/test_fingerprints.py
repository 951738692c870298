"""ActiveGuard Table 1 and Figure 2 analogs on the real MNIST digits, plus bad input."""

import json

import pytest
import torch

from activeguard.credentials.control import ControlConfig
from activeguard.credentials.fingerprints import authenticate, encode, generate_fingerprints
from activeguard.experiments.core_evaluation import (
    authentication_table,
    control_accuracy,
    false_acceptance,
    seed_images,
)
from activeguard.models.architectures import accuracy

PAPER = ControlConfig(num_classes=10, confidences=(0.2, 0.3, 0.4), epsilon=0.01)


@pytest.fixture(scope="module")
def table(lenet, mnist):
    return authentication_table(lenet, PAPER, mnist.x_test, per_user=20, seed=1)


def test_table1_every_user_authenticates_as_themselves(table):
    result, fps = table
    assert len(result.per_user) == 30 and result.fingerprints == 600
    assert result.minimum >= 0.95, result.per_user
    assert result.wrong_identity == 0
    print(
        "\nTable 1 analog:",
        json.dumps({"min": result.minimum, "median": result.median, "seconds": round(result.generation_seconds, 1)}),
    )


def test_generator_flags_agree_with_an_independent_pass(table, lenet):
    _, fps = table
    assert fps.inputs.min() >= 0 and fps.inputs.max() <= 1
    admitted, who = authenticate(lenet, fps.inputs, PAPER)
    assert torch.equal(admitted & (who == fps.users), fps.success)


def test_figure2_authorized_vs_unauthorized_accuracy(lenet, mnist):
    figures = control_accuracy(lenet, PAPER, mnist.x_test, mnist.y_test, seed=0)
    assert figures["authorized_accuracy"] == pytest.approx(accuracy(lenet, mnist.x_test, mnist.y_test))
    assert figures["authorized_accuracy"] >= 0.95
    assert abs(figures["unauthorized_accuracy"] - 0.1) <= 0.05
    print("\nFigure 2 analog:", figures)


def test_false_acceptance_is_measured(lenet, mnist):
    rates = false_acceptance(lenet, PAPER, mnist.x_test, noise_count=1000, seed=0)
    print("\npaper-mode false acceptance:", rates)
    assert set(rates) == {"clean", "uniform_noise"}
    assert all(0.0 <= r <= 1.0 for r in rates.values())


def test_uint8_encoding_survives_quantization(lenet, mnist):
    users = [0, 14, 29]
    fps = generate_fingerprints(lenet, PAPER, users, seed_images(mnist.x_test, 3, 5), encoding="uint8")
    assert fps.success.all()
    assert torch.equal(encode(fps.inputs, "uint8"), fps.inputs)  # already on the 8-bit grid
    admitted, who = authenticate(lenet, fps.inputs, PAPER)
    assert admitted.all() and who.tolist() == users


def test_noise_seeds_when_there_is_no_data(lenet):
    fps = generate_fingerprints(lenet, PAPER, [3, 17], input_shape=(1, 28, 28), seed=3)
    assert fps.success.all()


def test_failures_are_reported_not_returned_as_valid(lenet, mnist):
    fps = generate_fingerprints(lenet, PAPER, [0, 1, 2, 3], seed_images(mnist.x_test, 4, 0), max_steps=1)
    admitted, who = authenticate(lenet, fps.inputs, PAPER)
    assert torch.equal(fps.success, admitted & (who == fps.users))
    assert not fps.success.all()  # one step is not enough for clean seeds
    assert all(len(fps.for_user(u)) == int(fps.success[i]) for i, u in enumerate([0, 1, 2, 3]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(users=[30]), r"user must be in \[0, 30\)"),
        (dict(users=[]), "no users"),
        (dict(users=[0], seeds=torch.full((1, 1, 28, 28), float("nan"))), "NaN"),
        (dict(users=[0], seeds=torch.full((1, 1, 28, 28), 2.0)), r"\[0, 1\]"),
        (dict(users=[0, 1], seeds=torch.rand(1, 1, 28, 28)), "need 2 seed inputs"),
        (dict(users=[0]), "input_shape"),
        (dict(users=[0], input_shape=(1, 28, 28), encoding="jpeg"), "encoding"),
        (dict(users=[0], input_shape=(1, 28, 28), per_user=0), "per_user"),
    ],
)
def test_bad_generation_requests(lenet, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_fingerprints(lenet, PAPER, **kwargs)
