"""The serving-side guard: credentials → one forward pass → a decision per request.

Framework-free on purpose: the TorchServe handler (``handlers/``) is thin glue around
:class:`Guard`, so every rule here is tested without a server. For each request of a batch:

1. the body is parsed (JSON ``{"inputs": ...}`` or ``.npy`` bytes) and validated;
2. credentials are checked: a gateway session token (trusted, no fingerprint), or a signed
   license (signature, expiry, model id, revocation), or — in paper mode only — a bare
   ``"fingerprint"`` whose (t, c) alone names the user;
3. every admitted input *and* every fingerprint to check run in **one** forward pass;
4. a license is admitted only if its fingerprint's output decodes to the licensed user;
   anything unauthorized gets the policy's output (``random``) or a 403 (``reject``).

A bad request gets its own 4xx outcome; it never fails the others in the batch.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from activeguard import licenses, sessions
from activeguard.control import ControlConfig, decide, random_outputs

PROFILE_FORMAT = "activeguard-profile/1"
MAX_LICENSE_BYTES = 1024 * 1024
PROFILE_FILE = "activeguard-profile.json"

# Outcome reasons: also the label values of the handler's metrics.
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

_LICENSE_REASONS = {
    licenses.ExpiredLicense: EXPIRED,
    licenses.NotYetValid: EXPIRED,
    licenses.RevokedLicense: REVOKED,
    licenses.WrongModel: WRONG_MODEL,
    licenses.MalformedLicense: MALFORMED_LICENSE,
}


@dataclass(frozen=True)
class Profile:
    """What the archive tells the handler about protecting its model."""

    model_id: str
    input_shape: tuple[int, ...]
    num_classes: int = 10
    confidences: tuple[float, ...] = (0.2, 0.3, 0.4)
    epsilon: float = 0.01
    policy: str = "random"
    paper_mode: bool = False
    license_public_keys: dict[str, str] = field(default_factory=dict)  # key id -> PEM
    gateway_public_key: str | None = None  # PEM
    revocation_file: str | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    max_rows: int = 256

    @property
    def control(self) -> ControlConfig:
        return ControlConfig(self.num_classes, self.confidences, self.epsilon, self.policy)

    def to_json(self) -> str:
        doc = dict(self.__dict__, format=PROFILE_FORMAT, input_shape=list(self.input_shape),
                   confidences=list(self.confidences))
        return json.dumps(doc, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Profile":
        doc = json.loads(text)
        if doc.pop("format", None) != PROFILE_FORMAT:
            raise ValueError(f"not an {PROFILE_FORMAT} document")
        doc["input_shape"] = tuple(doc["input_shape"])
        doc["confidences"] = tuple(doc["confidences"])
        profile = cls(**doc)
        profile.control  # validates K, C_fp, ε and the policy
        return profile


@dataclass
class Request:
    """One client request as the transport delivered it (HTTP or gRPC, already de-framed)."""

    body: Any  # bytes/bytearray/str, or a dict when the transport already decoded JSON
    license: str | bytes | None = None
    session: str | bytes | None = None


@dataclass
class Outcome:
    status: int
    reason: str
    body: dict[str, Any]
    user: str | None = None


class InputError(ValueError):
    pass


def _text(value: str | bytes | bytearray | None) -> str | None:
    if value is None:
        return None
    return bytes(value).decode("utf-8", errors="replace") if isinstance(value, (bytes, bytearray)) else str(value)


def encode_license_header(license_text: str) -> str:
    """The compact header form: base64(zlib(.aglicense text)); fits TorchServe's 8 KB header limit."""
    return base64.b64encode(zlib.compress(license_text.encode("utf-8"), 9)).decode("ascii")


def decode_license_header(raw: str | bytes) -> str:
    """Accept the .aglicense text itself, its base64, or the compact zlib form."""
    text = _text(raw).strip()
    if text.startswith("{"):
        return text
    try:
        data = base64.b64decode(text, validate=True)
        if data[:1] == b"\x78":  # zlib stream; bounded so a small header cannot inflate to gigabytes
            inflater = zlib.decompressobj()
            data = inflater.decompress(data, MAX_LICENSE_BYTES)
            if inflater.unconsumed_tail:
                raise ValueError("license too large")
        return data.decode("utf-8")
    except (binascii.Error, ValueError, zlib.error, UnicodeDecodeError):
        raise licenses.MalformedLicense("license is neither .aglicense text nor its (compressed) base64") from None


