"""One batch on its way through the guard: what each request turned out to be, and the one
forward pass that answers every input and every fingerprint together."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from activeguard.credentials import sessions
from activeguard.guard.outcomes import Verdict, internal_error

if TYPE_CHECKING:
    from activeguard.guard.front import FrontEnd

logger = logging.getLogger(__name__)

Outputs = dict[tuple[str, int], tuple[Any, torch.Tensor]]  # (kind, request) -> (raw rows, probabilities)


@dataclass
class Batch:
    """What the guard learns about each request of one batch, keyed by position."""

    revoked: frozenset[str]
    stale: bool = False  # no fresh revocation list under the refuse policy: every credential is refused
    verdicts: dict[int, Verdict] = field(default_factory=dict)  # decided before the forward pass
    inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    auth_only: set[int] = field(default_factory=set)  # a credential check without input (the gateway's)
    checks: dict[int, tuple[torch.Tensor, int | None, str | None]] = field(default_factory=dict)  # fingerprints
    sessions: dict[int, sessions.SessionClaims] = field(default_factory=dict)
    passed: dict[int, tuple[str, int]] = field(default_factory=dict)  # licenses whose fingerprint passed before
    fingerprint_keys: dict[int, tuple[str, str]] = field(default_factory=dict)
    denied: dict[int, str] = field(default_factory=dict)
    explain: dict[int, sessions.SessionClaims] = field(default_factory=dict)
    license_ids: dict[int, str] = field(default_factory=dict)  # the license behind a session or license request

    def fail(self, i: int) -> None:
        """Request ``i`` hit a bug: it leaves the forward pass and gets its own internal error."""
        self.inputs.pop(i, None)
        self.checks.pop(i, None)
        self.auth_only.discard(i)
        self.verdicts[i] = internal_error(self.explain.get(i))

    def undecided(self) -> list[int]:
        """Requests whose verdict waits for the forward pass."""
        return [i for i in [*self.inputs, *sorted(self.auth_only)] if i not in self.verdicts]


class ModelPass:
    """Every input and every fingerprint of a batch through the model in one pass.

    If the batched pass fails, each request runs alone, so one request that breaks the model fails
    only itself (its outputs are then missing, and its decision becomes an internal error).
    """

    def forward(self, batch: Batch, front: FrontEnd) -> Outputs:
        parts = [("in", i, x) for i, x in batch.inputs.items()] + [("fp", i, c[0]) for i, c in batch.checks.items()]
        if not parts:
            return {}
        try:
            return self._run(parts, front)
        except Exception:
            logger.exception("batched forward pass failed; running each request alone")
        result: Outputs = {}
        for i in {p[1] for p in parts}:
            try:
                result.update(self._run([p for p in parts if p[1] == i], front))
            except Exception:
                logger.exception("forward pass failed for request %d", i)
        return result

    @staticmethod
    def _run(parts: list[tuple[str, int, torch.Tensor]], front: FrontEnd) -> Outputs:
        device = front.device
        with torch.no_grad():
            batch = torch.cat([p[2].to(device, non_blocking=True) for p in parts])
            raw = front.forward(batch)
            probs = torch.softmax(front.logits(raw).float(), dim=1).cpu()
        if len(probs) != len(batch):
            raise RuntimeError(f"the model answered {len(probs)} rows for {len(batch)} inputs")
        result, start = {}, 0
        for kind, i, x in parts:
            result[(kind, i)] = (raw[start : start + len(x)], probs[start : start + len(x)])
            start += len(x)
        return result
