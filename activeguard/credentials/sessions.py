"""Short-lived session tokens: a gateway vouches that a license's fingerprint already passed.

Token = ``v1.<base64url(canonical JSON claims)>.<base64url(Ed25519 signature)>``, signed over a
domain prefix so no other signed message can pose as a session. A handler that trusts the
gateway's public key admits the bearer without running a fingerprint.

Tokens have a ``purpose``: ``session`` admits its bearer; ``explain`` admits nobody and only
asks the handler to say why it decided as it did (the gateway's Authenticate needs that, while
the control layer stays silent to everyone else, who cannot sign).
"""

from __future__ import annotations

import base64
import binascii
import json
import time
import uuid
from collections.abc import Container
from dataclasses import asdict, dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

DOMAIN = b"activeguard-session/1\x00"
PREFIX = "v1"
MAX_TOKEN_LENGTH = 4096
SESSION = "session"
EXPLAIN = "explain"


class SessionError(Exception):
    """Base: the token does not admit its bearer. ``reason`` is the metric label."""

    reason = "bad_session"


class ExpiredSession(SessionError):
    reason = "expired_session"


class RevokedSession(SessionError):
    reason = "revoked"


class WrongModelSession(SessionError):
    reason = "wrong_model"


@dataclass(frozen=True)
class SessionClaims:
    session_id: str
    user: str
    user_index: int
    license_id: str
    model_id: str
    expires_at: float
    purpose: str = SESSION


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def issue_session(
    key: Ed25519PrivateKey,
    *,
    user: str,
    user_index: int,
    license_id: str,
    model_id: str,
    ttl_seconds: float,
    now: float | None = None,
    purpose: str = SESSION,
) -> tuple[str, SessionClaims]:
    claims = SessionClaims(
        uuid.uuid4().hex,
        user,
        int(user_index),
        license_id,
        model_id,
        (time.time() if now is None else now) + ttl_seconds,
        purpose,
    )
    body = json.dumps(asdict(claims), sort_keys=True, separators=(",", ":")).encode()
    return f"{PREFIX}.{_b64(body)}.{_b64(key.sign(DOMAIN + body))}", claims


def _well_typed(claims: SessionClaims) -> bool:
    texts = (claims.session_id, claims.user, claims.license_id, claims.model_id)
    return (
        all(isinstance(t, str) for t in texts)
        and type(claims.user_index) is int
        and isinstance(claims.expires_at, (int, float))
        and not isinstance(claims.expires_at, bool)
        and claims.purpose in (SESSION, EXPLAIN)
    )


def signed_claims(token: str, key: Ed25519PublicKey) -> SessionClaims:
    """The claims of a token this key signed, whatever their expiry or purpose; else SessionError."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH:
        raise SessionError("session token is not a string of sensible length")
    parts = token.strip().split(".")
    if len(parts) != 3 or parts[0] != PREFIX:
        raise SessionError("session token is not of the form v1.<claims>.<signature>")
    try:
        body, signature = _unb64(parts[1]), _unb64(parts[2])
    except (binascii.Error, ValueError):
        raise SessionError("session token is not valid base64url") from None
    try:
        key.verify(signature, DOMAIN + body)
    except InvalidSignature:
        raise SessionError("session token signature is invalid (altered, or signed by another key)") from None
    try:
        claims = SessionClaims(**json.loads(body))
    except (TypeError, ValueError, RecursionError) as exc:
        raise SessionError(f"session claims are malformed: {exc}") from None
    if not _well_typed(claims):
        raise SessionError("session claims are malformed")
    return claims


def verify_session(
    token: str,
    key: Ed25519PublicKey,
    *,
    model_id: str | None = None,
    revoked: Container[str] = (),
    now: float | None = None,
    purpose: str = SESSION,
) -> SessionClaims:
    """Return the claims or raise the :class:`SessionError` that says why not."""
    return admit_claims(signed_claims(token, key), model_id=model_id, revoked=revoked, now=now, purpose=purpose)


def admit_claims(
    claims: SessionClaims,
    *,
    model_id: str | None = None,
    revoked: Container[str] = (),
    now: float | None = None,
    purpose: str = SESSION,
) -> SessionClaims:
    """The checks after the signature (:func:`signed_claims`): purpose, expiry, model, revocation."""
    if claims.purpose != purpose:
        raise SessionError(f"token is for {claims.purpose!r}, not {purpose!r}")
    if (time.time() if now is None else now) >= claims.expires_at:
        raise ExpiredSession(f"session {claims.session_id} expired")
    if model_id is not None and claims.model_id != model_id:
        raise WrongModelSession("session was issued for another model")
    if claims.license_id in revoked:
        raise RevokedSession(f"license {claims.license_id} behind this session has been revoked")
    return claims