class Guard:
    """Decides a batch of requests against one model and its profile."""

    def __init__(self, model: nn.Module, profile: Profile):
        self.model = model.eval()
        self.profile = profile
        self.config = profile.control
        self.license_keys = {
            kid: licenses.public_key_from_pem(pem, f"license key {kid}") for kid, pem in profile.license_public_keys.items()
        }
        self.gateway_key = (licenses.public_key_from_pem(profile.gateway_public_key, "gateway key")
                            if profile.gateway_public_key else None)
        self._revoked: frozenset[str] = frozenset()
        self._revocation_mtime: float | None = None
        self._generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))

    # -- revocation: re-read the file only when it changes, so updates need no restart --------
    def revoked(self) -> frozenset[str]:
        path = self.profile.revocation_file
        if not path:
            return self._revoked
        try:
            mtime = os.stat(path).st_mtime_ns
        except FileNotFoundError:
            return self._revoked
        if mtime != self._revocation_mtime:
            lines = Path(path).read_text().split()
            self._revoked = frozenset(line.strip() for line in lines if line.strip())
            self._revocation_mtime = mtime
        return self._revoked

    # -- parsing ----------------------------------------------------------------------------
    def parse_inputs(self, body: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        """(inputs, extras) from a JSON or .npy body; a JSON body may also carry a ``license``
        (for fingerprints too large for an HTTP header) or, in paper mode, a bare ``fingerprint``."""
        if isinstance(body, (bytes, bytearray)):
            if len(body) > self.profile.max_body_bytes:
                raise InputError(f"body of {len(body)} bytes exceeds the limit of {self.profile.max_body_bytes}")
            if len(body) == 0:
                raise InputError("empty body: send JSON {\"inputs\": [...]} or .npy bytes")
            if bytes(body[:6]) == b"\x93NUMPY":
                try:
                    array = np.load(io.BytesIO(bytes(body)), allow_pickle=False)
                except (ValueError, OSError) as exc:
                    raise InputError(f"unreadable .npy body: {exc}") from None
                return self._as_tensor(array), {}
            try:
                body = json.loads(bytes(body).decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                raise InputError("body is neither JSON nor .npy bytes") from None
        if isinstance(body, str):
            return self.parse_inputs(body.encode())
        if not isinstance(body, dict) or "inputs" not in body:
            raise InputError("JSON body must be an object with an \"inputs\" field")
        return self._as_tensor(body["inputs"]), {k: body[k] for k in ("fingerprint", "license") if k in body}

    def _as_tensor(self, data: Any) -> torch.Tensor:
        try:
            array = np.asarray(data, dtype=np.float32)
        except (TypeError, ValueError):
            raise InputError("inputs must be a nested list of numbers") from None
        shape = self.profile.input_shape
        if array.shape == shape:
            array = array[None]
        if array.ndim != len(shape) + 1 or array.shape[1:] != shape:
            raise InputError(f"inputs must have shape (N, {', '.join(map(str, shape))}), got {array.shape}")
        if not 1 <= array.shape[0] <= self.profile.max_rows:
            raise InputError(f"between 1 and {self.profile.max_rows} rows per request, got {array.shape[0]}")
        if not np.isfinite(array).all():
            raise InputError("inputs contain NaN or inf")
        return torch.from_numpy(np.ascontiguousarray(array))

    def _license(self, raw: str | bytes, revoked: frozenset[str]) -> licenses.LicensePayload:
        signed = licenses.SignedLicense.from_text(decode_license_header(raw))
        payload = licenses.verify_license(signed, self.license_keys, model_id=self.profile.model_id,
                                          revoked=revoked)
        if int(np.prod(payload.fingerprint_shape)) != int(np.prod(self.profile.input_shape)):
            raise licenses.MalformedLicense("license fingerprint does not fit this model's input shape")
        return payload

    def _fingerprint(self, payload: licenses.LicensePayload) -> torch.Tensor:
        return payload.fingerprint_tensor().reshape(1, *self.profile.input_shape)

    # -- the decision ----------------------------------------------------------------------
    def handle(self, requests: list[Request]) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(requests)
        inputs: dict[int, torch.Tensor] = {}
        checks: dict[int, tuple[torch.Tensor, int | None, str | None]] = {}  # fingerprint, user index, user
        sessions_ok: dict[int, sessions.SessionClaims] = {}
        denied: dict[int, str] = {}
        revoked = self.revoked()  # one look at the revocation file per batch
        for i, request in enumerate(requests):
            try:
                x, extras = self.parse_inputs(request.body)
            except InputError as exc:
                outcomes[i] = Outcome(400, MALFORMED_INPUT, {"error": str(exc), "reason": MALFORMED_INPUT})
                continue
            inputs[i] = x
            try:
                if request.session is not None and self.gateway_key is not None:
                    sessions_ok[i] = sessions.verify_session(
                        _text(request.session).removeprefix("Bearer ").strip(), self.gateway_key,
                        model_id=self.profile.model_id, revoked=revoked)
                elif request.license is not None or "license" in extras:
                    payload = self._license(request.license or extras["license"], revoked)
                    checks[i] = (self._fingerprint(payload), payload.user_index, payload.user)
                elif "fingerprint" in extras and self.profile.paper_mode:
                    checks[i] = (self._as_tensor(extras["fingerprint"])[:1], None, None)
                else:
                    denied[i] = NO_CREDENTIALS if request.session is None else BAD_SIGNATURE
            except sessions.SessionError as exc:
                denied[i] = exc.reason
            except licenses.LicenseError as exc:
                denied[i] = _LICENSE_REASONS.get(type(exc), BAD_SIGNATURE)
            except InputError:
                denied[i] = MALFORMED_LICENSE
        probs = self._forward(inputs, checks)
        for i in inputs:
            outcomes[i] = self._decide(i, probs, sessions_ok, checks, denied)
        return [o for o in outcomes if o is not None]

    def _forward(self, inputs: dict[int, torch.Tensor], checks: dict) -> dict[tuple[str, int], torch.Tensor]:
        """One pass over every input and every fingerprint; results keyed by (kind, request)."""
        parts = [("in", i, x) for i, x in inputs.items()] + [("fp", i, c[0]) for i, c in checks.items()]
        if not parts:
            return {}
        with torch.no_grad():
            out = torch.softmax(self.model(torch.cat([p[2] for p in parts])), dim=1)
        result, start = {}, 0
        for kind, i, x in parts:
            result[(kind, i)] = out[start : start + len(x)]
            start += len(x)
        return result

    def _decide(self, i: int, probs: dict, sessions_ok: dict, checks: dict, denied: dict) -> Outcome:
        if i in sessions_ok:
            claims = sessions_ok[i]
            return self._admit(probs[("in", i)], SESSION_AUTHORIZED, claims.user, claims.user_index)
        if i in checks:
            _, licensed_index, user = checks[i]
            decision = decide(probs[("fp", i)], self.config)
            if decision.authorized[0] and (licensed_index is None or int(decision.user[0]) == licensed_index):
                index = int(decision.user[0])
                reason = AUTHORIZED if licensed_index is not None else PAPER_AUTHORIZED
                return self._admit(probs[("in", i)], reason, user or f"user-{index}", index)
            denied[i] = FO_MISMATCH
        return self._refuse(probs[("in", i)], denied[i])

    def _admit(self, p: torch.Tensor, reason: str, user: str, index: int) -> Outcome:
        return Outcome(200, reason, {"authorized": True, "reason": reason, "user": user, "user_index": index,
                                     "outputs": p.tolist()}, user=user)

    def _refuse(self, p: torch.Tensor, reason: str) -> Outcome:
        if self.config.policy == "reject":
            return Outcome(403, reason, {"authorized": False, "reason": reason,
                                         "error": f"unauthorized: {reason.replace('_', ' ')}"})
        fake = random_outputs(len(p), self.config.num_classes, self._generator)
        return Outcome(200, reason, {"authorized": False, "reason": reason, "outputs": fake.tolist()})
