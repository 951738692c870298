"""The control layer (ActiveGuard §2.2, §2.4): admit an output only if its (class, confidence)
matches a fingerprinting output FO = (t, c) with |p_max - c| < ε.

Users are numbered from 0: the FO (t, C_fp[j]) belongs to user ``t * T + j`` with j counted from
0, which is the paper's user ``i·T + j`` (j counted from 1) minus one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

PAPER_CONFIDENCES = (0.20, 0.30, 0.40)
PAPER_EPSILON = 0.01
POLICIES = ("random", "reject")

AUTHORIZED = "authorized"
CONFIDENCE_MISMATCH = "confidence_mismatch"
NOT_CLASS_PROBABILITIES = "not_class_probabilities"


@dataclass(frozen=True)
class ControlConfig:
    """K classes, the confidence set C_fp, tolerance ε and the policy for unauthorized outputs."""

    num_classes: int = 10
    confidences: tuple[float, ...] = PAPER_CONFIDENCES
    epsilon: float = PAPER_EPSILON
    policy: str = "random"

    def __post_init__(self) -> None:
        object.__setattr__(self, "confidences", tuple(float(c) for c in self.confidences))
        k, eps, cs = self.num_classes, self.epsilon, self.confidences
        if k < 2:
            raise ValueError(f"num_classes must be >= 2, got {k}")
        if not cs:
            raise ValueError("the confidence set C_fp is empty")
        if not (0.0 < eps < 0.5) or not np.isfinite(eps):
            raise ValueError(f"epsilon must be in (0, 0.5), got {eps}")
        for c in cs:
            # A top-1 probability is always >= 1/K, so a c within ε of 1/K (or of 1) is not an identity.
            if not np.isfinite(c) or not (1.0 / k + eps <= c <= 1.0 - eps):
                raise ValueError(
                    f"confidence {c} is out of range: with K={k} and epsilon={eps} every c must lie in "
                    f"[{1.0 / k + eps:.4f}, {1.0 - eps:.4f}]"
                )
        ordered = sorted(cs)
        if ordered != list(cs) or any(b - a < 2 * eps for a, b in zip(ordered, ordered[1:])):
            raise ValueError(
                f"confidences {list(cs)} must be increasing and at least 2*epsilon={2 * eps} apart, "
                "otherwise two users' intervals overlap"
            )
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")

    @property
    def num_users(self) -> int:
        return self.num_classes * len(self.confidences)

    def fo_of_user(self, user: int) -> tuple[int, float]:
        """FO allocation, §2.4: user t·T + j holds (t, C_fp[j])."""
        if not 0 <= user < self.num_users:
            raise ValueError(f"user must be in [0, {self.num_users}), got {user}")
        t, j = divmod(user, len(self.confidences))
        return t, self.confidences[j]

    def user_of_fo(self, target_class: int, confidence: float) -> int:
        j = int(np.argmin([abs(confidence - c) for c in self.confidences]))
        if abs(self.confidences[j] - confidence) > 1e-9 or not 0 <= target_class < self.num_classes:
            raise ValueError(f"({target_class}, {confidence}) is not an FO of this configuration")
        return target_class * len(self.confidences) + j


@dataclass
class Decision:
    """Per-row outcome; ``user`` is -1 where not authorized."""

    authorized: torch.Tensor
    user: torch.Tensor
    reason: list[str] = field(default_factory=list)


def validate_probabilities(probs: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Refuse anything that is not a finite (B, K) batch of probability rows."""
    if not isinstance(probs, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor of probabilities, got {type(probs).__name__}")
    if probs.ndim != 2 or probs.shape[1] != num_classes:
        raise ValueError(f"expected probabilities of shape (batch, {num_classes}), got {tuple(probs.shape)}")
    if not torch.isfinite(probs).all():
        raise ValueError("probabilities contain NaN or inf")
    return probs


def decide(probs: torch.Tensor, config: ControlConfig) -> Decision:
    """Vectorized control decision for a batch of softmax outputs."""
    validate_probabilities(probs, config.num_classes)
    p_max, top = probs.max(dim=1)
    cs = torch.tensor(config.confidences, dtype=probs.dtype)
    distance = (p_max[:, None] - cs[None, :]).abs()
    nearest_err, j = distance.min(dim=1)
    row_sums_ok = ((probs.sum(1) - 1).abs() < 1e-3) & (probs >= 0).all(1)
    authorized = (nearest_err < config.epsilon) & row_sums_ok
    user = torch.where(authorized, top * len(config.confidences) + j, torch.full_like(top, -1))
    reasons = [
        AUTHORIZED if a else (CONFIDENCE_MISMATCH if ok else NOT_CLASS_PROBABILITIES)
        for a, ok in zip(authorized.tolist(), row_sums_ok.tolist())
    ]
    return Decision(authorized=authorized, user=user, reason=reasons)


def random_outputs(batch: int, num_classes: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """The paper's dysfunctional model: probability vectors whose top-1 class is uniformly random."""
    logits = torch.randn(batch, num_classes, generator=generator) * 2.0
    return torch.softmax(logits, dim=1)


def apply_policy(
    probs: torch.Tensor, decision: Decision, config: ControlConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Authorized rows keep the model's output; under ``random`` the others get random rows.

    Under ``reject`` unauthorized rows become NaN: the caller must turn them into refusals and
    never send them as predictions.
    """
    out = probs.clone()
    denied = ~decision.authorized
    if denied.any():
        if config.policy == "random":
            out[denied] = random_outputs(int(denied.sum()), config.num_classes, generator).to(out.dtype)
        else:
            out[denied] = float("nan")
    return out
