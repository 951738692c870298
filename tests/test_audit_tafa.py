"""TAFA reconstruction: boundary points, black-box scores, all three task kinds."""

import copy
import dataclasses

import numpy as np
import pytest
import torch

from activeguard.audit import files, tafa
from activeguard.experiments.suspects import as_callable
from activeguard.models.architectures import (
    MLPClassifier,
    MLPRegressor,
    train,
    train_generator,
    train_regressor,
)
from activeguard.models.attacks import fine_tune, global_prune
from activeguard.models.data import load_diabetes, load_fashion_mnist


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
        output="softmax",
        solver="gradient",
        bounds=(0.0, 1.0),
        init="uniform",
        seed=0,
    )
    assert fp.solver == "gradient"
    # its slopes share a template: they are stored (a calibration may choose them) but not in the plain score
    assert fp.slopes is not None and fp.slope_sharing > tafa.SLOPE_MAX_SHARING
    assert tafa.METHOD.note(fp).startswith("slope test not in the score")
    torch.manual_seed(5)
    other = train(MLPClassifier(), mnist.x_train[:1000], mnist.y_train[:1000], epochs=2, seed=5)
    positive = global_prune(lenet, 0.3)
    wrap = lambda m: lambda x: softmax(m(x))
    for statistic in tafa.STATISTICS:
        assert tafa.verify(fp, wrap(lenet), statistic) == pytest.approx(1.0)
        assert tafa.verify(fp, wrap(positive), statistic) > tafa.verify(fp, wrap(other), statistic)


def test_kink_statistic_is_calibrated_by_the_suspects_own_bends(regression):
    """The kink score is a chance probability on a log scale: the owner and a copy whose output layer
    was rescaled (what retraining the last layer does) are sure matches, while the distance statistic
    drops for the rescaled copy; independent networks stay under the decision threshold, and the
    per-point evidence adds up to the reported counts."""
    owner, _, negatives = regression
    fp = tafa.generate(owner, 60, (10,), solver="lp", seed=0)
    rescaled = copy.deepcopy(owner)
    with torch.no_grad():
        last = rescaled.net[-1]
        last.weight.mul_(3.0)
        last.bias.mul_(3.0)
    assert tafa.verify(fp, rescaled, "kink") == pytest.approx(1.0)
    assert tafa.verify(fp, rescaled, "distance") < 0.5
    for negative in negatives:
        found = tafa.kink_evidence(fp, negative)
        assert found.score < tafa.DECISION_THRESHOLD
        assert found.p_value > 10 ** (-tafa.KINK_LOG10_SCALE * tafa.DECISION_THRESHOLD)
    mine = tafa.METHOD.score(fp, owner)
    assert mine.value == pytest.approx(1.0)
    assert mine.evidence["matched_points"] == sum(p["match"] for p in mine.evidence["per_point"]) == len(fp.points)
    assert "bends as the owner's at" in tafa.METHOD.explain(mine)


def test_boundary_normals_survive_a_reinitialized_output_layer(monkeypatch):
    """A generator whose output layer was replaced by fresh random weights keeps every hidden boundary
    but bends another way in output space: the bend test alone misses it, the boundary-normal test
    (the Jacobian jump's input-side direction) matches it; an independent generator matches neither."""
    images = load_fashion_mnist(seed=0, limit=600).x_train
    owner = train_generator(images, epochs=2, seed=0)
    negative = train_generator(images, epochs=2, seed=1)
    relabelled = copy.deepcopy(owner)
    torch.manual_seed(7)
    last = relabelled.net[-1]
    relabelled.net[-1] = torch.nn.Linear(last.in_features, last.out_features)
    fp = tafa.generate(owner, 60, (owner.config["latent_dim"],), seed=0)
    found = tafa.kink_evidence(fp, relabelled)
    assert found.score == pytest.approx(1.0)
    assert float(found.normal_cosines.median()) > tafa.NORMAL_COSINE
    assert float(found.cosines.median()) < tafa.KINK_COSINE  # its bends point elsewhere in output space
    assert tafa.kink_evidence(fp, negative).score < tafa.DECISION_THRESHOLD
    monkeypatch.setattr(tafa, "NORMAL_COSINE", 1.01)  # the bend test alone
    assert tafa.kink_evidence(fp, relabelled).score < tafa.DECISION_THRESHOLD


