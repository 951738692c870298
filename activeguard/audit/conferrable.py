"""Conferrable adversarial examples (Lukas, Zhang, Kerschbaum, ICLR 2021): the CEM fingerprint.

The defender trains locally *surrogate* models (on the source model's labels, i.e. what a model
extraction produces) and *reference* models (on ground truth, i.e. independent models).  The
Conferrable Ensemble Method (CEM) perturbs benign inputs x0 within an L∞ ball so that the result x'
transfers to surrogates but not to references, measured per class by the conferrability score

    σ(x') = S̄(x') · (1 − R̄(x'))

where S̄ and R̄ are the mean softmax outputs of the surrogate and reference members, each member
kept with probability 1 − ``dropout`` at every step (dropout over ensemble members).  The loss has
the paper's three terms (weights α, β, γ):

    α · CE(σ(x'), t) − β · CE(M(x'), M(x0)) + γ · CE(M(x'), S̄(x'))

(maximize the ensemble's conferrability for a target class t ≠ the source's label of x0; move the
source model's prediction away from its initial label; keep the source in agreement with its
surrogates).  Adam, L∞ clipping around x0 and to the input range, as PGD.  Examples whose
conferrability on the training ensemble at the source's label is ≥ ``threshold`` are kept.
Verification: CAEAcc = fraction of fingerprints where the suspect predicts the source's label,
compared with a decision threshold.

The ensemble members have the owner's own architecture with fresh weights, as in the paper (every
CIFAR-10 surrogate and reference is a ResNet20 like the source), for every model source
(:mod:`activeguard.models.fresh`), so the same weights give the same fingerprint whatever file they
come in.  Measured on the MNIST LeNet-5 (4 + 4 members, ε = 0.25, 12 held-out judges): generic
small-CNN/MLP members gave a ROC AUC of 0.79 for distilled surrogates against independent models;
LeNet-5 members 1.0.  A model that cannot be copied at all falls back to generic members: a small
CNN (adaptive pooling, any height and width) for image-like rows (C, H, W), alternating with an
MLP, and MLPs for rows of any other shape; every generic member first maps the owner's input range
to [0, 1].
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from activeguard.audit import decisions
from activeguard.audit.base import (
    AuditMethod,
    LabelMatching,
    Owner,
    Params,
    Score,
    check_field_types,
    check_labelled_points,
    param,
)
from activeguard.models import fresh

DECISION_THRESHOLD = decisions.CEM_THRESHOLD  # CAEAcc; see decisions.py
CONFERRABILITY_THRESHOLD = 0.85


@dataclass
class CemFingerprint:
    points: torch.Tensor
    labels: torch.Tensor
    conferrability: torch.Tensor
    threshold: float
    passed: int  # how many reached the conferrability threshold (the rest, if any, are the best-scoring fill)
    seconds: float = 0.0

    def __post_init__(self) -> None:
        check_field_types(self)
        check_labelled_points(self.points, self.labels)
        if len(self.conferrability) != len(self.points):
            raise ValueError(
                f"the fingerprint's conferrability does not give one score for each of its {len(self.points)} points"
            )


class _Rescale(nn.Module):
    """Maps the owner's input range [low, high] to [0, 1], so members train alike on any encoding."""

    def __init__(self, bounds: tuple[float, float]):
        super().__init__()
        self.low, self.width = float(bounds[0]), float(bounds[1] - bounds[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.low) / self.width


def small_cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Two 3x3 conv layers and adaptive pooling: takes (C, H, W) rows of any height and width."""
    c, h, w = input_shape
    return nn.Sequential(
        nn.Conv2d(c, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveMaxPool2d((max(1, h // 2), max(1, w // 2))),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(32 * 16, 64),
        nn.ReLU(),
        nn.Linear(64, num_classes),
    )


def mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A two-hidden-layer ReLU MLP on flattened rows of any shape."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), 256),
        nn.ReLU(),
        nn.Linear(256, 128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )


def ensemble_member(
    index: int, input_shape: tuple[int, ...], num_classes: int, bounds: tuple[float, float] = (0.0, 1.0)
) -> nn.Module:
    """Member ``index`` of the local ensemble: CNN and MLP alternate for image-like rows, MLPs otherwise.

    Two architectures keep the ensemble's conferrability from being specific to one architecture,
    as the paper's ensemble of several architectures does.
    """
    image_like = len(input_shape) == 3
    body = small_cnn(input_shape, num_classes) if image_like and index % 2 == 0 else mlp(input_shape, num_classes)
    return nn.Sequential(_Rescale(bounds), body)


def fresh_copy(model: nn.Module, seed: int) -> nn.Module | None:
    """``model``'s architecture with new random weights (every model source, see
    :mod:`activeguard.models.fresh`), or None when it cannot be copied."""
    try:
        return fresh.fresh_copy(model, seed)
    except fresh.FreshCopyError:
        return None


def train_ensemble(
    owner: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    n_surrogates: int = 3,
    n_references: int = 3,
    epochs: int = 3,
    seed: int = 100,
    bounds: tuple[float, float] = (0.0, 1.0),
) -> tuple[list[nn.Module], list[nn.Module]]:
    """Surrogates on the owner's (soft) labels and references on the ground truth.

    ``x`` holds rows as the owner takes them (values in ``bounds``); members: fresh copies of the
    owner's architecture (:func:`fresh_copy`), or :func:`ensemble_member` when there are none.
    """
    from activeguard.models.architectures import predict, train

    owner_probs = F.softmax(predict(owner, x), 1)  # the source's labels, as soft labels (distillation)
    c = owner_probs.shape[1]
    shape = tuple(x.shape[1:])

    def make(a: int) -> nn.Module:
        fresh = fresh_copy(owner, seed + a)
        if fresh is not None:
            return fresh
        torch.manual_seed(seed + a)
        return ensemble_member(a, shape, c, bounds)

    surrogates = [train(make(a), x, owner_probs, epochs=epochs, seed=seed + a) for a in range(n_surrogates)]
    references = [train(make(50 + a), x, y, epochs=epochs, seed=seed + 50 + a) for a in range(n_references)]
    return surrogates, references


def _mean_softmax(models: list[nn.Module], x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    outs = [F.softmax(m(x), 1) for m, k in zip(models, keep) if k]
    return torch.stack(outs).mean(0)


def _keep_mask(n: int, dropout: float, gen: torch.Generator) -> torch.Tensor:
    keep = torch.rand(n, generator=gen) >= dropout
    if not keep.any():
        keep[torch.randint(n, (1,), generator=gen)] = True
    return keep


@torch.no_grad()
def conferrability(surrogates, references, x: torch.Tensor) -> torch.Tensor:
    """σ(x) per class on the full ensemble (no dropout), shape (n, C)."""
    s = _mean_softmax(surrogates, x, torch.ones(len(surrogates), dtype=torch.bool))
    r = _mean_softmax(references, x, torch.ones(len(references), dtype=torch.bool))
    return s * (1 - r)


def generate(
    owner: nn.Module,
    surrogates: list[nn.Module],
    references: list[nn.Module],
    x0: torch.Tensor,
    *,
    n: int = 100,
    eps: float = 0.25,
    steps: int = 200,
    lr: float = 0.01,
    alpha: float = 1.0,
    beta: float = 1.0,
    gamma: float = 1.0,
    dropout: float = 0.3,
    threshold: float = CONFERRABILITY_THRESHOLD,
    seed: int = 0,
    bounds: tuple[float, float] = (0.0, 1.0),
) -> CemFingerprint:
    """Run CEM from the benign inputs x0 (one batch) and keep up to n examples with σ ≥ threshold.

    ``bounds`` is the input range (the box every example is clipped to); ``eps`` (the L∞ radius)
    and ``lr`` are fractions of its width. If fewer than n pass the threshold the best-scoring
    remaining ones fill the fingerprint and ``passed`` records how many truly passed.
    """
    if not surrogates or not references:
        raise ValueError("CEM needs at least one surrogate and one reference model")
    gen = torch.Generator().manual_seed(seed)
    low, high = bounds
    eps, lr = eps * (high - low), lr * (high - low)
    models = [owner, *surrogates, *references]
    flags = [(p, p.requires_grad) for m in models for p in m.parameters()]
    for m in models:
        m.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    start = time.perf_counter()
    try:
        with torch.no_grad():
            y0 = owner(x0).argmax(1)
        delta = torch.zeros_like(x0, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=lr)
        for _ in range(steps):
            x = (x0 + delta).clamp(low, high)
            s = _mean_softmax(surrogates, x, _keep_mask(len(surrogates), dropout, gen))
            r = _mean_softmax(references, x, _keep_mask(len(references), dropout, gen))
            sigma = s * (1 - r)
            masked = sigma.detach().clone()
            masked[torch.arange(len(x)), y0] = -1
            target = masked.argmax(1)
            logits = owner(x)
            loss = (
                alpha * -torch.log(sigma[torch.arange(len(x)), target] + 1e-12)
                - beta * F.cross_entropy(logits, y0, reduction="none")
                + gamma * torch.sum(-s.detach() * F.log_softmax(logits, 1), 1)
            )
            opt.zero_grad()
            loss.sum().backward()
            opt.step()
            with torch.no_grad():
                delta.clamp_(-eps, eps)
        x = (x0 + delta.detach()).clamp(low, high)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    with torch.no_grad():
        labels = owner(x).argmax(1)
    conf = conferrability(surrogates, references, x)[torch.arange(len(x)), labels]
    changed = labels != y0
    score = torch.where(changed, conf, torch.full_like(conf, -1.0))  # only successful adversarial examples
    order = score.argsort(descending=True)[:n]
    order = order[score[order] >= 0] if (score >= 0).any() else order
    passed = int((score[order] >= threshold).sum())
    return CemFingerprint(x[order], labels[order], conf[order], threshold, passed, time.perf_counter() - start)


def caeacc(fp: CemFingerprint, suspect, num_classes: int | None = None) -> float:
    """CAEAcc: fraction of the fingerprints where the suspect predicts the source model's label."""
    return METHOD.score(fp, suspect, num_classes=num_classes).value


