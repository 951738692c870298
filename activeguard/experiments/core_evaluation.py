"""Paper-shaped measurements of the control layer and fingerprints (ActiveGuard §3.2–3.3).

These functions measure; they never assert. Tests, the demo and ``activeguard evaluate`` share
them so every figure in a report comes from the same code the tests check.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from activeguard.credentials.control import ControlConfig, apply_policy, decide
from activeguard.credentials.fingerprints import FingerprintSet, authenticate, generate_fingerprints, natural_users
from activeguard.models.architectures import predict


@dataclass
class AuthenticationTable:
    """Table 1 analog: per-user authentication success over many fingerprints each."""

    per_user: dict[int, float]
    wrong_identity: int  # fingerprints admitted as somebody else: must be 0
    fingerprints: int
    generation_seconds: float

    @property
    def minimum(self) -> float:
        return min(self.per_user.values())

    @property
    def median(self) -> float:
        return statistics.median(self.per_user.values())

    def to_dict(self) -> dict:
        out = asdict(self)
        out["per_user"] = {str(k): v for k, v in self.per_user.items()}
        out.update(minimum=self.minimum, median=self.median)
        return out


def seed_images(x: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """``count`` distinct images drawn by seed (with replacement only when x is too small)."""
    generator = torch.Generator().manual_seed(seed)
    if count <= len(x):
        return x[torch.randperm(len(x), generator=generator)[:count]]
    return x[torch.randint(len(x), (count,), generator=generator)]


def authentication_table(
    model: nn.Module,
    config: ControlConfig,
    x_seed: torch.Tensor,
    *,
    per_user: int = 20,
    seed: int = 0,
    encoding: str = "float32",
    progress: bool = False,
) -> tuple[AuthenticationTable, FingerprintSet]:
    """Generate ``per_user`` fingerprints for every user in one batch, then submit them all
    to the model in a fresh pass and count who gets in as whom."""
    users = list(range(config.num_users))
    seeds = seed_images(x_seed, len(users) * per_user, seed)
    start = time.perf_counter()
    fps = generate_fingerprints(
        model, config, users, seeds, per_user=per_user, encoding=encoding, seed=seed, progress=progress
    )
    elapsed = time.perf_counter() - start
    admitted, who = authenticate(model, fps.inputs, config)
    own = admitted & (who == fps.users)
    per_user_rate = {u: float(own[fps.users == u].float().mean()) for u in users}
    table = AuthenticationTable(
        per_user=per_user_rate,
        wrong_identity=int((admitted & (who != fps.users)).sum()),
        fingerprints=len(fps.users),
        generation_seconds=elapsed,
    )
    return table, fps


def control_accuracy(
    model: nn.Module, config: ControlConfig, x: torch.Tensor, y: torch.Tensor, *, seed: int = 0
) -> dict[str, float]:
    """Figure 2 analog: accuracy for an authorized user (the real model) and for unauthorized
    clients whose clean inputs go through the control layer under the ``random`` policy."""
    probs = torch.softmax(predict(model, x), dim=1)
    decision = decide(probs, ControlConfig(config.num_classes, config.confidences, config.epsilon, "random"))
    controlled = apply_policy(probs, decision, config, torch.Generator().manual_seed(seed))
    return {
        "authorized_accuracy": float((probs.argmax(1) == y).float().mean()),
        "unauthorized_accuracy": float((controlled.argmax(1) == y).float().mean()),
        "chance": 1.0 / config.num_classes,
    }


def false_acceptance(
    model: nn.Module, config: ControlConfig, x_clean: torch.Tensor, *, noise_count: int = 2000, seed: int = 0
) -> dict[str, float]:
    """Paper-mode false acceptance: how often inputs nobody licensed pass the confidence check."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(noise_count, *x_clean.shape[1:], generator=generator)
    rates = {}
    for name, inputs in (("clean", x_clean), ("uniform_noise", noise)):
        admitted, _ = authenticate(model, inputs, config)
        rates[name] = float(admitted.float().mean())
    return rates


@torch.no_grad()
def license_false_acceptance(
    model: nn.Module, config: ControlConfig, inputs: torch.Tensor, users: Sequence[int]
) -> dict[str, float]:
    """Per license of ``users``: the share of ``inputs`` (made for no license) that decodes to its FO;
    the largest and the mean over the licenses, and how many licenses any input reached."""
    _, who = authenticate(model, inputs, config)
    counts = torch.bincount(who[who >= 0], minlength=config.num_users)[torch.as_tensor(list(users))]
    rates = counts.double() / len(inputs)
    return {
        "inputs": len(inputs),
        "max_per_license": float(rates.max()),
        "mean_per_license": float(rates.mean()),
        "licenses_hit": int((counts > 0).sum()),
    }


@torch.no_grad()
def signed_capacity(
    model: nn.Module, num_classes: int, x_clean: torch.Tensor, *, noise_count: int = 20000, seed: int = 99
) -> dict:
    """Signed mode's default (ranked) FO space on this model: capacity, the FOs natural inputs reach
    (never issued), and per-license false acceptance on clean inputs and fresh uniform noise: the
    largest share of either set that decodes to one issuable FO."""
    config = ControlConfig.signed_default(num_classes)
    shape = tuple(x_clean.shape[1:])
    blocked = natural_users(model, config, shape)
    noise = torch.rand(noise_count, *shape, generator=torch.Generator().manual_seed(seed))
    issuable = [u for u in range(config.num_users) if u not in blocked]
    rates = {
        name: license_false_acceptance(model, config, inputs, issuable)["max_per_license"]
        for name, inputs in (("clean", x_clean), ("uniform_noise", noise))
    }
    return {
        "scheme": config.space.scheme,
        "capacity": config.num_users,
        "reached_by_noise_not_issued": len(blocked),
        "issuable": config.num_users - len(blocked),
        "max_false_acceptance_per_license": rates,
    }
