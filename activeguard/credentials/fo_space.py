"""Fingerprinting-output spaces: which softmax outputs identify which user (ActiveGuard §2.4, extended).

An FO space numbers users 0..K·T−1 (T FOs per class, user ``t·T + j`` as in the paper) and decodes a
probability row to the one user whose FO it matches, or to nobody. Two spaces, one interface:

- :class:`ConfidenceGrid`, the paper's: FO = (t, c) for c in C_fp; a row is user t·T + j when its
  top class is t and |p_t − c_j| < ε. Capacity K·|C_fp| (30 for MNIST). Paper mode must keep it:
  there a bare output is the credential, so the grid must stay sparse.
- :class:`RankedGrid` (ours, for signed mode): FO = (t, c, r, q), the top class and its confidence
  *and* the runner-up class r and its probability q. A row is that FO when t is its top class, r
  its second, |p_t − c| < ε and |p_r − q| < ε. Capacity

      N = K · (K − 1) · #{(c, q) ∈ C × Q : q ≤ c − 2ε  and  1 − c − q ≤ (K − 2)·(q − 2ε)}

  (the runner-up stays below the top class, and the remaining mass fits under q, both with a 2ε
  margin). The default grids (:func:`signed_default`) give 10 classes 19,260 FOs at ε = 0.01.
  Decoding is a function (argmax, second argmax, nearest grid points at most ε away with grid
  steps ≥ 2ε), so no output decodes to two users. In signed mode the license names the user and
  its fingerprint, so an FO only has to be decodable and distinct: the grid can be dense.

Both keep the top confidence well below what clean inputs produce (the paper's insight): a clean
MNIST digit's top-1 probability is above 0.9 for ~95% of the test set.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class FO:
    """One fingerprinting output; ``runner_up`` is None in the paper's space."""

    target: int
    confidence: float
    runner_up: int | None = None
    runner_up_confidence: float | None = None

    def __str__(self) -> str:
        head = f"class {self.target} at {self.confidence:g}"
        if self.runner_up is None:
            return head
        return f"{head}, runner-up {self.runner_up} at {self.runner_up_confidence:g}"


def check_grid(name: str, grid: Sequence[float], low: float, high: float, epsilon: float) -> tuple[float, ...]:
    """An increasing grid inside [low, high] whose ε-intervals do not overlap."""
    values = tuple(float(v) for v in grid)
    if not values:
        raise ValueError(f"the {name} grid is empty")
    for v in values:
        if not math.isfinite(v) or not (low - 1e-12 <= v <= high + 1e-12):
            raise ValueError(f"{name} {v} is out of range: every value must lie in [{low:.4f}, {high:.4f}]")
    if list(values) != sorted(values) or any(b - a < 2 * epsilon - 1e-12 for a, b in zip(values, values[1:])):
        raise ValueError(
            f"{name} {list(values)} must be increasing and at least 2*epsilon={2 * epsilon:g} apart, "
            "otherwise two users' intervals overlap"
        )
    return values


def _nearest(values: torch.Tensor, grid: tuple[float, ...], tolerance: float) -> torch.Tensor:
    """Index of the grid point within ``tolerance`` of each value, or −1."""
    g = torch.tensor(grid, dtype=values.dtype)
    err, idx = (values[:, None] - g[None, :]).abs().min(dim=1)
    return torch.where(err < tolerance, idx, torch.full_like(idx, -1))


class FoSpace(ABC):
    """Users ↔ FOs for one model; ``decode`` is the control layer's identity check."""

    scheme: str
    # α of Eq. 1 for this space: the ranked space's two targets need the task term to outweigh the
    # distance to the seed (at α = 20, 4% of 200 ranked fingerprints failed; at 100, none)
    task_weight: float
    # a dense space covers so much of the probability simplex that some FOs are reached by natural
    # inputs (uniform noise lands on a few hundred of the ranked space's cells): issuers skip those
    dense: bool

    def __init__(self, num_classes: int, epsilon: float):
        self.num_classes = num_classes
        self.epsilon = epsilon

    @property
    @abstractmethod
    def per_class(self) -> int:
        """T: FOs per target class (every class has the same number)."""

    @property
    def num_users(self) -> int:
        return self.num_classes * self.per_class

    def check_user(self, user: int) -> int:
        if not 0 <= user < self.num_users:
            raise ValueError(f"user must be in [0, {self.num_users}), got {user}")
        return user

    @abstractmethod
    def fo(self, user: int) -> FO:
        """The FO of ``user`` (t = user // T)."""

    @abstractmethod
    def decode(self, probs: torch.Tensor, tolerance: float) -> torch.Tensor:
        """(B,) user whose FO each probability row matches within ``tolerance``, or −1."""

    def user_of_fo(self, fo: FO) -> int:
        """The inverse of :meth:`fo` (for a row that is exactly the FO)."""
        row = self.target_distribution([0], [fo])
        user = int(self.decode(row, 1e-9)[0])
        if user < 0 or self.fo(user) != fo:
            raise ValueError(f"({fo}) is not an FO of this space")
        return user

    def target_distribution(self, users: Sequence[int], fos: Sequence[FO] | None = None) -> torch.Tensor:
        """(N, K): for each user the nearest distribution that is its FO (named probabilities exact,
        the remaining mass spread evenly over the other classes); what the generator aims at."""
        fos = list(fos) if fos is not None else [self.fo(u) for u in users]
        k = self.num_classes
        out = torch.empty(len(fos), k, dtype=torch.float64)
        for i, fo in enumerate(fos):
            named = {fo.target: fo.confidence}
            if fo.runner_up is not None:
                named[fo.runner_up] = float(fo.runner_up_confidence)
            rest = (1.0 - sum(named.values())) / (k - len(named))
            out[i] = rest
            for cls, p in named.items():
                out[i, cls] = p
        return out.float()

    @abstractmethod
    def describe(self) -> dict:
        """The scheme, its grids and capacity, as a profile or report records them."""


