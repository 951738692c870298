import pytest
import torch

from activeguard.credentials.control import ControlConfig, apply_policy, decide
from activeguard.credentials.fo_space import FO


def probs_with(p_max: float, top: int, k: int = 10) -> torch.Tensor:
    rest = (1 - p_max) / (k - 1)
    row = torch.full((k,), rest)
    row[top] = p_max
    return row


def test_fo_allocation_matches_paper():
    cfg = ControlConfig()
    assert cfg.num_users == 30
    # paper: user i*T + j (j from 1) holds (i, c_j); ours counts users and j from 0
    assert cfg.fo_of_user(0) == FO(0, 0.2)
    assert cfg.fo_of_user(5) == FO(1, 0.4)
    assert cfg.fo_of_user(29) == FO(9, 0.4)
    assert all(cfg.user_of_fo(cfg.fo_of_user(u)) == u for u in range(30))
    with pytest.raises(ValueError):
        cfg.fo_of_user(30)


def test_decide_is_vectorized_and_identifies_users():
    cfg = ControlConfig()
    probs = torch.stack([probs_with(0.305, 3), probs_with(0.2, 7), probs_with(0.95, 1), probs_with(0.415, 0)])
    d = decide(probs, cfg)
    assert d.authorized.tolist() == [True, True, False, False]
    assert d.user.tolist() == [3 * 3 + 1, 7 * 3 + 0, -1, -1]
    assert d.reason == ["authorized", "authorized", "confidence_mismatch", "confidence_mismatch"]


def test_rows_that_are_not_probabilities_are_refused_not_admitted():
    cfg = ControlConfig()
    logits_like = probs_with(0.3, 2) * 3  # sums to 3: a logit vector passed by mistake
    d = decide(logits_like[None], cfg)
    assert not d.authorized[0] and d.reason == ["not_class_probabilities"]


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.full((2, 10), float("nan")), "NaN"),
        (torch.ones(3, 4), r"shape \(batch, 10\)"),
        (torch.ones(10), r"shape \(batch, 10\)"),
    ],
)
def test_bad_outputs_raise(bad, message):
    with pytest.raises(ValueError, match=message):
        decide(bad, ControlConfig())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(confidences=(0.05, 0.3)), "out of range"),
        (dict(confidences=(0.3, 1.0)), "out of range"),
        (dict(confidences=(0.3, 0.31)), "apart"),
        (dict(confidences=()), "empty"),
        (dict(epsilon=0.0), "epsilon"),
        (dict(epsilon=float("nan")), "epsilon"),
        (dict(policy="allow"), "policy"),
        (dict(num_classes=1), "num_classes"),
    ],
)
def test_invalid_configuration(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ControlConfig(**kwargs)


def test_policies():
    cfg = ControlConfig(policy="random")
    probs = torch.stack([probs_with(0.3, 4)] + [probs_with(0.99, 2)] * 2000)
    d = decide(probs, cfg)
    out = apply_policy(probs, d, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(out[0], probs[0])  # authorized row untouched
    top = out[1:].argmax(1)
    counts = torch.bincount(top, minlength=10).float() / len(top)
    assert (counts - 0.1).abs().max() < 0.03  # unauthorized top-1 is uniform, not the model's class 2
    assert torch.allclose(out.sum(1), torch.ones(len(out)))
    rejected = apply_policy(probs, d, ControlConfig(policy="reject"))
    assert torch.isfinite(rejected[0]).all() and torch.isnan(rejected[1:]).all()