def test_slopes_carry_a_deep_copy_whose_bends_moved():
    """One epoch of fine-tuning every layer of the Fashion-MNIST ResNet (15 conv layers; the workload's
    quick owner) moves its dense bends out of the bend and normal tests' reach; the slope test still
    finds the copy.  An independently trained ResNet (another seed) stays under the threshold."""
    from activeguard.models import workloads
    from tests.protect_fixtures import fashion_owner

    owner, spec, split = fashion_owner()
    work = workloads.get("fashion-resnet")
    independent = work.owner(1, work.quick, split=split).network.eval()
    copied = fine_tune(owner, split.x_test[:1000], split.y_test[:1000], epochs=1, lr=0.01, seed=0).eval()
    fp = tafa.generate(owner, 60, (1, 28, 28), output="softmax", solver="gradient", bounds=spec.bounds, init="uniform")
    assert fp.slopes is not None and fp.slope_sharing <= tafa.SLOPE_MAX_SHARING  # shattered slopes
    assert tafa.METHOD.note(fp).startswith("slope test in the score")
    wrap = lambda m: lambda x: torch.softmax(m(x), 1)  # noqa: E731
    found = tafa.kink_evidence(fp, wrap(copied))
    assert found.score == pytest.approx(1.0) and found.slope.p_value < found.bend_p_value
    without_slopes = dataclasses.replace(fp, slopes=None, slope_scale=0.0)
    assert tafa.kink_evidence(without_slopes, wrap(copied)).score < tafa.DECISION_THRESHOLD
    assert tafa.kink_evidence(fp, wrap(independent)).score < tafa.DECISION_THRESHOLD


def test_fingerprint_generation_reads_no_data(monkeypatch, regression):
    """TAFA is data-free: generation through the audit interface runs with every dataset loader broken."""
    import activeguard.models.data as data_module
    from activeguard.audit.base import Owner

    def refuse(*_args, **_kwargs):
        raise AssertionError("TAFA read a dataset")

    for name in dir(data_module):
        if name.startswith("load_"):
            monkeypatch.setattr(data_module, name, refuse)
    owner = regression[0]
    assert tafa.METHOD.needs_data is False
    fp = tafa.METHOD.generate(Owner(owner, (10,), None, "regression"), tafa.TafaParams(points=10), None)
    assert len(fp.points) > 0 and fp.kinks is not None


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


def test_an_edited_fingerprint_file_names_its_bad_field(regression, tmp_path):
    """A file whose per-point fields disagree with its points is refused on loading, naming the field,
    instead of failing at scoring time with an error that blames the suspect's outputs."""
    fp = tafa.generate(regression[0], 5, (10,), seed=0)
    assert fp.kinks is not None
    n, m = fp.outputs.shape
    dataclasses.replace(fp, slopes=torch.zeros(n, tafa.NORMAL_PROBES, m))  # the shape generation writes
    for field, bad in (
        ("slopes", torch.zeros(n, 3, m)),
        ("kinks", fp.kinks[:4]),
        ("directions", fp.directions[:, :9]),
        ("slopes", 1.5),
        ("points", None),
        ("points", fp.points.long()),
    ):
        edited = dataclasses.replace(fp)
        setattr(edited, field, bad)  # as an editor of the file would, past the constructor's check
        path = files.save(edited, tmp_path / f"{field}.tafa")
        with pytest.raises(
            files.FingerprintFileError, match=f"fingerprint's {field} (have shape|is a|are torch.int64)"
        ):
            files.load(path)
    files.load(files.save(fp, tmp_path / "intact.tafa"))  # the untouched fingerprint still loads


def test_every_kink_window_is_measured():
    """Each window (the point's and the four null windows on its line) has a finite bend size: a window
    whose slope was taken from an empty slice would never match and bias the null rate down."""
    line = torch.cumsum(torch.rand(3, 2 * tafa.KINK_HALF + 1, 2, dtype=torch.float64), 1)
    centres = [tafa.KINK_HALF] + [tafa.KINK_HALF + u for u in tafa.KINK_NULL_OFFSETS]
    bends, sizes = tafa._bends_at(line, centres)
    assert bends.shape == (3, len(centres), 2) and torch.isfinite(sizes).all() and (sizes > 0).all()
