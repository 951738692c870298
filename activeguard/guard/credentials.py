"""Which credential a request carries, and whether it holds.

In order of precedence: a gateway session token (trusted: the gateway already ran the fingerprint),
a signed license (signature, expiry, model id and revocation here; its fingerprint joins the
batch's forward pass), or, in paper mode only, a bare ``"fingerprint"`` whose (t, c) alone names
the user. A worker remembers only successes (a verified signature, a fingerprint that decoded to
its user once: the served model does not change under a worker); expiry, model and revocation are
checked on every request.
"""

from __future__ import annotations

import hashlib
import logging
import math
from typing import TYPE_CHECKING, Any

from activeguard.credentials import licenses, sessions
from activeguard.credentials.header import decode_license_header
from activeguard.guard import outcomes as o
from activeguard.guard.batch import Batch
from activeguard.guard.outcomes import InputError, Read, Request, Verdict
from activeguard.guard.parsing import BodyParser
from activeguard.guard.profile import Profile
from activeguard.guard.recent import Recent

if TYPE_CHECKING:
    from activeguard.guard.front import FrontEnd

logger = logging.getLogger(__name__)

CACHE_ENTRIES = 4096  # verified licenses, session tokens and passed fingerprints a worker remembers

_LICENSE_REASONS = {
    licenses.ExpiredLicense: o.EXPIRED,
    licenses.NotYetValid: o.EXPIRED,
    licenses.RevokedLicense: o.REVOKED,
    licenses.WrongModel: o.WRONG_MODEL,
    licenses.MalformedLicense: o.MALFORMED_LICENSE,
}

FingerprintKey = tuple[str, str]  # (license id, fingerprint digest)


