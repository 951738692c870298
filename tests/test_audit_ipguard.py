import pytest
import torch
from sklearn.ensemble import RandomForestClassifier

from activeguard.audit import ipguard
from activeguard.models.architectures import MLPClassifier


@pytest.fixture(scope="module")
def fingerprint(lenet, mnist):
    return ipguard.generate(lenet, 50, k=3.0, method="TL", x_train=mnist.x_train, seed=0)


def test_points_sit_at_margin_k(lenet, fingerprint):
    margin = ipguard.margins(lenet, fingerprint.points)
    assert (margin >= 3.0 - 1e-4).all()
    assert margin.mean() < 3.0 * 1.5  # near the boundary: stopped as soon as the margin reached k
    assert (fingerprint.iterations < 1000).all()


def test_owner_matches_itself(lenet, fingerprint):
    assert ipguard.verify(fingerprint, lenet) == 1.0


@pytest.mark.parametrize("method", ["TR", "RL", "RR"])
def test_other_variants(lenet, mnist, method):
    fp = ipguard.generate(lenet, 20, k=2.0, method=method, x_train=mnist.x_train, seed=1)
    assert ipguard.verify(fp, lenet) == 1.0
    assert (ipguard.margins(lenet, fp.points) >= 2.0 - 1e-4).all()


def test_independent_models_match_less(fingerprint, mnist):
    # TL points (the paper's default). Noise-initialized points (R*) are no test for an untrained net:
    # one that answers nearly one class everywhere matches whatever share of points carry that label.
    torch.manual_seed(3)
    other = MLPClassifier()  # untrained: an independent model
    rf = RandomForestClassifier(n_estimators=10, random_state=0).fit(
        torch.flatten(mnist.x_train[:500], 1).numpy(), mnist.y_train[:500].numpy()
    )
    assert ipguard.verify(fingerprint, other) < 0.5
    assert ipguard.verify(fingerprint, ipguard.sklearn_suspect(rf)) < 0.5


def test_batched_equals_its_eq5_objective(lenet):
    logits = torch.tensor([[5.0, 1.0, 0.0], [0.0, 2.0, 9.0]])
    loss = ipguard.eq5_loss(logits, torch.tensor([0, 1]), torch.tensor([1, 2]), k=1.0)
    # row 0: relu(5 - 1 + 1) + relu(0 - 5) = 5 ; row 1: relu(2 - 9 + 1) + relu(0 - 2) = 0
    assert loss.tolist() == [5.0, 0.0]


def test_bad_inputs(lenet, mnist, tmp_path, fingerprint):
    with pytest.raises(ValueError, match="empty"):
        ipguard.Fingerprint(torch.empty(0, 1, 28, 28), torch.empty(0, dtype=torch.long), 1.0, "TL")
    with pytest.raises(ValueError, match="input"):
        ipguard.verify(fingerprint, MLPClassifier(in_features=100))
    with pytest.raises(ValueError, match="outputs"):
        ipguard.verify(fingerprint, MLPClassifier(num_classes=7), num_classes=10)
    with pytest.raises(ValueError, match="method"):
        ipguard.generate(lenet, 2, method="XX", x_train=mnist.x_train)
    path = tmp_path / "fp.pt"
    fingerprint.save(path)
    loaded = ipguard.Fingerprint.load(path)
    assert torch.equal(loaded.labels, fingerprint.labels)
    torch.save({"x": 1}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not an IPGuard fingerprint"):
        ipguard.Fingerprint.load(tmp_path / "bad.pt")


def test_a_calibration_compares_margins_and_keeps_what_the_owner_chose():
    """--method auto and --k 0 leave the margin to the references (TL with data, RL without: noise-started
    points have a second null mode that a few references miss); explicit choices are kept as given."""
    method = ipguard.METHOD
    auto = ipguard.IPGuardParams()

    def tried(params, calibrating, has_data):
        return [(p.method, p.k) for p in method.candidates(params, calibrating, has_data)]

    assert tried(auto, True, True) == [("TL", 1.0), ("TL", 3.0), ("TL", 10.0)]
    assert tried(auto, True, False) == [("RL", 1.0), ("RL", 3.0), ("RL", 10.0)]
    assert tried(auto, False, True) == [("TL", ipguard.DEFAULT_K)] and tried(auto, False, False) == [("RL", 3.0)]
    fixed = ipguard.IPGuardParams(method="RR", k=5.0)
    assert tried(fixed, True, True) == [("RR", 5.0)]
    assert method.requires_data(ipguard.IPGuardParams(method="TL")) and not method.requires_data(auto)
    with pytest.raises(ValueError, match="--k"):
        ipguard.IPGuardParams(k=-1.0)
