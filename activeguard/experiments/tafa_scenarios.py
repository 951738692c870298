"""TAFA's three scenarios (paper appendix B.1) as workloads built from offline data.

The paper fingerprints a ResNet-18 skin-lesion classifier (7 classes), a three-layer FCN with 100
hidden units for warfarin dose regression on 31 features, and a five-layer FCN generator
(64-128-256-512-768) of a WGAN on Fashion-MNIST.  Ours, on what this machine carries:

* **classification**: the evaluated workload's classifier and its suspect zoo (the MNIST LeNet-5
  by default; ``--workload fashion-resnet``: the BatchNorm ResNet on full Fashion-MNIST);
* **regression**: the paper's FCN shape (inputs → 100 → 1) on statsmodels' RAND health insurance
  experiment (20,190 people × 9 features, the largest real regression table an installed package
  carries; the IWPC warfarin set is not available offline);
* **generation**: the paper's generator (latent 64 → 128 → 256 → 512 → image) trained as a WGAN
  (with gradient penalty) on the full 60,000 Fashion-MNIST images; we read the paper's last width,
  768, as the 28 × 28 = 784 image.  Its output layer is linear, so it stays piecewise linear.

Each scenario has its own zoo: copies (fine-tune and retrain the last or all layers on the
attacker's data, weight pruning until quality drops by 3 points, int8 weights) and negatives
(other seeds, other widths, other architectures).  Quality: accuracy (classification), R² on the
evaluation half of the test set (regression), 1 − relative output error against the owner on
N(0, I) latents (generation: a pirate has only the generator, so its data is the owner's samples).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from activeguard.audit.cache import _hash, _tensor_digest, cached
from activeguard.experiments.suspects import PRUNING_RATES, ZooMember
from activeguard.models.architectures import FCGenerator, MLPRegressor, model_id, predict, train, train_wgan_generator
from activeguard.models.attacks import (
    fine_tune,
    fine_tune_last_layer,
    global_prune,
    prune_sweep,
    quantize_int8,
    retrain_last_layer,
)


@dataclass
class ScenarioRun:
    """An owner, its zoo, and how TAFA fingerprints it (keyword arguments of :func:`tafa.generate`)."""

    title: str
    owner: nn.Module
    zoo: list[ZooMember]
    fingerprint: dict[str, Any]
    output: str = "raw"  # "softmax": clients see probabilities
    notes: dict[str, Any] = field(default_factory=dict)


def fc_copies(
    owner: nn.Module,
    x_attack: torch.Tensor,
    y_attack: torch.Tensor,
    quality: Callable[[nn.Module], float],
    *,
    seed: int,
    epochs: int,
    lr: float,
) -> list[ZooMember]:
    """The removal attacks of an MSE-trained network: FTLL, FTAL, RTLL, RTAL on the attacker's rows,
    weight pruning while quality stays within 3 points, and int8 weights."""
    kw = {"loss": "mse", "seed": seed, "lr": lr}
    members = [
        ZooMember("FTLL", "FTLL", True, fine_tune_last_layer(owner, x_attack, y_attack, epochs=epochs, **kw), 0.0),
        ZooMember("FTAL", "FTAL", True, fine_tune(owner, x_attack, y_attack, epochs=epochs, **kw), 0.0),
        ZooMember(
            "RTLL",
            "RTLL",
            True,
            retrain_last_layer(owner, x_attack, y_attack, all_layers=False, epochs=2 * epochs, **kw),
            0.0,
        ),
        ZooMember(
            "RTAL",
            "RTAL",
            True,
            retrain_last_layer(owner, x_attack, y_attack, all_layers=True, epochs=2 * epochs, **kw),
            0.0,
        ),
    ]
    for rate, model, _ in prune_sweep(owner, quality, global_prune, PRUNING_RATES):
        members.append(ZooMember(f"WP p={rate}", "WP", True, model, 0.0))
    members.append(ZooMember("int8 weights", "int8", True, quantize_int8(owner), 0.0))
    return members


def fc_negatives(
    fit: Callable[[int, tuple[int, ...]], nn.Module],
    label: str,
    hidden: tuple[int, ...],
    seeds: range,
    others: tuple[tuple[int, ...], ...],
) -> list[ZooMember]:
    """Independent networks: the owner's shape trained with other ``seeds``, then other widths and depths."""
    members = [ZooMember(f"{label} {hidden} seed {s}", "same-arch", False, fit(s, hidden), 0.0) for s in seeds]
    for a, shape in enumerate(others):
        members.append(ZooMember(f"{label} {shape}", "other-arch", False, fit(seeds.start + 10 + a, shape), 0.0))
    return members


class _Scenario:
    """What every scenario shares: a title, and a zoo cached under the owner's weights and its version."""

    name: str
    title: str
    zoo_version: int

    def _run(self, owner: nn.Module, zoo: Callable[[], list[ZooMember]], quick: bool, seed: int, cache_dir, **run):
        key = {"scenario": self.name, "quick": quick, "seed": seed, "v": self.zoo_version}
        return ScenarioRun(self.title, owner, cached("tafa-zoo-" + _hash(key, model_id(owner)), zoo, cache_dir), **run)


