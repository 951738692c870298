"""The control layer (ActiveGuard §2.2, §2.4): admit an output only if it matches a fingerprinting
output, FO = (t, c) with |p_max - c| < ε in the paper (or the ranked FO of :mod:`activeguard.credentials.fo_space`).

Users are numbered from 0: class t's FO j belongs to user ``t * T + j`` with j counted from
0, which is the paper's user ``i·T + j`` (j counted from 1) minus one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from activeguard.credentials.fo_space import FO, ConfidenceGrid, FoSpace, RankedGrid, signed_default

PAPER_CONFIDENCES = (0.20, 0.30, 0.40)
PAPER_EPSILON = 0.01
POLICIES = ("random", "reject")

AUTHORIZED = "authorized"
CONFIDENCE_MISMATCH = "confidence_mismatch"
NOT_CLASS_PROBABILITIES = "not_class_probabilities"


@dataclass(frozen=True)
class ControlConfig:
    """K classes, the FO space's grids, tolerance ε and the policy for unauthorized outputs.

    ``runner_up_confidences`` empty: the paper's FO space (t, c) for c in ``confidences``;
    otherwise the ranked space (t, c, r, q) of :mod:`activeguard.credentials.fo_space` (signed mode only).
    """

    num_classes: int = 10
    confidences: tuple[float, ...] = PAPER_CONFIDENCES
    epsilon: float = PAPER_EPSILON
    policy: str = "random"
    runner_up_confidences: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "confidences", tuple(float(c) for c in self.confidences))
        object.__setattr__(self, "runner_up_confidences", tuple(float(c) for c in self.runner_up_confidences))
        k, eps = self.num_classes, self.epsilon
        if k < 2:
            raise ValueError(f"num_classes must be >= 2, got {k}")
        if not (0.0 < eps < 0.5) or not np.isfinite(eps):
            raise ValueError(f"epsilon must be in (0, 0.5), got {eps}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        object.__setattr__(self, "_space", self._build_space())

    def _build_space(self) -> FoSpace:
        if not self.confidences:
            raise ValueError("the confidence set C_fp is empty")
        if self.runner_up_confidences:
            return RankedGrid(self.num_classes, self.confidences, self.runner_up_confidences, self.epsilon)
        return ConfidenceGrid(self.num_classes, self.confidences, self.epsilon)

    @classmethod
    def signed_default(cls, num_classes: int = 10, epsilon: float = PAPER_EPSILON, policy: str = "random"):
        """The default for signed mode: the ranked FO space (thousands of users per model)."""
        confidences, runner_up = signed_default(num_classes, epsilon)
        return cls(num_classes, confidences, epsilon, policy, runner_up)

    @property
    def space(self) -> FoSpace:
        return self._space  # type: ignore[attr-defined]

    @property
    def num_users(self) -> int:
        return self.space.num_users

    @property
    def per_class(self) -> int:
        """T: FOs per class; user t·T + j holds class t's FO j."""
        return self.space.per_class

    def fo_of_user(self, user: int) -> FO:
        """FO allocation, §2.4: user t·T + j holds class t's FO j."""
        return self.space.fo(user)

    def user_of_fo(self, fo: FO) -> int:
        return self.space.user_of_fo(fo)


FO_SCHEMES = ("ranked", "paper")


def configured(
    num_classes: int,
    *,
    scheme: str = "",
    confidences: tuple[float, ...] = (),
    runner_up_confidences: tuple[float, ...] = (),
    epsilon: float = PAPER_EPSILON,
    policy: str = "random",
    paper_mode: bool = False,
) -> ControlConfig:
    """The control settings an owner asked for, with the defaults filled in one place.

    No scheme: the paper's grid in paper mode or when only C_fp is given, else the ranked space of
    signed mode with its default grids (any grid given replaces its default). Paper mode keeps the
    paper's sparse grid: there a bare output is the credential.
    """
    if scheme not in ("", *FO_SCHEMES):
        raise ValueError(f"FO scheme must be one of {FO_SCHEMES}, got {scheme!r}")
    scheme = scheme or ("paper" if paper_mode or (confidences and not runner_up_confidences) else "ranked")
    if scheme == "paper":
        if runner_up_confidences:
            raise ValueError("the paper's FO space has no runner-up confidences")
        return ControlConfig(num_classes, tuple(confidences) or PAPER_CONFIDENCES, epsilon, policy)
    if paper_mode:
        raise ValueError(
            "paper mode keeps the paper's FO space (a bare output is the credential, so the grid must stay "
            "sparse): use --fo-scheme paper"
        )
    default_c, default_q = signed_default(num_classes, epsilon)
    return ControlConfig(
        num_classes, tuple(confidences) or default_c, epsilon, policy, tuple(runner_up_confidences) or default_q
    )


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
    row_sums_ok = ((probs.sum(1) - 1).abs() < 1e-3) & (probs >= 0).all(1)
    decoded = config.space.decode(probs, config.epsilon)
    authorized = (decoded >= 0) & row_sums_ok
    user = torch.where(authorized, decoded, torch.full_like(decoded, -1))
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
