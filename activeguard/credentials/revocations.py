"""Signed revocation lists: what the license server revoked, verifiable without it.

The license server signs the list with its license key (Ed25519, the key every handler already
trusts for licenses), over a canonical payload that carries a **version** (the store's last
revocation sequence number: it never goes down) and an **issued-at** time. A handler that reads the
list from the server or from a file checks the signature, refuses a list older than the one it holds
(a rolled-back list would un-revoke), and knows how stale its list is.

Text form (``.agrevocations``): JSON ``{"format", "payload": base64, "signature": base64, "key_id"}``.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from activeguard.credentials.licenses import key_id

FORMAT = "activeguard-revocations/1"
_DOMAIN = b"activeguard-revocation-list/1\n"  # signed messages of other kinds can never pose as a list
MAX_TEXT_BYTES = 64 * 1024 * 1024  # 19,000 users of 100 models, revoked: about 60 MB of ids


class RevocationListError(ValueError):
    """A revocation list that cannot be trusted (unreadable, unsigned, signed by an unknown key, tampered)."""


@dataclass(frozen=True)
class RevocationList:
    """License ids revoked as of ``version``; ``model_id`` empty: every model's."""

    version: int
    issued_at: int
    revoked: frozenset[str]
    model_id: str = ""
    key_id: str = ""

    def payload(self) -> bytes:
        doc = {
            "format": FORMAT,
            "version": self.version,
            "issued_at": self.issued_at,
            "model_id": self.model_id,
            "revoked": sorted(self.revoked),
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")

    def age(self, now: float | None = None) -> float:
        """Seconds since the license server issued this list."""
        return max(0.0, (time.time() if now is None else now) - self.issued_at)


def sign_revocations(
    revoked: Iterable[str], version: int, key: Ed25519PrivateKey, *, model_id: str = "", issued_at: int | None = None
) -> str:
    """The signed list's text form."""
    if version < 0:
        raise ValueError(f"a revocation list's version is never negative, got {version}")
    listed = RevocationList(version, int(time.time()) if issued_at is None else issued_at, frozenset(revoked), model_id)
    payload = listed.payload()
    document = {
        "format": FORMAT,
        "payload": base64.b64encode(payload).decode("ascii"),
        "signature": base64.b64encode(key.sign(_DOMAIN + payload)).decode("ascii"),
        "key_id": key_id(key.public_key()),
    }
    return json.dumps(document, sort_keys=True)


def verify_revocations(text: str | bytes, keys: Mapping[str, Ed25519PublicKey]) -> RevocationList:
    """The list a signed text holds, if one of ``keys`` (key id -> public key) signed it unaltered."""
    if isinstance(text, (bytes, bytearray)):
        if len(text) > MAX_TEXT_BYTES:
            raise RevocationListError("revocation list too large")
        text = bytes(text).decode("utf-8", errors="replace")
    if not isinstance(text, str) or len(text) > MAX_TEXT_BYTES:
        raise RevocationListError("a revocation list must be text of reasonable size")
    try:
        document = json.loads(text)
    except (ValueError, RecursionError):
        raise RevocationListError("not a revocation list: not JSON") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise RevocationListError(f"not a revocation list (expected format {FORMAT})")
    signer = document.get("key_id")
    if not isinstance(signer, str) or signer not in keys:
        raise RevocationListError("the revocation list is signed by a key this deployment does not trust")
    try:
        payload = base64.b64decode(str(document.get("payload", "")), validate=True)
        signature = base64.b64decode(str(document.get("signature", "")), validate=True)
    except (binascii.Error, ValueError):
        raise RevocationListError("the revocation list's payload or signature is not base64") from None
    try:
        keys[signer].verify(signature, _DOMAIN + payload)
    except InvalidSignature:
        raise RevocationListError("the revocation list's signature does not match (tampered or forged)") from None
    return _parse(payload, signer)


def _parse(payload: bytes, signer: str) -> RevocationList:
    """A signed payload's fields; a signer's bug must still not crash a reader."""
    try:
        doc = json.loads(payload.decode("ascii"))
        version, issued_at, model_id, revoked = doc["version"], doc["issued_at"], doc["model_id"], doc["revoked"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise RevocationListError("the revocation list's payload is malformed") from None
    if (
        doc.get("format") != FORMAT
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (version, issued_at))
        or not isinstance(model_id, str)
        or not isinstance(revoked, list)
        or not all(isinstance(r, str) for r in revoked)
    ):
        raise RevocationListError("the revocation list's payload is malformed")
    return RevocationList(version, issued_at, frozenset(revoked), model_id, signer)
