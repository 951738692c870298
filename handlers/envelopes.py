"""Credentials through TorchServe's request envelopes (``service_envelope=json``, ``kserve``, ...).

An envelope runs before any handler: it turns each request into its instances and drops the rest,
so a license in the JSON body (``{"instances": [...], "license": "..."}``) and the link from a row
to its request's headers would be lost, and a licensed client would get the control layer's answer.
:func:`install` wraps every envelope of this worker process (one worker serves one model, so only
protected archives are touched) so that it records, per row, the request it came from and the
credentials that request's body carried; the handler reads them from the context.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from handlers.composition import body_credentials

ROW_ORIGINS = "activeguard_row_origins"  # context attribute: list[RowOrigin] | None


@dataclass(frozen=True)
class RowOrigin:
    """Which request a row came from, and what its body said besides the instances."""

    request: int
    credentials: dict[str, Any] = field(default_factory=dict)


def row_origins(credentials: list[dict[str, Any]], lengths: list[int] | None, rows: int) -> list[RowOrigin] | None:
    """One origin per row: from the envelope's per-request row counts where it keeps them (JSON does),
    one row per request where the counts match, else None (rows cannot be matched to requests)."""
    if lengths is not None and len(lengths) == len(credentials) and sum(lengths) == rows:
        return [RowOrigin(i, credentials[i]) for i, n in enumerate(lengths) for _ in range(n)]
    if len(credentials) == rows:
        return [RowOrigin(i, c) for i, c in enumerate(credentials)]
    return None


def install() -> None:
    """Wrap ``BaseEnvelope.handle`` in this process (idempotent; a TorchServe without envelopes is left alone)."""
    try:
        from ts.torch_handler.request_envelope.base import BaseEnvelope
    except ImportError:  # pragma: no cover - TorchServe always ships envelopes
        return
    if getattr(BaseEnvelope.handle, "_activeguard", False):
        return

    def handle(self, data, context):
        """BaseEnvelope.handle, recording each row's origin on the context before the handler runs."""
        self.context = context
        credentials = [_credentials(row) for row in data or []]
        if data:
            data = self.parse_input(data)
        if context is not None:
            lengths = getattr(self, "_lengths", None)
            origins = row_origins(credentials, list(lengths) if lengths else None, len(data or []))
            setattr(context, ROW_ORIGINS, origins)
        results = self._handle_fn(data, context)
        if results:
            results = self.format_output(results)
        return results

    handle._activeguard = True  # type: ignore[attr-defined]
    BaseEnvelope.handle = handle


def _credentials(row: Any) -> dict[str, Any]:
    """The credential fields of one request's JSON body (none for anything else)."""
    try:
        body = row.get("data") if row.get("data") is not None else row.get("body")
        return body_credentials(body)[1]
    except Exception:  # a body the envelope will refuse anyway: no credentials to find
        return {}
