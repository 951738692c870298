import numpy as np
import pytest

from activeguard.audit import metrics as m


def test_matching_rate():
    assert m.matching_rate([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    with pytest.raises(ValueError, match="empty"):
        m.matching_rate([], [])
    with pytest.raises(ValueError, match="3 labels for 4"):
        m.matching_rate([1, 2, 3, 4], [1, 2, 3])


def test_robustness_uniqueness():
    assert m.robustness([0.5, 0.7, 0.9, 1.0], 0.7) == 0.75
    assert m.uniqueness([0.1, 0.2, 0.7], 0.7) == pytest.approx(2 / 3)


def test_aruc_perfect_and_identical():
    assert m.aruc([1.0, 1.0, 1.0], [0.0, 0.0, 0.005]) == 1.0
    assert m.aruc([1.0, 0.99], [0.0]) == pytest.approx(0.995)  # only τ = 1 loses half the positives
    rng = np.random.default_rng(0)
    same = rng.random(50)
    assert m.aruc(same, same) <= 0.5


def test_aruc_hand_computed():
    # positives at 0.6, negatives at 0.3: min(R, U) = 1 for τ in (0.3, 0.6] -> τ' = 31..60 -> 30/100.
    assert m.aruc([0.6], [0.3]) == pytest.approx(0.30)
    # r = 4: τ = .25,.5,.75,1 ; pos 0.8 -> R = 1,1,1,0 ; neg 0.4 -> U = 0,1,1,1 -> (0+1+1+0)/4
    assert m.aruc([0.8], [0.4], r=4) == 0.5


def test_roc_auc_and_gap():
    assert m.roc_auc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert m.roc_auc([0.1, 0.9], [0.5, 0.5]) == 0.5
    assert m.gap([0.9, 0.8], [0.1, 0.3]) == pytest.approx(0.5)
    assert m.gap([0.2], [0.3]) == pytest.approx(-0.1)
    with pytest.raises(ValueError, match="NaN"):
        m.gap([float("nan")], [0.1])
