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

    def refuse(self, raw: Any, reason: str, explain: SessionClaims | None, front: FrontEnd) -> Verdict:
        """The verdict of a refused request whose model output was ``raw`` (None: no input to answer)."""
        if self.config.policy == "reject" or raw is None:
            return Verdict(403, reason, message=f"unauthorized: {reason.replace('_', ' ')}", explain=explain)
        top = front.logits(raw).float().argmax(1).cpu()
        index = torch.stack([self.permutation(int(c)) for c in top.tolist()])
        return Verdict(200, reason, front.permuted(raw, index), explain=explain)

    def permutation(self, top: int) -> torch.Tensor:
        """The keyed permutation of the classes for answers whose top class is ``top``."""
        found = self._permutations.get(top)
        if found is None:
            digest = hmac.new(self._secret, f"permutation/{top}".encode(), hashlib.sha256).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
            found = torch.randperm(self.config.num_classes, generator=generator)
            self._permutations.put(top, found)
        return found
