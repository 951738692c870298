"""Calibrated verdicts (activeguard.audit.calibration): the chance bound, the three verdicts, the choice of
statistic, and the calibration's round trip through a fingerprint file."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from activeguard.audit import calibration as cal
from activeguard.audit import files, ipguard

NULL = cal.Null("rate", 300, (0.31, 0.35, 0.28, 0.40, 0.33, 0.37, 0.30, 0.36), tuple(f"r{a}" for a in range(8)))


def test_the_bound_is_the_student_t_prediction_bound_on_the_logit_scale():
    z = [math.log(s / (1 - s)) for s in NULL.scores]
    mean, sd = sum(z) / 8, float(torch.tensor(z).std())
    assert sd > NULL.floor()  # these references vary more than 300 points' sampling alone
    score = 0.6
    t = (math.log(score / (1 - score)) - mean) / (sd * math.sqrt(1 + 1 / 8))
    bound = NULL.bound(score)
    assert bound.t == pytest.approx(t) and bound.dof == 7
    assert bound.parametric == pytest.approx(stats.t.sf(t, 7))
    assert bound.empirical == pytest.approx(1 / 9)  # above every reference: the rank bound needs no model
    assert NULL.bound(score, selections=6).value == pytest.approx(min(1.0, 6 * bound.parametric))


def test_identical_references_cannot_make_an_accusation_easy():
    """A null of eight identical scores has no spread; the scale's own spread (a binomial's, for a rate of
    300 points) stands in, so a score a few points above them is nowhere near significant."""
    flat = cal.Null("rate", 300, (0.30,) * 8)
    assert flat.floor() == pytest.approx(1 / math.sqrt(300 * 0.3 * 0.7))
    assert flat.bound(0.36).value > 0.01
    chance = cal.Null("chance", 300, (0.0,) * 8)  # −log10 chance 0 everywhere
    assert chance.bound(3.0).value >= 1e-3  # never below the method's own chance, 10^-3


def test_heavy_tailed_chance_statistics_are_judged_on_their_logarithm():
    """On a regressor's slope test, 8 references reached −log10 chance 2.5 at most and an independent twin 8.3
    (measured): judged on ln(1 − log10 p) the twin is not accused; −log10 p itself would have accused it."""
    null = cal.Null("chance", 300, (0.119, 2.531, 1.529, 0.63, 0.094, 0.659, 1.098, 0.299))
    assert null.bound(8.3, selections=4).value > 1e-3
    assert null.bound(70.0, selections=4).value < 1e-3  # a fine-tuned copy's bend test (77.98 measured)


def test_verdicts():
    calibration = cal.Calibration("matching", {"matching": NULL}, selections=6)
    copy = cal.judge({"matching": 0.99}, calibration, 1e-3)
    assert copy.verdict == cal.COPY and copy.bound.value <= 1e-3 and copy.copy
    within = cal.judge({"matching": 0.36}, calibration, 1e-3)
    assert within.verdict == cal.NOT_A_COPY and "within the references' range" in within.reason
    above = cal.judge({"matching": 0.5}, calibration, 1e-3)
    assert above.verdict == cal.INCONCLUSIVE and "above every reference" in above.reason
    assert cal.judge({"matching": 0.99}, calibration, 1e-12).verdict == cal.INCONCLUSIVE  # a stricter alpha
    few = cal.Calibration("matching", {"matching": cal.Null("rate", 300, (0.3, 0.31, 0.32))})
    assert "too few references" in cal.judge({"matching": 1.0}, few).reason
    premise = cal.Calibration("bends", {}, premise="not piecewise linear")
    judged = cal.judge({"bends": 300.0}, premise)
    assert judged.verdict == cal.INCONCLUSIVE and "premise fails" in judged.reason
    bare = cal.judge({"matching": 1.0}, None)
    assert bare.verdict == cal.INCONCLUSIVE and "uncalibrated" in bare.reason
    with pytest.raises(ValueError, match="alpha"):
        cal.judge({"matching": 1.0}, calibration, 0.0)


def test_a_suspect_without_the_chosen_statistic_is_judged_on_another_with_a_null():
    """A label-only endpoint gives no owner_probability; the matching rate's null judges it instead."""
    soft = cal.Null("rate", 300, (0.3, 0.32, 0.29, 0.35, 0.31, 0.33, 0.28, 0.34))
    calibration = cal.Calibration("owner_probability", {"matching": NULL, "owner_probability": soft}, selections=6)
    judged = cal.judge({"matching": 0.99}, calibration, 1e-3)
    assert judged.statistic == "matching" and judged.verdict == cal.COPY


def test_the_choice_favours_the_statistic_whose_weakest_copy_stands_furthest_out():
    weak = cal.Null("rate", 300, (0.6, 0.7, 0.65, 0.75, 0.68, 0.72, 0.66, 0.7))
    options = [
        ({"matching": weak}, {"fine-tuned": {"matching": 0.9}, "pruned": {"matching": 1.0}}),
        ({"matching": NULL}, {"fine-tuned": {"matching": 0.8}, "pruned": {"matching": 0.95}}),
    ]
    index, statistic, selections = cal.choose(options)
    assert (index, statistic, selections) == (1, "matching", 2)


def test_a_calibration_survives_its_file(lenet, mnist, tmp_path):
    fp = ipguard.generate(lenet, 10, x_train=mnist.x_train, seed=0)
    calibration = cal.Calibration(
        "matching", {"matching": NULL}, selections=3, positives={"pruned 50%": {"matching": 1.0}}, note="8 references"
    )
    files.save(fp, tmp_path / "f.agfp", {"num_classes": 10}, calibration)
    loaded = files.load(tmp_path / "f.agfp")
    assert loaded.calibration == calibration and loaded.format == files.FORMAT
    # a file from before calibrated verdicts loads as uncalibrated, and says so
    data = torch.load(tmp_path / "f.agfp", weights_only=True)
    data["format"] = "activeguard-audit-fingerprint/1"
    data.pop("calibration")
    torch.save(data, tmp_path / "old.agfp")
    old = files.load(tmp_path / "old.agfp")
    assert old.calibration is None and old.format.endswith("/1")


numbers = (
    st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(10**30), 10**30) | st.none() | st.text(max_size=5)
)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    data=st.dictionaries(
        st.sampled_from(["statistic", "nulls", "selections", "positives", "premise", "note", "other"]),
        numbers | st.lists(numbers, max_size=4) | st.dictionaries(st.text(max_size=8), numbers | st.lists(numbers)),
        max_size=7,
    )
)
def test_any_calibration_record_reads_or_is_refused_with_a_value_error(data):
    """A file's calibration is read only through from_plain: anything it holds either builds a calibration
    whose nulls are finite, or raises ValueError/TypeError/KeyError, which the file loader reports as one line."""
    try:
        calibration = cal.Calibration.from_plain(data)
    except (ValueError, TypeError, KeyError):
        return
    for null in calibration.nulls.values():
        assert all(math.isfinite(s) for s in null.scores)
