"""Model extraction as a licensed user would run it through the API: query, label, train a surrogate.

Two published shapes of attack, both label-only (the attacker keeps the API's top class):

* **Knockoff-style** (Orekondy et al. 2019): natural inputs from a related distribution. For MNIST,
  scikit-learn's 8×8 digits (none of the owner's data), upscaled to the owner's input size, with
  random rotations, scaling and shifts.
* **JBDA-style** (Papernot et al. 2017): a small seed set grown by Jacobian-based augmentation: each
  round queries ``x + λ·sign(∇ₓ surrogate[label(x)])`` for every known ``x``, retrains, and repeats;
  each new point is also randomly shifted (the augmentation the issue's attacker used).

The surrogate is the attacker's own architecture (:class:`AttackerCnn`), never the owner's. The
test suite also extracts through real TorchServe with the Adversarial Robustness Toolbox's
KnockoffNets (a peer implementation); these are the product's own, so ``activeguard evaluate
extraction`` needs no test tooling.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from activeguard.models.architectures import train
from activeguard.models.data import load_digits8x8

Api = Callable[[torch.Tensor], torch.Tensor]  # rows -> the labels the API answers


class AttackerCnn(nn.Module):
    """The attacker's surrogate: two 3×3 conv layers and two linear layers (not the owner's LeNet-5)."""

    def __init__(self, in_channels: int = 1, side: int = 28, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3)
        self.conv2 = nn.Conv2d(width, 2 * width, 3)
        flat = 2 * width * (((side - 2) // 2 - 2) // 2) ** 2
        self.fc = nn.Linear(flat, 128)
        self.out = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.out(F.relu(self.fc(x.flatten(1))))


def random_affine(x: torch.Tensor, generator: torch.Generator, degrees: float = 15, shift: float = 0.1) -> torch.Tensor:
    """Each image rotated, scaled (±10%) and shifted (± ``shift`` of its side) at random, then rescaled to [0, 1]."""
    n = len(x)
    angle = (torch.rand(n, generator=generator) - 0.5) * 2 * torch.deg2rad(torch.tensor(degrees))
    scale = 1 + (torch.rand(n, generator=generator) - 0.5) * 0.2
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(angle) * scale, -torch.sin(angle) * scale
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(angle) * scale, torch.cos(angle) * scale
    theta[:, :, 2] = (torch.rand(n, 2, generator=generator) - 0.5) * 2 * shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    moved = F.grid_sample(x, grid, align_corners=False)
    return (moved / moved.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)).clamp(0, 1)


def related_digits(n: int, side: int = 28, seed: int = 0) -> torch.Tensor:
    """``n`` Knockoff queries for an MNIST-sized model: scikit-learn's 8×8 digits, upscaled to a 20×20
    digit in a ``side``×``side`` frame (MNIST's layout), sharpened to MNIST's stroke contrast (measured: a
    surrogate gains 2.5 points of relative accuracy), randomly rotated, scaled and shifted."""
    digits = load_digits8x8(seed)
    pool = torch.cat([digits.x_train, digits.x_test])
    generator = torch.Generator().manual_seed(seed)
    picked = pool[torch.randint(len(pool), (n,), generator=generator)]
    inner = round(side * 20 / 28)
    pad = (side - inner) // 2
    framed = F.pad(F.interpolate(picked, size=(inner, inner), mode="bilinear", align_corners=False), (pad,) * 4)
    sharp = torch.sigmoid((framed - 0.35) * 12)
    sharp = sharp - sharp.amin(dim=(1, 2, 3), keepdim=True)
    return random_affine(sharp, generator)


def surrogate(x: torch.Tensor, labels: torch.Tensor, *, epochs: int, seed: int, num_classes: int = 10) -> nn.Module:
    """The attacker's model trained on the API's labels."""
    torch.manual_seed(seed)
    model = AttackerCnn(x.shape[1], x.shape[-1], num_classes)
    return train(model, x, labels, epochs=epochs, seed=seed).eval()


def knockoff(api: Api, queries: torch.Tensor, *, epochs: int = 10, seed: int = 0) -> tuple[nn.Module, int]:
    """(surrogate, queries spent): every query labelled by the API, one surrogate trained on them."""
    labels = api(queries)
    return surrogate(queries, labels, epochs=epochs, seed=seed), len(queries)


def jbda(
    api: Api,
    seeds: torch.Tensor,
    *,
    rounds: int = 4,
    step: float = 0.1,
    epochs: int = 10,
    seed: int = 0,
) -> tuple[nn.Module, int]:
    """(surrogate, queries spent): Jacobian-based dataset augmentation from ``seeds``, doubling the set per round."""
    generator = torch.Generator().manual_seed(seed)
    x = seeds.clone()
    y = api(x)
    model = surrogate(x, y, epochs=epochs, seed=seed)
    for r in range(rounds):
        grown = x.clone().requires_grad_(True)
        model.zero_grad()
        model(grown).gather(1, y[:, None]).sum().backward()
        sign = -1.0 if r % 2 else 1.0  # Papernot's periodic step size: out and back across the boundaries
        fresh = random_affine((x + sign * step * grown.grad.sign()).clamp(0, 1).detach(), generator, 5, 0.05)
        x, y = torch.cat([x, fresh]), torch.cat([y, api(fresh)])
        model = surrogate(x, y, epochs=epochs, seed=seed + r + 1)
    return model, len(x)


def recording(api: Api, queries: list[torch.Tensor]) -> Api:
    """``api``, keeping every batch of rows it is asked, in order (the stream a monitor sees)."""

    def ask(x: torch.Tensor) -> torch.Tensor:
        queries.append(x.detach().clone())
        return api(x)

    return ask


def jbda_stream(api: Api, seeds: torch.Tensor, **kwargs) -> torch.Tensor:
    """The queries a :func:`jbda` attack sends, in order."""
    queries: list[torch.Tensor] = []
    jbda(recording(api, queries), seeds, **kwargs)
    return torch.cat(queries)
