"""TAFA reconstruction: boundary points, black-box scores, all three task kinds."""

import numpy as np
import pytest
import torch

from activeguard.attacks import fine_tune, global_prune
from activeguard.audit import tafa
from activeguard.audit.suspects import as_callable
from activeguard.data import load_diabetes, load_fashion_mnist
from activeguard.models import (
    MLPClassifier,
    MLPRegressor,
    train,
    train_generator,
    train_regressor,
)


def _scores(fp, positives, negatives, statistic):
    pos = [tafa.verify(fp, as_callable(m), statistic) for m in positives]
    neg = [tafa.verify(fp, as_callable(m), statistic) for m in negatives]
    return pos, neg


@pytest.fixture(scope="module")
def regression():
    split = load_diabetes(seed=0)
    owner = train_regressor(split, epochs=40, seed=0)
    positives = [
        global_prune(owner, 0.2),
        fine_tune(owner, split.x_test[:40], split.y_test[:40], epochs=5, lr=0.002, loss="mse"),
    ]
    negatives = []
    for s in (1, 2):
        torch.manual_seed(s)
        negatives.append(
            train(MLPRegressor(10), split.x_train, split.y_train, loss="mse", epochs=40, batch_size=32, seed=s)
        )
    return owner, positives, negatives


def test_lp_points_are_on_a_region_boundary(regression):
    owner = regression[0]
    layers = tafa.relu_mlp_layers(owner)
    points, dirs = tafa.lp_boundary_points(owner, 10, (10,), seed=0)
    assert len(points) == 10
    for x in points:
        pre = [a @ x.double() + c for a, c, _ in tafa._affine_maps(layers, x)]
        closest = min(float(p.abs().min()) for p in pre)
        assert closest < 1e-4  # one hidden neuron sits exactly at its kink
    assert torch.allclose(dirs.norm(dim=1), torch.ones(10), atol=1e-5)


@pytest.mark.parametrize("statistic", tafa.STATISTICS)
def test_regression(regression, statistic):
    owner, positives, negatives = regression
    fp = tafa.generate(owner, 30, (10,), solver="lp", seed=0)
    assert tafa.verify(fp, owner, statistic) == pytest.approx(1.0)
    pos, neg = _scores(fp, positives, negatives, statistic)
    assert np.mean(pos) > np.mean(neg)


def test_generator():
    images = load_fashion_mnist(seed=0, limit=600).x_train
    owner = train_generator(images, epochs=2, seed=0)
    negative = train_generator(images, epochs=2, seed=1)
    positive = global_prune(owner, 0.2)
    fp = tafa.generate(owner, 20, (owner.config["latent_dim"],), seed=0)
    assert fp.solver == "lp"
    for statistic in tafa.STATISTICS:
        assert tafa.verify(fp, owner, statistic) == pytest.approx(1.0)
        pos, neg = _scores(fp, [positive], [negative], statistic)
        assert pos[0] > neg[0]


def test_classifier_gradient_path(lenet, mnist):
    softmax = lambda z: torch.softmax(z, 1)
    fp = tafa.generate(
        lenet,
        30,
        (1, 28, 28),
        output=lambda x: softmax(lenet(x)),
        solver="gradient",
        bounds=(0.0, 1.0),
        init="uniform",
        seed=0,
    )
    assert fp.solver == "gradient"
    torch.manual_seed(5)
    other = train(MLPClassifier(), mnist.x_train[:1000], mnist.y_train[:1000], epochs=2, seed=5)
    positive = global_prune(lenet, 0.3)
    wrap = lambda m: lambda x: softmax(m(x))
    for statistic in tafa.STATISTICS:
        assert tafa.verify(fp, wrap(lenet), statistic) == pytest.approx(1.0)
        assert tafa.verify(fp, wrap(positive), statistic) > tafa.verify(fp, wrap(other), statistic)


def test_bad_suspects(regression):
    owner = regression[0]
    fp = tafa.generate(owner, 5, (10,), seed=0)
    with pytest.raises(ValueError, match="input"):
        tafa.verify(fp, MLPRegressor(in_features=7))
    with pytest.raises(ValueError, match="outputs have shape"):
        tafa.verify(fp, lambda x: torch.zeros(len(x), 3))
    with pytest.raises(ValueError, match="statistic"):
        tafa.verify(fp, owner, "nope")
    with pytest.raises(ValueError, match="empty"):
        tafa.TafaFingerprint(
            torch.empty(0, 10), torch.empty(0, 10), 0.1, torch.empty(0, 1), torch.empty(0, 1), 1.0, "lp"
        )
    with pytest.raises(ValueError, match="not a fully-connected"):
        tafa.lp_boundary_points(torch.nn.Conv2d(1, 1, 3), 2, (1, 5, 5))