class CredentialCheck:
    """Sorts each request of a batch by its credential; owns the worker's memory of verified ones."""

    def __init__(self, profile: Profile, parser: BodyParser):
        self.profile = profile
        self.config = profile.control
        self.parser = parser
        self.license_keys = {
            kid: licenses.public_key_from_pem(pem, f"license key {kid}")
            for kid, pem in profile.license_public_keys.items()
        }
        self.gateway_key = (
            licenses.public_key_from_pem(profile.gateway_public_key, "gateway key")
            if profile.gateway_public_key
            else None
        )
        self._warned_fo_space = False  # a license of another FO space is logged once, not per request
        self._signed_licenses: Recent[bytes, licenses.LicensePayload] = Recent(CACHE_ENTRIES)
        self._signed_tokens: Recent[str, sessions.SessionClaims] = Recent(CACHE_ENTRIES)
        self._passed_fingerprints: Recent[FingerprintKey, int] = Recent(CACHE_ENTRIES)

    def sort(self, i: int, request: Request, read: Read, batch: Batch, front: FrontEnd) -> None:
        """File request ``i`` in ``batch``: its input, and the credential path it takes (a session,
        a license already passed, a fingerprint to run, or a denial), given what its body read as."""
        session = self._gateway_claims(request.session)
        explain = self._gateway_claims(request.explain)
        attested = next((c for c in (explain, session) if isinstance(c, sessions.SessionClaims)), None)
        if attested is not None:
            batch.explain[i] = attested
        if isinstance(read, Exception):
            if not isinstance(read, InputError):
                raise read  # a bug while reading: this request's internal error
            batch.verdicts[i] = Verdict(400, o.MALFORMED_INPUT, message=str(read), explain=attested)
            return
        x, extras = read
        if x is None:  # a credential check alone (the gateway's Authenticate for an opaque-payload model)
            if not isinstance(explain, sessions.SessionClaims):
                batch.verdicts[i] = Verdict(
                    403, o.BAD_SIGNATURE, message="a request without input must carry the gateway's explain token"
                )
                return
            batch.auth_only.add(i)
        else:
            batch.inputs[i] = x
        try:
            self._credential(i, request, session, extras, batch, front)
        except sessions.SessionError as exc:
            batch.denied[i] = exc.reason
        except licenses.LicenseError as exc:
            batch.denied[i] = _LICENSE_REASONS.get(type(exc), o.BAD_SIGNATURE)
        except InputError:
            batch.denied[i] = o.MALFORMED_LICENSE

    def _credential(
        self,
        i: int,
        request: Request,
        session: sessions.SessionClaims | sessions.SessionError | None,
        extras: dict[str, Any],
        batch: Batch,
        front: FrontEnd,
    ) -> None:
        if batch.stale and (session is not None or _present(request.license) or "license" in extras):
            batch.denied[i] = o.REVOCATION_LIST_STALE
        elif session is not None:  # a session was sent and a gateway key is trusted
            if isinstance(session, sessions.SessionError):
                raise session
            batch.sessions[i] = sessions.admit_claims(session, model_id=self.profile.model_id, revoked=batch.revoked)
            batch.license_ids[i] = batch.sessions[i].license_id
        elif _present(request.license) or "license" in extras:
            signed = self._signed(request.license if _present(request.license) else extras["license"])
            batch.license_ids[i] = signed.license_id  # its signature held: its refusals count as its usage
            payload = licenses.admit_payload(signed, model_id=self.profile.model_id, revoked=batch.revoked)
            passed = self._passed_fingerprints.get(_fingerprint_key(payload))
            if passed is not None:  # this license's fingerprint already authenticated on this model
                batch.passed[i] = (payload.user, passed)
                return
            if not self._same_fo(payload):
                batch.denied[i] = o.FO_MISMATCH
                return
            fingerprint = payload.fingerprint_tensor().reshape(1, *self.profile.input_shape)
            batch.checks[i] = (front.fingerprint_input(fingerprint), payload.user_index, payload.user)
            batch.fingerprint_keys[i] = _fingerprint_key(payload)
        elif "fingerprint" in extras and self.profile.paper_mode:
            batch.checks[i] = (self.parser.as_tensor(extras["fingerprint"])[:1], None, None)
        else:
            batch.denied[i] = o.NO_CREDENTIALS if request.session is None else o.BAD_SIGNATURE

    def remember_pass(self, key: FingerprintKey, user_index: int) -> None:
        """A license's fingerprint decoded to its user: its next requests skip the extra row."""
        self._passed_fingerprints.put(key, user_index)

    def _signed(self, raw: Any) -> licenses.LicensePayload:
        """The payload of a license whose signature holds, checked once per license text (its digest
        is remembered); validity, model and revocation are the caller's to check on every request."""
        digest = _digest(raw)
        payload = self._signed_licenses.get(digest)
        if payload is None:
            signed = licenses.SignedLicense.from_text(decode_license_header(raw))
            payload = licenses.signed_payload(signed, self.license_keys)
            if math.prod(payload.fingerprint_shape) != math.prod(self.profile.input_shape):
                raise licenses.MalformedLicense("license fingerprint does not fit this model's input shape")
            self._signed_licenses.put(digest, payload)
        return payload

    def _gateway_claims(self, token: Any) -> sessions.SessionClaims | sessions.SessionError | None:
        """Claims of a token the gateway signed (any purpose, even expired), the error that says why
        it is not one, or None when there is no token or no gateway key. One signature check per token."""
        if token is None or self.gateway_key is None:
            return None
        try:
            text = _session_token(token)
            claims = self._signed_tokens.get(text)
            if claims is None:
                claims = sessions.signed_claims(text, self.gateway_key)
                self._signed_tokens.put(text, claims)
            return claims
        except sessions.SessionError as exc:
            return exc

    def _same_fo(self, payload: licenses.LicensePayload) -> bool:
        """Whether the license's FO is this archive's FO of its user index. When not, the license server
        and the archive use different FO spaces (a configuration error, not a client's): say so once."""
        try:
            fo = self.config.fo_of_user(payload.user_index)
        except ValueError:
            fo = None
        if fo is not None and (fo.target, fo.confidence) == (payload.fo_class, payload.fo_confidence):
            return True
        if not self._warned_fo_space:
            self._warned_fo_space = True
            logger.warning(
                "license %s names FO (class %d at %g) for user index %d, which this archive's %s FO space "
                "does not: register the model with the license server and package it with the same "
                "--fo-scheme (and grids)",
                payload.license_id,
                payload.fo_class,
                payload.fo_confidence,
                payload.user_index,
                self.config.space.scheme,
            )
        return False


def _present(value: Any) -> bool:
    """A credential field counts as sent when the client put anything there, even null or empty."""
    return value is not None


def _session_token(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("utf-8", errors="replace")
    if not isinstance(value, str):
        raise sessions.SessionError(f"credential must be a string, got {type(value).__name__}")
    return value.removeprefix("Bearer ").strip()


def _digest(raw: Any) -> bytes:
    """A key for a credential as sent (text or bytes; anything else is not a credential)."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", errors="surrogatepass")
    if not isinstance(raw, (bytes, bytearray)):
        raise InputError(f"credential must be a string, got {type(raw).__name__}")
    return hashlib.sha256(raw).digest()


def _fingerprint_key(payload: licenses.LicensePayload) -> FingerprintKey:
    return (payload.license_id, payload.fingerprint_sha256)
