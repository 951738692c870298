"""What a refused request gets: a dysfunctional model that cannot be told from the real one (``random``),
or a refusal (``reject``).

The paper answers an unauthorized request with a uniformly random class. That is easy to detect: the
answers are less confident than the model's (0.60–0.64 top probability against 0.86 licensed,
measured) and two identical requests get two different answers. Here an unlicensed answer is the
model's own output with its classes **permuted**: the permutation is drawn, for each top class of the
model's answer, from a keyed pseudo-random function of the archive's secret. So every client-visible
statistic of one answer is the model's own (its top probability, its entropy, its whole sorted
vector), the same input always gets the same answer, and a slightly perturbed input gets another
answer only where the model's own top class changes. Keyed on the top two classes instead, the
answer jumped whenever noise swapped two near-zero runner-ups (1.5% of perturbed MNIST queries; a
classifier then told the policies apart by how far an answer moves). What it is not: the class the
model means, nor proof against a prober with labelled data, who can learn which shown class stands
for which top class (a keyed map that merges about a third of the classes, so never all of them);
the paper's uniformly random answer cannot be learnt, but one query twice tells it apart.
``activeguard evaluate control-layer`` measures how well a classifier on what a client sees tells
licensed from unlicensed answers (its ROC AUC).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import TYPE_CHECKING, Any

import torch

from activeguard.credentials.control import ControlConfig
from activeguard.credentials.sessions import SessionClaims
from activeguard.guard.outcomes import Verdict
from activeguard.guard.recent import Recent

if TYPE_CHECKING:
    from activeguard.guard.front import FrontEnd

PERMUTATIONS_KEPT = 4096  # top classes whose permutation a worker remembers


class RefusalPolicy:
    """Under ``random`` the answer is silent: the layout and the statistics of an admitted one, the classes
    permuted. Only a gateway-attested request (which nobody else can sign) is told the reason."""

    def __init__(self, config: ControlConfig, secret: bytes | None = None):
        """``secret`` keys the permutations (the profile's, so every worker and replica answers alike);
        without one a worker draws its own, and answers alike only until it restarts."""
        self.config = config
        self._secret = secret or os.urandom(32)
        self._permutations: Recent[int, torch.Tensor] = Recent(PERMUTATIONS_KEPT)
        self._top_map: list[int] | None = None

    def refuse(self, raw: Any, reason: str, explain: SessionClaims | None, front: FrontEnd) -> Verdict:
        """The verdict of a refused request whose model output was ``raw`` (None: no input to answer)."""
        if self.config.policy == "reject" or raw is None:
            return Verdict(403, reason, message=f"unauthorized: {reason.replace('_', ' ')}", explain=explain)
        top = front.logits(raw).float().argmax(1).cpu()
        index = torch.stack([self.permutation(int(c)) for c in top.tolist()])
        return Verdict(200, reason, front.permuted(raw, index), explain=explain)

    def permutation(self, top: int) -> torch.Tensor:
        """The keyed permutation of the classes for answers whose top class is ``top``: the top class is
        shown as ``shown_top(top)``, the other classes keyed at random."""
        found = self._permutations.get(top)
        if found is None:
            found = torch.randperm(self.config.num_classes, generator=self._generator(f"permutation/{top}"))
            shown, at = self.shown_top(top), int((found == top).nonzero()[0, 0])
            found[at], found[shown] = found[shown].clone(), found[at].clone()  # column `shown` shows class `top`
            self._permutations.put(top, found)
        return found

    def shown_top(self, top: int) -> int:
        """Where an unlicensed answer puts the model's top class: a keyed permutation of the classes with
        exactly one fixed point (three classes or more), so the dysfunctional model is right about as often
        as chance (one class in K), whatever the secret. Independent permutations per top class left
        0, 1, 2 or 3 of 10 classes right depending on the draw: accuracy 0% to 30%."""
        if self._top_map is None:
            k = self.config.num_classes
            generator = self._generator("top-classes")
            if k < 3:
                self._top_map = torch.randperm(k, generator=generator).tolist()
            else:
                fixed = int(torch.randint(k, (1,), generator=generator))
                others = [c for c in range(k) if c != fixed]
                while True:  # a keyed derangement of the other classes (about e draws)
                    order = torch.randperm(k - 1, generator=generator).tolist()
                    if all(order[i] != i for i in range(k - 1)):
                        break
                self._top_map = list(range(k))
                for i, c in enumerate(others):
                    self._top_map[c] = others[order[i]]
        return self._top_map[top]

    def _generator(self, purpose: str) -> torch.Generator:
        digest = hmac.new(self._secret, purpose.encode(), hashlib.sha256).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