class ConfidenceGrid(FoSpace):
    """The paper's FO space: (t, c) for c in C_fp (user t·T + j)."""

    scheme = "paper"
    task_weight = 20.0
    dense = False

    def __init__(self, num_classes: int, confidences: Sequence[float], epsilon: float):
        super().__init__(num_classes, epsilon)
        # A top-1 probability is always >= 1/K, so a c within ε of 1/K (or of 1) is not an identity.
        self.confidences = check_grid("confidence", confidences, 1.0 / num_classes + epsilon, 1.0 - epsilon, epsilon)

    @property
    def per_class(self) -> int:
        return len(self.confidences)

    def fo(self, user: int) -> FO:
        t, j = divmod(self.check_user(user), self.per_class)
        return FO(t, self.confidences[j])

    def decode(self, probs: torch.Tensor, tolerance: float) -> torch.Tensor:
        p_max, top = probs.max(dim=1)
        j = _nearest(p_max, self.confidences, tolerance)
        return torch.where(j >= 0, top * self.per_class + j, torch.full_like(top, -1))

    def describe(self) -> dict:
        return {
            "scheme": self.scheme,
            "confidences": list(self.confidences),
            "epsilon": self.epsilon,
            "capacity": self.num_users,
            "formula": "K * |C|",
        }


class RankedGrid(FoSpace):
    """(t, c, r, q): top class and confidence, runner-up class and probability (module docstring)."""

    scheme = "ranked"
    task_weight = 100.0
    dense = True

    def __init__(
        self, num_classes: int, confidences: Sequence[float], runner_up_confidences: Sequence[float], epsilon: float
    ):
        if num_classes < 3:
            raise ValueError("the ranked FO space needs at least 3 classes (with 2 the runner-up says nothing new)")
        super().__init__(num_classes, epsilon)
        self.confidences = check_grid("confidence", confidences, 1.0 / num_classes + epsilon, 1.0 - epsilon, epsilon)
        self.runner_up_confidences = check_grid("runner-up confidence", runner_up_confidences, epsilon, 0.5, epsilon)
        k, eps = num_classes, epsilon
        pairs = [
            (ci, qi)
            for ci, c in enumerate(self.confidences)
            for qi, q in enumerate(self.runner_up_confidences)
            if q <= c - 2 * eps + 1e-12 and (k - 2) * eps <= 1 - c - q <= (k - 2) * (q - 2 * eps) + 1e-12
        ]
        if not pairs:
            raise ValueError("no (confidence, runner-up confidence) pair of these grids is reachable")
        # FO j of a class: (pair, runner-up offset); table[ci, offset, qi] = j, −1 where unreachable
        self._shapes = [(ci, off, qi) for ci, qi in pairs for off in range(1, k)]
        table = np.full((len(self.confidences), k, len(self.runner_up_confidences)), -1, dtype=np.int64)
        for j, (ci, off, qi) in enumerate(self._shapes):
            table[ci, off, qi] = j
        self._table = torch.from_numpy(table)
        self.pairs = len(pairs)

    @property
    def per_class(self) -> int:
        return len(self._shapes)

    def fo(self, user: int) -> FO:
        t, j = divmod(self.check_user(user), self.per_class)
        ci, off, qi = self._shapes[j]
        return FO(t, self.confidences[ci], (t + off) % self.num_classes, self.runner_up_confidences[qi])

    def decode(self, probs: torch.Tensor, tolerance: float) -> torch.Tensor:
        top2, idx = probs.topk(2, dim=1)
        t, r = idx[:, 0], idx[:, 1]
        ci = _nearest(top2[:, 0], self.confidences, tolerance)
        qi = _nearest(top2[:, 1], self.runner_up_confidences, tolerance)
        off = (r - t) % self.num_classes
        known = (ci >= 0) & (qi >= 0)
        j = self._table[ci.clamp(min=0), off, qi.clamp(min=0)]
        j = torch.where(known, j, torch.full_like(j, -1))
        return torch.where(j >= 0, t * self.per_class + j, torch.full_like(t, -1))

    def describe(self) -> dict:
        return {
            "scheme": self.scheme,
            "confidences": list(self.confidences),
            "runner_up_confidences": list(self.runner_up_confidences),
            "epsilon": self.epsilon,
            "reachable_pairs": self.pairs,
            "capacity": self.num_users,
            "formula": "K * (K-1) * #{(c, q): q <= c - 2eps, 1 - c - q <= (K-2)(q - 2eps)}",
        }


def grid(low: float, high: float, step: float) -> tuple[float, ...]:
    """low, low+step, … ≤ high, rounded to 6 digits (so profiles and licenses print clean numbers)."""
    count = int(math.floor((high - low) / step + 1e-9)) + 1
    return tuple(round(low + i * step, 6) for i in range(max(count, 0)))


def signed_default(num_classes: int, epsilon: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Default (C, Q) grids of the ranked space for signed mode: steps of 2.5ε, top confidences from
    just above the reachable minimum up to 0.75 (clean inputs sit above), runner-ups from 2.5ε."""
    step = 2.5 * epsilon
    low = math.ceil((1.0 / num_classes + 2 * epsilon) / step) * step
    return grid(low, 0.75, step), grid(step, 0.5, step)