def verify(fp: CemFingerprint, suspect, decision_threshold: float = DECISION_THRESHOLD) -> tuple[bool, float]:
    """(is a surrogate/copy, CAEAcc)."""
    score = caeacc(fp, suspect)
    return score >= decision_threshold, score


@dataclass(frozen=True)
class CemParams(Params):
    # the defaults are the configuration the decision threshold was measured with (decisions.py)
    surrogates: int = param(4, "surrogate models to train (default {default})")
    references: int = param(4, "reference models to train (default {default})")
    epochs: int = param(6, "training epochs per ensemble model (default {default})")
    steps: int = param(300, "optimization steps (default {default})")
    start: str = param(
        "test",
        "images the examples start from: the owner's 'train' or held-out 'test' images (default {default})",
        choices=("train", "test"),
    )
    eps: float = param(
        0.25,
        "L-infinity radius of the perturbation, as a fraction of the input range (default {default:g}, "
        "measured on 28x28 MNIST; low-resolution inputs need less, e.g. 0.1 for 8x8 digits, or the "
        "examples become other digits that every model reads alike)",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.surrogates < 1 or self.references < 1:
            raise ValueError("CEM needs at least one surrogate and one reference model")
        if not 0.0 < self.eps <= 1.0:
            raise ValueError(f"--eps must be in (0, 1], a fraction of the input range, got {self.eps}")


class Cem(LabelMatching, AuditMethod[CemParams, CemFingerprint]):
    """Query sampler: conferrable examples of a local ensemble; representation and distance: :class:`LabelMatching`."""

    scales = {"caeacc": "rate", "owner_probability": "rate"}

    name = "cem"
    title = "CEM (conferrable adversarial examples)"
    label = "CEM"
    score_name = "CAEAcc"
    help = "conferrable adversarial examples: trains a local surrogate/reference ensemble first"
    needs_data = True
    data_note = "the ensemble trains on it and the examples start from it"
    params_type = CemParams
    fingerprint_type = CemFingerprint

    def generate(
        self,
        owner: Owner,
        params: CemParams,
        data: Any = None,
        *,
        seed: int = 0,
        stage: Callable[[str], None] = lambda _msg: None,
    ) -> CemFingerprint:
        if data is None:
            raise ValueError("CEM needs the owner's training data")
        stage(
            f"training {params.surrogates} surrogate and {params.references} reference models "
            f"({params.epochs} epochs each) on {data.name}…"
        )
        surrogates, references = train_ensemble(
            owner.model,
            data.x_train,
            data.y_train,
            n_surrogates=params.surrogates,
            n_references=params.references,
            epochs=params.epochs,
            seed=seed + 100,
            bounds=owner.bounds,
        )
        stage(f"searching conferrable examples ({params.steps} steps)…")
        images = data.x_train if params.start == "train" else data.x_test
        x0 = images[: min(len(images), 4 * params.points)]
        return generate(
            owner.model,
            surrogates,
            references,
            x0,
            n=params.points,
            eps=params.eps,
            steps=params.steps,
            seed=seed,
            bounds=owner.bounds,
        )

    def score(
        self, fingerprint: CemFingerprint, suspect: Any, *, num_classes: int | None = None, **options: Any
    ) -> Score:
        result = super().score(fingerprint, suspect, num_classes=num_classes)
        result.evidence["conferrable"] = fingerprint.passed
        result.statistics = {"caeacc": result.statistics.pop("matching"), **result.statistics}
        return result

    def explain(self, score: Score) -> str:
        text = super().explain(score)
        strong, total = score.evidence.get("conferrable"), score.evidence["total"]
        if strong is not None and strong < total:
            text += (
                f"; warning: only {strong} of {total} examples reached conferrability {CONFERRABILITY_THRESHOLD} "
                "when the fingerprint was made, so independent models agree with the owner more often "
                "(the decision threshold was measured with such a fingerprint)"
            )
        return text

    def describe(self, fingerprint: CemFingerprint, params: CemParams) -> dict[str, Any]:
        return {
            "surrogates": params.surrogates,
            "references": params.references,
            "eps": params.eps,
            "passed_threshold": fingerprint.passed,
        }

    def note(self, fingerprint: CemFingerprint) -> str:
        if fingerprint.passed >= len(fingerprint.points):
            return ""
        return (
            f"only {fingerprint.passed} reached conferrability {fingerprint.threshold}; "
            "the rest are the best-scoring others"
        )


METHOD = Cem()