def _with_quality(members: list[ZooMember], quality: Callable[[nn.Module], float]) -> list[ZooMember]:
    for member in members:
        member.quality = float(quality(member.model))
    return members


class RegressionScenario(_Scenario):
    """The paper's warfarin FCN shape on the RAND health insurance experiment."""

    name = "regression"
    title = "regression (RAND HIE FCN 9-100-1)"
    zoo_version = 1
    hidden = (100,)
    other_widths = ((50,), (200,))
    other_archs = ((64, 64), (100, 100))

    def build(self, quick: bool, seed: int, cache_dir: str | Path | None) -> ScenarioRun:
        from activeguard.models.data import load_randhie

        split = load_randhie(seed=seed)
        rows = 4000 if quick else len(split.x_train)
        x, y = split.x_train[:rows], split.y_train[:rows]
        epochs = 10 if quick else 20
        half = len(split.x_test) // 2
        xa, ya, xe, ye = split.x_test[:half], split.y_test[:half], split.x_test[half:], split.y_test[half:]
        var = float(ye.var(unbiased=False))

        def r2(model: nn.Module) -> float:
            return 1.0 - float(torch.nn.functional.mse_loss(predict(model, xe).reshape(ye.shape), ye)) / var

        def fit(s: int, hidden: tuple[int, ...]) -> nn.Module:
            torch.manual_seed(s)
            return train(MLPRegressor(split.input_shape[0], hidden), x, y, loss="mse", epochs=epochs, seed=s)

        owner = cached(f"tafa-randhie-owner-{seed}-{quick}", lambda: fit(seed, self.hidden), cache_dir)

        def zoo() -> list[ZooMember]:
            members = fc_copies(owner, xa, ya, r2, seed=seed, epochs=epochs // 2, lr=1e-3)
            seeds = range(seed + 1, seed + (4 if quick else 6))
            members += fc_negatives(fit, "FCN", self.hidden, seeds, (*self.other_widths, *self.other_archs))
            return _with_quality(members, r2)

        notes = {"owner_quality": r2(owner), "quality": "R² on the evaluation half of the test set", "rows": rows}
        fingerprint = {"input_shape": tuple(split.input_shape), "solver": "lp", "delta": 0.05}
        return self._run(owner, zoo, quick, seed, cache_dir, fingerprint=fingerprint, notes=notes)


class GenerationScenario(_Scenario):
    """The paper's WGAN generator on Fashion-MNIST."""

    name = "generation"
    title = "generation (Fashion-MNIST WGAN generator 64-128-256-512-784)"
    zoo_version = 2
    latent_dim = 64
    hidden = (128, 256, 512)
    other_widths = ((96, 192, 384), (160, 320, 640))
    other_archs = ((256, 512),)

    def build(self, quick: bool, seed: int, cache_dir: str | Path | None) -> ScenarioRun:
        from activeguard.models.data import load_fashion_mnist

        images = load_fashion_mnist(seed=seed, limit=2000 if quick else None).x_train
        iterations = 200 if quick else 1000

        def fit(s: int, hidden: tuple[int, ...]) -> FCGenerator:
            return train_wgan_generator(
                images, latent_dim=self.latent_dim, hidden=hidden, iterations=iterations, seed=s
            )

        owner = cached(
            "tafa-wgan-owner-" + _hash({"quick": quick, "seed": seed}, _tensor_digest(images)),
            lambda: fit(seed, self.hidden),
            cache_dir,
        )
        rng = torch.Generator().manual_seed(seed)
        z_eval = torch.randn(512, self.latent_dim, generator=rng)
        reference = predict(owner, z_eval)
        scale = float(reference.pow(2).mean())

        def fidelity(model: nn.Module) -> float:
            return 1.0 - float((predict(model, z_eval) - reference).pow(2).mean()) / scale

        z_attack = torch.randn(8192, self.latent_dim, generator=rng)

        def zoo() -> list[ZooMember]:
            members = fc_copies(owner, z_attack, predict(owner, z_attack), fidelity, seed=seed, epochs=10, lr=1e-3)
            seeds = range(seed + 1, seed + (2 if quick else 3))
            others = (*self.other_widths[:1], *self.other_archs) if quick else (*self.other_widths, *self.other_archs)
            members += fc_negatives(fit, "WGAN", self.hidden, seeds, others)
            return _with_quality(members, fidelity)

        notes = {
            "owner_quality": 1.0,
            "quality": "1 - relative output error against the owner on 512 N(0, I) latents",
            "images": len(images),
            "iterations": iterations,
        }
        fingerprint = {"input_shape": (self.latent_dim,), "bounds": (-3.0, 3.0), "init": "normal", "solver": "lp"}
        return self._run(owner, zoo, quick, seed, cache_dir, fingerprint={**fingerprint, "delta": 0.05}, notes=notes)


SCENARIOS = (RegressionScenario(), GenerationScenario())
