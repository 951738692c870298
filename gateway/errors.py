"""One table from every outcome the gateway can meet to the gRPC code its client sees.

- the handler's outcome reasons (built from :mod:`activeguard.guard.outcomes`' own constants, and
  a test keeps the table complete);
- TorchServe's gRPC failures: worker death, a full queue or a restarting frontend all mean
  "try again" (UNAVAILABLE, retried once within the deadline). TorchServe's own message, which
  may carry Java class names, never reaches the client;
- RESOURCE_EXHAUSTED is kept for the gateway's own limits (rate, sessions), so a client can
  tell "slow down" from "the server is in trouble".
"""

from __future__ import annotations

import grpc

from activeguard.guard import outcomes as p
from activeguard_proto.rpc import Refusal

__all__ = ["HANDLER_REASON_CODES", "Refusal", "handler_refusal", "upstream_refusal"]

Code = grpc.StatusCode

HANDLER_REASON_CODES: dict[str, grpc.StatusCode] = {
    p.NO_CREDENTIALS: Code.UNAUTHENTICATED,
    p.BAD_SIGNATURE: Code.UNAUTHENTICATED,
    p.MALFORMED_LICENSE: Code.UNAUTHENTICATED,
    p.EXPIRED: Code.UNAUTHENTICATED,
    p.BAD_SESSION: Code.UNAUTHENTICATED,
    p.EXPIRED_SESSION: Code.UNAUTHENTICATED,
    p.REVOKED: Code.PERMISSION_DENIED,
    p.WRONG_MODEL: Code.PERMISSION_DENIED,
    p.FO_MISMATCH: Code.PERMISSION_DENIED,
    p.MALFORMED_INPUT: Code.INVALID_ARGUMENT,
    p.INTERNAL_ERROR: Code.INTERNAL,
    p.REVOCATION_LIST_STALE: Code.UNAVAILABLE,  # the handler holds no fresh revocation list: retry later
    p.EXTRACTION_THROTTLED: Code.RESOURCE_EXHAUSTED,  # the extraction monitor's cool-down: slow down
    p.EXTRACTION_SUSPENDED: Code.PERMISSION_DENIED,  # flagged as extraction; the license is being revoked
}

# TorchServe's codes that mean "this worker or frontend cannot answer now": retried once.
UPSTREAM_RETRYABLE = frozenset(
    {
        Code.UNAVAILABLE,
        Code.RESOURCE_EXHAUSTED,
        Code.INTERNAL,
        Code.UNKNOWN,
        Code.ABORTED,
        Code.CANCELLED,
    }
)
# TorchServe's codes that are the request's own fault keep their meaning; every other code is a
# server-side problem and reaches the client as UNAVAILABLE.
UPSTREAM_CLIENT_CODES = frozenset({Code.INVALID_ARGUMENT, Code.OUT_OF_RANGE})


def handler_refusal(reason: str, message: str | None = None) -> Refusal:
    code = HANDLER_REASON_CODES.get(reason)
    if code is None:
        return Refusal(Code.INTERNAL, f"the model server answered an unknown outcome {reason[:64]!r}")
    return Refusal(code, message or f"refused: {reason.replace('_', ' ')}")


def upstream_refusal(code: grpc.StatusCode, model: str) -> Refusal:
    """A sanitized refusal for a TorchServe failure: its code class, never its message."""
    if code in UPSTREAM_CLIENT_CODES:
        return Refusal(code, f"TorchServe refused the request for model {model!r} as invalid")
    if code == Code.DEADLINE_EXCEEDED:
        return Refusal(Code.UNAVAILABLE, f"TorchServe did not answer for model {model!r} within the deadline")
    return Refusal(Code.UNAVAILABLE, f"TorchServe could not serve model {model!r} right now ({code.name}); retry")
