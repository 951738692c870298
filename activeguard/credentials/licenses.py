"""Signed user licenses (DESIGN §4.2): format, Ed25519 signing and verification, key files.

A license binds one user's fingerprint to a model and a fingerprinting output FO = (t, c):

- the **payload** is a canonical JSON document (keys sorted, no whitespace, ASCII only), so the
  same license always has the same bytes and any alteration breaks the signature;
- the **signature** is Ed25519 over ``DOMAIN + payload`` (the domain prefix keeps a license
  signature from being valid for any other message signed with the same key);
- the **key id** (first 16 hex digits of sha256 of the raw public key) is inside the signed
  payload, so verifiers can hold several keys while keys rotate;
- the fingerprint travels inside the payload as raw little-endian bytes (base64) with its shape
  and dtype, plus a sha256 digest a verifier re-checks.

An ``.aglicense`` file is a small JSON text holding the base64 payload, signature and key id.
The license server stores and serves exactly these bytes (its protobuf message carries them
unchanged), so this module is the one place that defines what a valid license is. Revocation
lists come from the server; :func:`verify_license` takes the set of revoked ids.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import time
import uuid
from collections.abc import Container, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from activeguard.runtime.private_files import PrivateFileError, read_private, write_private

if TYPE_CHECKING:  # torch and numpy load only where a fingerprint becomes a tensor: reading a license needs neither
    import torch

    from activeguard.credentials.fo_space import FO

LICENSE_FORMAT = "activeguard-license/1"
DOMAIN = b"activeguard-license/1\x00"
FILE_SUFFIX = ".aglicense"
MAX_USER_LENGTH = 256
_DTYPES = {"float32": ("float32", 4)}  # fingerprint dtype -> (numpy dtype, bytes per value)


# ---------------------------------------------------------------------------------------------
# Errors: one class per refusal reason, each with a stable ``reason`` string for counters.


class LicenseError(Exception):
    """A license was refused; ``reason`` is a short stable label (for metrics and error bodies)."""

    reason = "invalid"


class MalformedLicense(LicenseError):
    reason = "malformed"


class TamperedLicense(LicenseError):
    reason = "bad_signature"


class UnknownKey(LicenseError):
    reason = "unknown_key"


class ExpiredLicense(LicenseError):
    reason = "expired"


class NotYetValid(LicenseError):
    reason = "not_yet_valid"


class WrongModel(LicenseError):
    reason = "wrong_model"


class RevokedLicense(LicenseError):
    reason = "revoked"


class KeyFileError(Exception):
    """A signing-key file is missing, unreadable, or readable by others."""


# ---------------------------------------------------------------------------------------------
# Keys


def key_id(public_key: Ed25519PublicKey) -> str:
    """Short, stable id of a public key: the first 16 hex digits of sha256(raw key)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_key_bytes(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_from_bytes(raw: bytes) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(bytes(raw))
    except ValueError as exc:
        raise KeyFileError(f"not a raw 32-byte Ed25519 public key: {exc}") from exc


def public_key_pem(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def public_key_from_pem(pem: str | bytes, source: str = "key") -> Ed25519PublicKey:
    """Parse a PEM public key and insist it is Ed25519; ``source`` names it in errors."""
    try:
        key = serialization.load_pem_public_key(pem.encode() if isinstance(pem, str) else pem)
    except ValueError as exc:
        raise KeyFileError(f"{source} is not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{source} holds a {type(key).__name__}, expected an Ed25519 public key")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    return public_key_from_pem(Path(path).read_bytes(), str(path))


def generate_signing_key(path: str | Path) -> Ed25519PrivateKey:
    """Create a new Ed25519 key in a fresh 0600 PEM (PKCS#8) file; refuses to overwrite."""
    path = Path(path)
    if path.exists():
        raise KeyFileError(f"{path} already exists; refusing to overwrite a signing key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    write_private(path, pem)
    return key


def load_signing_key(path: str | Path) -> Ed25519PrivateKey:
    """Load a PEM Ed25519 private key; refuses a file that group or others can read."""
    path = Path(path)
    try:
        pem = read_private(path, "signing key")
    except PrivateFileError as exc:
        raise KeyFileError(str(exc)) from None
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, expected an Ed25519 private key")
    return key


def load_or_create_signing_key(path: str | Path) -> tuple[Ed25519PrivateKey, bool]:
    """(key, created): load the key at ``path``, or create it there (0600) on first use."""
    path = Path(path)
    if path.exists():
        return load_signing_key(path), False
    try:
        return generate_signing_key(path), True
    except FileExistsError:  # another process created it between our check and open
        return load_signing_key(path), False


def export_public_key(signing_key: str | Path, out: str | Path) -> tuple[str, bool]:
    """Write the public half of ``signing_key`` (created 0600 if missing) to ``out``: (key id, created).

    The public PEM is what ``activeguard package --license-key/--gateway-key`` puts in a model's
    profile; it is not a secret, so it is written world-readable.
    """
    key, created = load_or_create_signing_key(signing_key)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(public_key_pem(key.public_key()))
    return key_id(key.public_key()), created


# ---------------------------------------------------------------------------------------------
# Payload


@dataclass(frozen=True)
class LicensePayload:
    """The signed content of a license."""

    license_id: str
    model_id: str
    user: str
    user_index: int  # user t·T + j (0-based) of the model's FO space; names the whole FO
    fo_class: int
    fo_confidence: float
    epsilon: float
    fingerprint: bytes  # raw little-endian values, C order
    fingerprint_shape: tuple[int, ...]
    fingerprint_dtype: str
    fingerprint_sha256: str
    encoding: str  # the wire encoding the fingerprint was checked in ("float32" or "uint8")
    issued_at: int  # unix seconds
    expires_at: int  # unix seconds
    key_id: str
    format: str = LICENSE_FORMAT

    def fingerprint_tensor(self) -> torch.Tensor:
        """The fingerprint as a (1, *shape) float tensor, exactly as signed."""
        import numpy as np
        import torch

        np_dtype, _ = _DTYPES[self.fingerprint_dtype]
        arr = np.frombuffer(self.fingerprint, dtype=np.dtype(np_dtype).newbyteorder("<"))
        return torch.from_numpy(arr.astype(np_dtype).reshape(self.fingerprint_shape).copy())[None]

    @property
    def fo(self) -> tuple[int, float]:
        return self.fo_class, self.fo_confidence

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "license_id": self.license_id,
            "model_id": self.model_id,
            "user": self.user,
            "user_index": self.user_index,
            "fo_class": self.fo_class,
            "fo_confidence": self.fo_confidence,
            "epsilon": self.epsilon,
            "fingerprint": base64.b64encode(self.fingerprint).decode("ascii"),
            "fingerprint_shape": list(self.fingerprint_shape),
            "fingerprint_dtype": self.fingerprint_dtype,
            "fingerprint_sha256": self.fingerprint_sha256,
            "encoding": self.encoding,
            "issued_at": self.issued_at,
            "expires_at": self.expires_at,
            "key_id": self.key_id,
        }

    def encode(self) -> bytes:
        """Canonical bytes: sorted keys, no whitespace, ASCII, floats in repr form."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")

    @classmethod
    def decode(cls, data: bytes) -> LicensePayload:
        try:
            doc = json.loads(bytes(data).decode("ascii"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise MalformedLicense(f"license payload is not canonical JSON: {exc}") from exc
        if not isinstance(doc, dict) or doc.get("format") != LICENSE_FORMAT:
            raise MalformedLicense(f"license payload is not of format {LICENSE_FORMAT}")
        try:
            payload = cls(
                format=doc["format"],
                license_id=_str(doc["license_id"]),
                model_id=_str(doc["model_id"]),
                user=_str(doc["user"]),
                user_index=_int(doc["user_index"]),
                fo_class=_int(doc["fo_class"]),
                fo_confidence=float(doc["fo_confidence"]),
                epsilon=float(doc["epsilon"]),
                fingerprint=base64.b64decode(_str(doc["fingerprint"]), validate=True),
                fingerprint_shape=tuple(_int(d) for d in doc["fingerprint_shape"]),
                fingerprint_dtype=_str(doc["fingerprint_dtype"]),
                fingerprint_sha256=_str(doc["fingerprint_sha256"]),
                encoding=_str(doc["encoding"]),
                issued_at=_int(doc["issued_at"]),
                expires_at=_int(doc["expires_at"]),
                key_id=_str(doc["key_id"]),
            )
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise MalformedLicense(f"license payload field missing or of the wrong type: {exc}") from exc
        if payload.encode() != bytes(data):
            raise MalformedLicense("license payload is not in canonical form")
        if payload.fingerprint_dtype not in _DTYPES:
            raise MalformedLicense(f"unsupported fingerprint dtype {payload.fingerprint_dtype!r}")
        expected = math.prod(payload.fingerprint_shape) * _DTYPES[payload.fingerprint_dtype][1]
        if len(payload.fingerprint) != expected:
            raise MalformedLicense(
                f"fingerprint has {len(payload.fingerprint)} bytes, shape {payload.fingerprint_shape} needs {expected}"
            )
        return payload


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError(f"expected a string, got {type(v).__name__}")
    return v


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"expected an integer, got {type(v).__name__}")
    return v


def fingerprint_bytes(x: torch.Tensor) -> tuple[bytes, tuple[int, ...], str, str]:
    """(raw bytes, row shape, dtype, sha256) of a batch of exactly one fingerprint, shaped (1, *input_shape)."""
    if x.ndim < 2 or x.shape[0] != 1:
        raise ValueError(f"expected one fingerprint as a batch of one, shaped (1, *input_shape); got {tuple(x.shape)}")
    import numpy as np
    import torch

    t = x.detach().cpu()[0]
    arr = np.ascontiguousarray(t.to(torch.float32).numpy().astype("<f4"))
    raw = arr.tobytes()
    return raw, tuple(int(d) for d in arr.shape), "float32", hashlib.sha256(raw).hexdigest()


def new_license_id() -> str:
    return uuid.uuid4().hex


def make_payload(
    *,
    model_id: str,
    user: str,
    user_index: int,
    fo: FO,
    epsilon: float,
    fingerprint: torch.Tensor,  # shaped (1, *input_shape): a batch of one
    key: Ed25519PrivateKey | Ed25519PublicKey,
    validity_seconds: int,
    encoding: str = "float32",
    license_id: str | None = None,
    now: float | None = None,
) -> LicensePayload:
    if not user or len(user) > MAX_USER_LENGTH:
        raise ValueError(f"user name must have 1..{MAX_USER_LENGTH} characters")
    if validity_seconds <= 0:
        raise ValueError(f"validity must be positive, got {validity_seconds} s")
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw, shape, dtype, digest = fingerprint_bytes(fingerprint)
    issued = int(time.time() if now is None else now)
    return LicensePayload(
        license_id=license_id or new_license_id(),
        model_id=model_id,
        user=user,
        user_index=int(user_index),
        fo_class=int(fo.target),
        fo_confidence=float(fo.confidence),
        epsilon=float(epsilon),
        fingerprint=raw,
        fingerprint_shape=shape,
        fingerprint_dtype=dtype,
        fingerprint_sha256=digest,
        encoding=encoding,
        issued_at=issued,
        expires_at=issued + int(validity_seconds),
        key_id=key_id(pub),
    )


# ---------------------------------------------------------------------------------------------
# Signed licenses


@dataclass(frozen=True)
class SignedLicense:
    payload: bytes
    signature: bytes
    key_id: str

    def parsed(self) -> LicensePayload:
        """The payload, decoded but NOT verified: use :func:`verify_license` before trusting it."""
        return LicensePayload.decode(self.payload)

    def to_text(self) -> str:
        doc = {
            "format": LICENSE_FORMAT,
            "key_id": self.key_id,
            "payload": base64.b64encode(self.payload).decode("ascii"),
            "signature": base64.b64encode(self.signature).decode("ascii"),
        }
        return json.dumps(doc, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_text(cls, text: str | bytes) -> SignedLicense:
        try:
            doc = json.loads(text)
            if not isinstance(doc, dict) or doc.get("format") != LICENSE_FORMAT:
                raise ValueError(f"not an {LICENSE_FORMAT} document")
            return cls(
                payload=base64.b64decode(doc["payload"], validate=True),
                signature=base64.b64decode(doc["signature"], validate=True),
                key_id=_str(doc["key_id"]),
            )
        except (KeyError, TypeError, ValueError, binascii.Error, RecursionError) as exc:
            raise MalformedLicense(f"not a readable {FILE_SUFFIX} license: {exc}") from exc


def sign_license(payload: LicensePayload, key: Ed25519PrivateKey) -> SignedLicense:
    if payload.key_id != key_id(key.public_key()):
        raise ValueError("payload names a different key id than the signing key")
    data = payload.encode()
    return SignedLicense(payload=data, signature=key.sign(DOMAIN + data), key_id=payload.key_id)


def verify_license(
    lic: SignedLicense,
    keys: Mapping[str, Ed25519PublicKey] | Ed25519PublicKey,
    *,
    model_id: str | None = None,
    revoked: Container[str] = (),
    now: float | None = None,
    leeway: int = 60,
) -> LicensePayload:
    """Check signature, key, fingerprint digest, validity window, model id and revocation.

    Returns the verified payload or raises the :class:`LicenseError` subclass that says why.
    The fingerprint itself must still be run through the served model by the caller.
    """
    return admit_payload(signed_payload(lic, keys), model_id=model_id, revoked=revoked, now=now, leeway=leeway)


def signed_payload(lic: SignedLicense, keys: Mapping[str, Ed25519PublicKey] | Ed25519PublicKey) -> LicensePayload:
    """The payload of a license one of ``keys`` signed (signature, key id, fingerprint digest), whatever
    its validity window; the time-dependent checks are :func:`admit_payload`'s. Split so a verifier
    can remember a signature it checked and still check expiry and revocation on every use."""
    if isinstance(keys, Ed25519PublicKey):
        keys = {key_id(keys): keys}
    public = keys.get(lic.key_id)
    if public is None:
        raise UnknownKey(f"license is signed with key {lic.key_id!r}, which this verifier does not hold")
    try:
        public.verify(lic.signature, DOMAIN + lic.payload)
    except InvalidSignature:
        raise TamperedLicense("license signature does not match its content (altered or forged)") from None
    payload = LicensePayload.decode(lic.payload)
    if payload.key_id != lic.key_id:
        raise TamperedLicense("license key id outside the signature differs from the signed one")
    if hashlib.sha256(payload.fingerprint).hexdigest() != payload.fingerprint_sha256:
        raise TamperedLicense("fingerprint digest does not match the fingerprint")
    return payload


def admit_payload(
    payload: LicensePayload,
    *,
    model_id: str | None = None,
    revoked: Container[str] = (),
    now: float | None = None,
    leeway: int = 60,
) -> LicensePayload:
    """The checks after the signature: validity window, model id, revocation."""
    t = time.time() if now is None else now
    if t >= payload.expires_at:
        raise ExpiredLicense(f"license {payload.license_id} expired at {payload.expires_at} (unix time)")
    if t + leeway < payload.issued_at:
        raise NotYetValid(f"license {payload.license_id} is issued in the future ({payload.issued_at})")
    if model_id is not None and payload.model_id != model_id:
        raise WrongModel(f"license is for model {payload.model_id[:16]}…, not {model_id[:16]}…")
    if payload.license_id in revoked:
        raise RevokedLicense(f"license {payload.license_id} has been revoked")
    return payload


def write_license(lic: SignedLicense, path: str | Path) -> Path:
    """Write an ``.aglicense`` file (0600: a license is a bearer credential)."""
    path = Path(path)
    if path.exists():
        path.unlink()
    write_private(path, lic.to_text().encode("ascii"))
    return path


def read_license(path: str | Path) -> SignedLicense:
    return SignedLicense.from_text(Path(path).read_text(encoding="ascii", errors="replace"))
