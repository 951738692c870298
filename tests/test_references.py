"""References for a fingerprint's null: fresh copies of the owner's architecture in every model source,
trained until they match the owner (cached), and TAFA's premise check on smooth and piecewise-linear models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from activeguard.audit import tafa
from activeguard.audit.base import Owner
from activeguard.audit.references import ReferenceError, positive_copies, trained_references
from activeguard.experiments.families import NormMLP, SequenceConv, TanhCNN
from activeguard.models import attacks
from activeguard.models.architectures import LeNet5, MLPRegressor, ResNet
from activeguard.models.data import Split, load_digits8x8
from activeguard.models.fresh import fresh_copy
from activeguard.models.inputs import ClientView, InputSpec


class WithGroupNorm(nn.Module):
    """A custom layer with its own parameter (no reset_parameters) beside standard ones."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.norm = nn.GroupNorm(2, 4)
        self.bn = nn.BatchNorm2d(4)
        self.gain = nn.Parameter(torch.full((4,), 3.0))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.bn(self.norm(self.conv(x))) * self.gain.view(1, -1, 1, 1)
        return self.head(torch.relu(h).mean((2, 3)))


def _sources(model: nn.Module, shape: tuple[int, ...]) -> dict[str, nn.Module]:
    x = torch.rand(4, *shape)
    model.eval()
    exported = torch.export.export(model, (x,)).module()
    return {"eager": model, "torchscript": torch.jit.trace(model, x), "export": exported}


@pytest.mark.parametrize("source", ["eager", "torchscript", "export"])
def test_a_fresh_copy_has_the_owners_architecture_and_new_weights_in_every_source(source):
    torch.manual_seed(0)
    exported = source == "export"  # captured for batches of 4, in inference mode, as sources.load sees it
    network = _sources(WithGroupNorm(), (1, 8, 8))[source]
    owner = ClientView(network, InputSpec((1, 8, 8)), batch_limit=4 if exported else None, fixed_mode=exported)
    with torch.no_grad():
        for p in owner.parameters():  # a "trained" owner: far from any initialization
            p.add_(5.0)
    fresh = fresh_copy(owner, seed=1)
    assert isinstance(fresh, ClientView) and fresh.spec == owner.spec and fresh.batch_limit == owner.batch_limit
    mine, theirs = dict(fresh.network.named_parameters()), dict(owner.network.named_parameters())
    assert mine.keys() == theirs.keys()
    for name, p in mine.items():
        assert p.shape == theirs[name].shape and p.is_leaf, name
        assert not torch.allclose(p, theirs[name]), name  # every tensor drawn anew
    assert float(mine["conv.weight"].abs().max()) < 1.0  # Kaiming-uniform's scale, not the owner's
    again = fresh_copy(owner, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(fresh.parameters(), again.parameters()))  # seeded
    # it trains: one optimizer step moves its weights and leaves the owner's alone
    before = [p.detach().clone() for p in owner.parameters()]
    opt = torch.optim.SGD(fresh.parameters(), lr=0.1)
    fresh.train()
    fresh(torch.rand(8, 1, 8, 8)).sum().backward()
    opt.step()
    assert not torch.equal(
        mine["head.weight"], dict(fresh_copy(owner, seed=1).network.named_parameters())["head.weight"]
    )
    assert all(torch.equal(p, b) for p, b in zip(owner.parameters(), before))


@pytest.fixture(scope="module")
def digits() -> Split:
    return load_digits8x8(seed=0)


def test_references_reach_the_owners_accuracy_on_other_samples_and_are_cached(digits, tmp_path):
    torch.manual_seed(0)
    from activeguard.models.architectures import train

    network = train(NormMLP(), digits.x_train, digits.y_train, epochs=20, seed=0)
    owner = Owner(ClientView(network, InputSpec((1, 8, 8))), (1, 8, 8), 10, "classification")
    said = []
    refs = trained_references(owner, digits, 4, seed=0, cache_dir=tmp_path, progress=said.append)
    assert len(refs) == 4 and len(said) == 4 and all("reference" in m for m in said)
    recipes = {r.description.split(", ")[3] for r in refs}
    assert len(recipes) == 4  # Adam and SGD at several learning rates and batch sizes
    weights = [torch.cat([p.flatten() for p in r.model.parameters()]) for r in refs]
    assert all(not torch.allclose(weights[0], w) for w in weights[1:])
    from activeguard.models.architectures import accuracy

    owner_accuracy = accuracy(owner.model, digits.x_test, digits.y_test)
    assert all(accuracy(r.model, digits.x_test, digits.y_test) > owner_accuracy - 0.1 for r in refs)
    said.clear()
    again = trained_references(owner, digits, 4, seed=0, cache_dir=tmp_path, progress=said.append)
    assert said == []  # read from the cache: nothing trained
    assert all(
        torch.equal(p, q) for a, b in zip(refs, again) for p, q in zip(a.model.parameters(), b.model.parameters())
    )
    copies = {c.name: c for c in positive_copies(owner, digits)}
    assert set(copies) == {"pruned 50%", "int8 weights", "fine-tuned"}
    with pytest.raises(ReferenceError, match="--reference"):
        generator = Owner(ClientView(nn.Linear(4, 8), InputSpec((4,))), (4,), None, "generation")
        trained_references(generator, digits, 2, cache_dir=None)


@pytest.mark.parametrize(
    "network, shape, smooth",
    [
        (SequenceConv(), (1, 28, 28), True),  # GELU and GroupNorm
        (SequenceConv(act=nn.ReLU), (1, 28, 28), True),  # ReLU, but GroupNorm divides by a smooth function
        (NormMLP(), (1, 8, 8), True),  # LayerNorm and SiLU
        (TanhCNN(), (1, 28, 28), True),
        (LeNet5(), (1, 28, 28), False),
        (ResNet(), (1, 28, 28), False),  # BatchNorm at inference is affine: still piecewise linear
        (nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.LeakyReLU(), nn.Linear(32, 3)), (1, 8, 8), False),
    ],
    ids=["gelu-groupnorm", "relu-groupnorm", "layernorm-silu", "tanh", "lenet5", "resnet", "leaky-mlp"],
)
def test_tafa_says_when_its_piecewise_linear_premise_fails(network, shape, smooth):
    torch.manual_seed(0)
    reason = tafa.smoothness(ClientView(network.eval(), InputSpec(shape)), shape, (0.0, 1.0), "softmax")
    assert bool(reason) == smooth, reason
    if smooth:
        assert "not piecewise linear" in reason and "GELU" in reason
    regressor = MLPRegressor(in_features=9).eval()
    assert tafa.smoothness(regressor, (9,), (-2.0, 2.0), "raw") == ""
    assert tafa.smoothness(attacks.quantize_int8(regressor), (9,), (-2.0, 2.0), "raw") == ""
