"""What a refused request gets: the paper's dysfunctional model (``random``) or a refusal (``reject``)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

from activeguard.credentials.control import ControlConfig, random_outputs
from activeguard.credentials.sessions import SessionClaims
from activeguard.guard.outcomes import Verdict

if TYPE_CHECKING:
    from activeguard.guard.front import FrontEnd


class RefusalPolicy:
    """Under ``random`` the answer is silent: the same layout as an admitted one, random values.
    Only a gateway-attested request (which nobody else can sign) is told the reason."""

    def __init__(self, config: ControlConfig):
        self.config = config
        self._generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))

    def refuse(self, raw: Any, reason: str, explain: SessionClaims | None, front: FrontEnd) -> Verdict:
        """The verdict of a refused request whose model output was ``raw`` (None: no input to answer)."""
        if self.config.policy == "reject" or raw is None:
            return Verdict(403, reason, message=f"unauthorized: {reason.replace('_', ' ')}", explain=explain)
        fake = random_outputs(len(raw), self.config.num_classes, self._generator)
        return Verdict(200, reason, front.fake(fake, like=raw), explain=explain)
