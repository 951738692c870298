"""A protected model served in this process, for evaluations that play clients against the guard.

The guard is the one the TorchServe handler runs (:class:`~activeguard.guard.guard.Guard`), with
the profile ``package`` would write (the ranked FO space of the model's class count, a control
secret) and gateway sessions as credentials, so an evaluation sees exactly what a client of the
real server sees, without a server.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from activeguard.credentials import licenses, sessions
from activeguard.credentials.control import ControlConfig
from activeguard.guard.guard import Guard
from activeguard.guard.outcomes import Request
from activeguard.guard.profile import Profile
from activeguard.models.data import Split
from activeguard.models.sources import LoadedModel

ROWS_PER_REQUEST = 64


class ServedModel:
    """``loaded`` behind a guard; :meth:`session` makes a licensed client, :meth:`probabilities` answers."""

    def __init__(self, loaded: LoadedModel, control_secret: str | None = None, **profile_fields: Any):
        self.loaded = loaded
        self._gateway = Ed25519PrivateKey.generate()
        control = ControlConfig.signed_default(int(loaded.num_classes or 2))  # what package and protect use
        self.profile = Profile(
            model_id=loaded.model_id,
            input_shape=loaded.spec.shape,
            num_classes=control.num_classes,
            confidences=control.confidences,
            runner_up_confidences=control.runner_up_confidences,
            gateway_public_key=licenses.public_key_pem(self._gateway.public_key()).decode(),
            source=loaded.source.name,
            input_spec=loaded.spec.to_dict(),
            control_secret=control_secret or bytes(32).hex(),
            **profile_fields,
        ).validated()
        self.guard = Guard(loaded.model, self.profile)
        self._users = 0

    def with_profile(self, **changes: Any) -> ServedModel:
        """The same model behind a guard whose profile differs in ``changes``."""
        fields = {f.name: getattr(self.profile, f.name) for f in dataclasses.fields(self.profile)}
        fields.update(changes)
        twin = ServedModel.__new__(ServedModel)
        twin.loaded, twin._gateway, twin._users = self.loaded, self._gateway, self._users
        twin.profile = Profile(**fields).validated()
        twin.guard = Guard(self.loaded.model, twin.profile)
        return twin

    def session(self, user: str, license_id: str | None = None) -> str:
        """A gateway session for ``user`` (a license id of its own unless given)."""
        self._users += 1
        token, _ = sessions.issue_session(
            self._gateway,
            license_id=license_id or f"license-{user}",
            user=user,
            user_index=self._users,
            model_id=self.loaded.model_id,
            ttl_seconds=24 * 3600,
        )
        return token

    def probabilities(self, x: torch.Tensor, session: str | None) -> torch.Tensor:
        """What a client gets for each row of ``x``: one request per row, decided as one batch."""
        return self._ask([row[None] for row in x], session)

    def answer(self, x: torch.Tensor, session: str | None) -> torch.Tensor:
        """What a client gets for ``x`` sent as requests of :data:`ROWS_PER_REQUEST` rows."""
        chunks = [x[i : i + ROWS_PER_REQUEST] for i in range(0, len(x), ROWS_PER_REQUEST)]
        return self._ask(chunks, session) if chunks else torch.empty(0, int(self.profile.num_classes))

    def _ask(self, chunks: list[torch.Tensor], session: str | None) -> torch.Tensor:
        body = [json.dumps({"inputs": c.tolist()}).encode() for c in chunks]
        outcomes = self.guard.handle([Request(b, session=session) for b in body])
        refused = [o for o in outcomes if o.status != 200]
        if refused:
            raise RuntimeError(f"the guard refused a request it should answer: {refused[0].reason}")
        return torch.tensor([row for o in outcomes for row in o.body["outputs"]])


def default_owner(quick: bool, seed: int, progress: bool = False) -> tuple[Split, LoadedModel]:
    """The bundled MNIST LeNet-5 workload's data and trained owner (cached), as the serving evaluations use it."""
    from activeguard.models import sources
    from activeguard.models.workloads import DEFAULT_WORKLOAD, get

    work = get(DEFAULT_WORKLOAD)
    size = work.size(quick)
    split = work.data(seed, size)
    owner = work.owner(seed, size, progress=progress, split=split)
    return split, sources.load(owner.paths["checkpoint"])
