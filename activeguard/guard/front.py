"""How a deployment turns request bodies into model input and runs the model.

The guard's own front end (:class:`FrontEnd`) reads JSON/.npy tensors in the input spec and runs a
:class:`~activeguard.models.inputs.ClientView`; the TorchServe handler composes an owner's handler
through a subclass (its preprocess and inference). Every method may raise: the guard contains it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from activeguard.guard.outcomes import Read, Request
from activeguard.guard.parsing import BodyParser


class FrontEnd:
    """The tensor front end: bodies through the body parser, the model's own forward."""

    def __init__(self, parser: BodyParser | None, model: nn.Module | None, device: torch.device):
        self.parser, self.model, self._device = parser, model, device

    @property
    def device(self) -> torch.device:
        return self._device

    def read(self, request: Request) -> tuple[torch.Tensor | None, dict[str, Any]]:
        """(model input rows, extras) of one request; None rows: a credential check alone.
        InputError: the client's input is unusable (a 400)."""
        return self.parser.parse(request.body)

    def read_all(self, requests: list[Request]) -> list[Read]:
        """What each request reads as, or the exception it raised (each request alone by default)."""
        results: list[Read] = []
        for request in requests:
            try:
                results.append(self.read(request))
            except Exception as exc:  # kept, not raised: the guard answers it for this request only
                results.append(exc)
        return results

    def fingerprint_input(self, fingerprint: torch.Tensor) -> torch.Tensor:
        """A license's fingerprint (a row in the input spec's space) as this front end's model input."""
        return fingerprint

    def forward(self, batch: torch.Tensor) -> Any:
        return self.model(batch)

    def logits(self, raw: Any) -> torch.Tensor:
        """The model's raw answer as logits (the control layer decides on softmax of these)."""
        return raw

    def permuted(self, raw: Any, index: torch.Tensor) -> Any:
        """The model's own output rows with their classes reordered (row i's column j becomes its
        column ``index[i, j]``), in the model's own output form: the refusal policy's answer."""
        return raw.gather(1, index.to(raw.device))
