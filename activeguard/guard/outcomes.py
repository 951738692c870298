"""What the guard decides about: a request as the transport delivered it, the reasons it can give,
and a verdict per request before a front end renders it.

The reason strings are also the label values of the handler's metrics and the keys of the
gateway's reason → gRPC code table (``gateway/errors.py``), which a test keeps complete.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from activeguard.credentials import sessions

AUTHORIZED = "authorized"
PAPER_AUTHORIZED = "paper_mode_authorized"
SESSION_AUTHORIZED = "session_authorized"
NO_CREDENTIALS = "no_credentials"
BAD_SIGNATURE = "bad_signature"
MALFORMED_LICENSE = "malformed_license"
EXPIRED = "expired"
REVOKED = "revoked"
WRONG_MODEL = "wrong_model"
FO_MISMATCH = "fo_mismatch"
MALFORMED_INPUT = "malformed_input"
INTERNAL_ERROR = "internal_error"
REVOCATION_LIST_STALE = "revocation_list_stale"  # no fresh signed revocation list: credentials are refused
EXTRACTION_THROTTLED = "extraction_throttled"  # the extraction monitor flagged the license: refused for a while
EXTRACTION_SUSPENDED = "extraction_suspended"  # flagged under the suspend policy: refused until revoked
BAD_SESSION = sessions.SessionError.reason
EXPIRED_SESSION = sessions.ExpiredSession.reason

ADMITTED_REASONS = (AUTHORIZED, PAPER_AUTHORIZED, SESSION_AUTHORIZED)
REFUSED_REASONS = (
    NO_CREDENTIALS,
    BAD_SIGNATURE,
    MALFORMED_LICENSE,
    EXPIRED,
    REVOKED,
    WRONG_MODEL,
    FO_MISMATCH,
    MALFORMED_INPUT,
    INTERNAL_ERROR,
    REVOCATION_LIST_STALE,
    EXTRACTION_THROTTLED,
    EXTRACTION_SUSPENDED,
    BAD_SESSION,
    EXPIRED_SESSION,
)

# The body key under which a gateway-attested request gets the decision explained.
EXPLANATION = "activeguard"


class InputError(ValueError):
    """The client's input is unusable: that request's 400, never another's."""


@dataclass
class Request:
    """One client request as the transport delivered it (HTTP or gRPC, already de-framed).

    Every field is untrusted: any type may arrive here, and :meth:`Guard.decide` must cope.
    """

    body: Any  # bytes/bytearray/str, or a dict when the transport already decoded JSON
    license: Any = None  # str | bytes from a header or the gRPC input map
    session: Any = None  # a gateway session token (purpose "session")
    explain: Any = None  # a gateway token (purpose "explain"): say why, do not admit


@dataclass
class Outcome:
    """A rendered answer: HTTP status, reason, body, and the admitted user (None when refused)."""

    status: int
    reason: str
    body: Any
    user: str | None = None


@dataclass
class Verdict:
    """One request's decision, before a front end renders it: the rows to answer with (the model's
    own for an admitted request, the policy's for a refused one under ``random``) or an error."""

    status: int
    reason: str
    outputs: Any = None  # rows in the model's own output form; None for errors and credential checks
    message: str | None = None  # the error's text when status != 200
    user: str | None = None
    user_index: int | None = None
    explain: sessions.SessionClaims | None = None  # set only for gateway-attested requests
    license_id: str | None = None  # the license behind the request, once its signature held
    rows: int = 0  # the rows the request asked about (1 for a request whose input could not be read)

    @property
    def admitted(self) -> bool:
        return self.reason in ADMITTED_REASONS

    def explanation(self) -> dict[str, Any]:
        """What a gateway-attested request is told about its decision."""
        if self.admitted:
            return {"authorized": True, "reason": self.reason, "user": self.user, "user_index": self.user_index}
        return {"authorized": False, "reason": self.reason}


def internal_error(explain: sessions.SessionClaims | None = None) -> Verdict:
    """The verdict of a request that hit a bug (never the client's fault, never another request's)."""
    return Verdict(500, INTERNAL_ERROR, message="internal error", explain=explain)


Read = tuple[torch.Tensor | None, dict[str, Any]] | Exception  # a request's input and extras, or why not
