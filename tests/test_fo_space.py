"""The ranked FO space of signed mode: capacity, one user per output, and fingerprints that reach it."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from activeguard.credentials.control import ControlConfig, decide
from activeguard.credentials.fingerprints import authenticate, generate_fingerprints
from activeguard.credentials.fo_space import FO, RankedGrid

SIGNED = ControlConfig.signed_default(10)


def test_signed_default_holds_ten_thousand_users_and_matches_its_formula():
    space = SIGNED.space
    assert isinstance(space, RankedGrid)
    assert space.num_users >= 10_000
    eps, k = SIGNED.epsilon, 10
    pairs = sum(
        1
        for c in space.confidences
        for q in space.runner_up_confidences
        if q <= c - 2 * eps + 1e-12 and (k - 2) * eps <= 1 - c - q <= (k - 2) * (q - 2 * eps) + 1e-12
    )
    assert space.num_users == k * (k - 1) * pairs == space.describe()["capacity"]


def test_every_fo_decodes_to_its_own_user_and_nobody_else():
    users = list(range(SIGNED.num_users))
    rows = SIGNED.space.target_distribution(users)
    decoded = decide(rows, SIGNED).user
    assert torch.equal(decoded, torch.arange(len(users)))
    fos = {SIGNED.fo_of_user(u) for u in users}
    assert len(fos) == len(users)  # distinct
    for u in (0, 1, 4321, len(users) - 1):
        assert SIGNED.user_of_fo(SIGNED.fo_of_user(u)) == u
    fo = SIGNED.fo_of_user(4321)
    assert fo.target == 4321 // SIGNED.per_class and fo.runner_up not in (None, fo.target)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(min_value=-6, max_value=6), min_size=10, max_size=10))
def test_a_decoded_output_really_is_that_users_fo(logits):
    probs = torch.softmax(torch.tensor([logits], dtype=torch.float32), dim=1)
    decision = decide(probs, SIGNED)
    if not decision.authorized[0]:
        return
    fo = SIGNED.fo_of_user(int(decision.user[0]))
    top2, idx = probs[0].topk(2)
    assert idx.tolist() == [fo.target, fo.runner_up]
    assert abs(float(top2[0]) - fo.confidence) < SIGNED.epsilon
    assert abs(float(top2[1]) - fo.runner_up_confidence) < SIGNED.epsilon


def test_an_output_near_but_outside_an_fo_is_refused():
    fo = SIGNED.fo_of_user(77)
    row = SIGNED.space.target_distribution([77])
    shifted = row.clone()
    shifted[0, fo.runner_up] += 1.5 * SIGNED.epsilon  # runner-up off its grid point by more than ε
    shifted[0, (fo.runner_up + 1) % 10 if (fo.runner_up + 1) % 10 != fo.target else (fo.runner_up + 2) % 10] -= (
        1.5 * SIGNED.epsilon
    )
    assert int(decide(row, SIGNED).user[0]) == 77
    assert int(decide(shifted, SIGNED).user[0]) != 77


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_classes=2, confidences=(0.6,), runner_up_confidences=(0.3,)), "at least 3 classes"),
        (dict(confidences=(0.3, 0.31), runner_up_confidences=(0.1,)), "2\\*epsilon"),
        (dict(confidences=(0.3,), runner_up_confidences=(0.6,)), "out of range"),
        (dict(confidences=(0.15,), runner_up_confidences=(0.14,)), "reachable"),
    ],
)
def test_invalid_ranked_grids(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ControlConfig(**kwargs)


def test_fo_prints_its_whole_identity():
    assert str(FO(3, 0.4, 7, 0.2)) == "class 3 at 0.4, runner-up 7 at 0.2"


def test_ranked_fingerprints_authenticate_as_their_own_user_only(lenet):
    users = torch.randperm(SIGNED.num_users, generator=torch.Generator().manual_seed(5))[:60].tolist()
    fps = generate_fingerprints(lenet, SIGNED, users, input_shape=(1, 28, 28), seed=2, encoding="uint8")
    assert float(fps.success.float().mean()) >= 0.95
    admitted, who = authenticate(lenet, fps.inputs, SIGNED)
    assert torch.equal(admitted & (who == fps.users), fps.success)
    assert int((admitted & (who != fps.users)).sum()) == 0
