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
import hashlib
import io
import json
import logging
import math
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
from activeguard.inputs import InputSpec, SpecOverrides, log_probabilities
from activeguard.recent import Recent
from activeguard.sources import SOURCES, SourceOptions

logger = logging.getLogger(__name__)

PROFILE_FORMAT = "activeguard-profile/1"
MAX_LICENSE_BYTES = 1024 * 1024
CACHE_ENTRIES = 4096  # verified licenses, session tokens and passed fingerprints a worker remembers
PROFILE_FILE = "activeguard-profile.json"
MODEL_CODE_FILE = "model.py"  # the eager convention's network code inside an archive (--model-file)

# Outcome reasons: also the label values of the handler's metrics and the keys of the gateway's
# reason → gRPC code table (gateway/errors.py), which a test keeps complete.
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
    BAD_SESSION,
    EXPIRED_SESSION,
)

# The body key under which a gateway-attested request gets the decision explained.
EXPLANATION = "activeguard"

_LICENSE_REASONS = {
    licenses.ExpiredLicense: EXPIRED,
    licenses.NotYetValid: EXPIRED,
    licenses.RevokedLicense: REVOKED,
    licenses.WrongModel: WRONG_MODEL,
    licenses.MalformedLicense: MALFORMED_LICENSE,
}


@dataclass(frozen=True)
class Profile:
    """What the archive tells the handler about protecting its model.

    ``source``, ``input_spec`` and ``model_class`` say how to load the archived model exactly as it
    was packaged (:mod:`activeguard.sources`); a profile written before they existed means a
    project checkpoint whose input is ``input_shape`` in [0, 1].
    """

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
    source: str = "checkpoint"
    input_spec: dict[str, Any] | None = None  # InputSpec.to_dict()
    model_class: str | None = None  # the network class in MODEL_CODE_FILE (eager convention only)
    # The owner's own handler (a manifest ``handler`` entry: "their_handler.py" or a stock name such
    # as "base_handler"), composed with ActiveGuard; None: ActiveGuard's JSON/.npy tensor handler.
    owner_handler: str | None = None
    # the ranked FO space's runner-up grid (activeguard.fo_space); empty: the paper's (t, c) space
    runner_up_confidences: tuple[float, ...] = ()

    def validated(self) -> Profile:
        """This profile, once its control settings (K, C_fp, ε, policy) and input spec are known to be usable."""
        _ = self.control  # building the ControlConfig raises ValueError on bad settings
        if self.paper_mode and self.runner_up_confidences:
            raise ValueError("paper mode keeps the paper's FO space: a bare output is the credential")
        if self.source not in SOURCES:
            raise ValueError(f"profile source must be one of {', '.join(SOURCES)}, got {self.source!r}")
        if self.spec.shape != tuple(self.input_shape):  # SourceError is a ValueError too
            raise ValueError(
                f"profile input_shape {tuple(self.input_shape)} differs from its input spec's {self.spec.shape}"
            )
        return self

    @property
    def spec(self) -> InputSpec:
        return (
            InputSpec.from_dict(self.input_spec) if self.input_spec is not None else InputSpec(tuple(self.input_shape))
        )

    def source_options(self, model_dir: Path, model_file: str | None = None) -> SourceOptions:
        """How to load the archived model as packaged: its own input spec, and its code for the eager
        convention (``model_file``: the manifest's modelFile, when the owner's archive names one)."""
        eager = self.source == "eager"
        return SourceOptions(
            model_dir / (model_file or MODEL_CODE_FILE) if eager else None,
            self.model_class,
            SpecOverrides.pinned(self.spec),
        )

    @property
    def control(self) -> ControlConfig:
        return ControlConfig(
            self.num_classes, self.confidences, self.epsilon, self.policy, tuple(self.runner_up_confidences)
        )

    def to_json(self) -> str:
        doc = dict(
            self.__dict__,
            format=PROFILE_FORMAT,
            input_shape=list(self.input_shape),
            confidences=list(self.confidences),
            runner_up_confidences=list(self.runner_up_confidences),
        )
        return json.dumps(doc, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Profile:
        doc = json.loads(text)
        if doc.pop("format", None) != PROFILE_FORMAT:
            raise ValueError(f"not an {PROFILE_FORMAT} document")
        doc["input_shape"] = tuple(doc["input_shape"])
        doc["confidences"] = tuple(doc["confidences"])
        doc["runner_up_confidences"] = tuple(doc.get("runner_up_confidences", ()))
        return cls(**doc).validated()


@dataclass
class Request:
    """One client request as the transport delivered it (HTTP or gRPC, already de-framed).

    Every field is untrusted: any type may arrive here, and :meth:`Guard.handle` must cope.
    """

    body: Any  # bytes/bytearray/str, or a dict when the transport already decoded JSON
    license: Any = None  # str | bytes from a header or the gRPC input map
    session: Any = None  # a gateway session token (purpose "session")
    explain: Any = None  # a gateway token (purpose "explain"): say why, do not admit


@dataclass
class Outcome:
    status: int
    reason: str
    body: dict[str, Any]
    user: str | None = None


class InputError(ValueError):
    pass


def _text(value: Any) -> str:
    """A credential field as text; anything that is not text or bytes is a malformed credential."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, str):
        return value
    raise InputError(f"credential must be a string, got {type(value).__name__}")


def _session_token(value: Any) -> str:
    try:
        return _text(value).removeprefix("Bearer ").strip()
    except InputError as exc:
        raise sessions.SessionError(str(exc)) from None


def _present(value: Any) -> bool:
    """A credential field counts as sent when the client put anything there, even null or empty."""
    return value is not None


def encode_license_header(license_text: str) -> str:
    """The compact header form: base64(zlib(.aglicense text)); fits TorchServe's 8 KB header limit."""
    return base64.b64encode(zlib.compress(license_text.encode("utf-8"), 9)).decode("ascii")


def decode_license_header(raw: str | bytes) -> str:
    """Accept the .aglicense text itself, its base64, or the compact zlib form."""
    try:
        text = _text(raw).strip()
    except InputError as exc:
        raise licenses.MalformedLicense(str(exc)) from None
    if len(text) > 2 * MAX_LICENSE_BYTES:
        raise licenses.MalformedLicense("license too large")
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

    def __init__(self, model: nn.Module | None, profile: Profile, device: torch.device | str | None = None):
        """``device`` is where the model runs (TorchServe's ``gpu_id``); requests are parsed on the
        CPU and moved there in one batch. Default: wherever the model's parameters already are.
        ``model`` None: every decision goes through a front end that runs its own model (an owner's handler)."""
        self.device = torch.device(device) if device is not None else _model_device(model)
        self.model = model.to(self.device).eval() if model is not None else None
        self.profile = profile
        self.config = profile.control
        self.license_keys = {
            kid: licenses.public_key_from_pem(pem, f"license key {kid}")
            for kid, pem in profile.license_public_keys.items()
        }
        self.gateway_key = (
            licenses.public_key_from_pem(profile.gateway_public_key, "gateway key")
            if profile.gateway_public_key
            else None
        )
        self._revoked: frozenset[str] = frozenset()
        self._revocation_mtime: float | None = None
        self._generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
        self._warned_fo_space = False  # a license of another FO space is logged once, not per request
        self.front = FrontEnd(self)
        # What a worker remembers between batches (bounded; successes only, so a bad credential is
        # checked in full every time). Signatures: a license text or session token verified once.
        # Fingerprints: the served model is fixed for the worker's life, so a license whose
        # fingerprint decoded to its user once will again; its next requests skip the extra row.
        # Expiry, model and revocation are still checked on every request.
        self._signed_licenses: Recent[bytes, licenses.LicensePayload] = Recent(CACHE_ENTRIES)
        self._signed_tokens: Recent[str, sessions.SessionClaims] = Recent(CACHE_ENTRIES)
        self._passed_fingerprints: Recent[tuple[str, str], int] = Recent(CACHE_ENTRIES)

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
        if isinstance(body, str):
            body = body.encode("utf-8", errors="replace")
        if isinstance(body, (bytes, bytearray)):
            body = bytes(body)
            if len(body) > self.profile.max_body_bytes:
                raise InputError(f"body of {len(body)} bytes exceeds the limit of {self.profile.max_body_bytes}")
            if len(body) == 0:
                raise InputError('empty body: send JSON {"inputs": [...]} or .npy bytes')
            if body[:6] == b"\x93NUMPY":
                return self._npy(body), {}
            body = _json(body)
        if not isinstance(body, dict) or "inputs" not in body:
            raise InputError('JSON body must be an object with an "inputs" field')
        return self._as_tensor(body["inputs"]), {k: body[k] for k in ("fingerprint", "license") if k in body}

    def _npy(self, body: bytes) -> torch.Tensor:
        """Read an .npy body after checking its header: dtype, shape and byte count come first, so
        a 200-byte header that declares 10^13 elements allocates nothing."""
        stream = io.BytesIO(body)
        try:
            version = np.lib.format.read_magic(stream)
            read_header = {
                (1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0,
            }.get(version)
            if read_header is None:
                raise InputError(f".npy format version {version} is not supported; use 1.0 or 2.0")
            shape, fortran_order, dtype = read_header(stream)
        except InputError:
            raise
        except Exception as exc:  # numpy raises ValueError, SyntaxError, ... on a bad header
            raise InputError(f"unreadable .npy header: {exc}") from None
        if dtype.kind not in "fiu" or dtype.hasobject:
            raise InputError(f".npy dtype {dtype} is not numeric; send float32")
        self._check_shape(tuple(shape))
        count = math.prod(shape)
        data = body[stream.tell() :]
        if len(data) != count * dtype.itemsize:
            raise InputError(f".npy data has {len(data)} bytes; its header declares {count * dtype.itemsize}")
        array = np.frombuffer(data, dtype=dtype, count=count).astype(np.float32)  # a writable copy
        array = array.reshape(shape[::-1]).T if fortran_order else array.reshape(shape)
        return self._as_tensor(array)

    def _check_shape(self, shape: tuple[int, ...]) -> None:
        want = self.profile.input_shape
        if shape == want:
            return
        if len(shape) != len(want) + 1 or shape[1:] != want:
            raise InputError(f"inputs must have shape (N, {', '.join(map(str, want))}), got {shape}")
        if not 1 <= shape[0] <= self.profile.max_rows:
            raise InputError(f"between 1 and {self.profile.max_rows} rows per request, got {shape[0]}")

    def _as_tensor(self, data: Any) -> torch.Tensor:
        if _depth(data) > len(self.profile.input_shape) + 1:
            raise InputError(f"inputs must be nested {len(self.profile.input_shape) + 1} levels deep at most")
        try:
            array = np.asarray(data, dtype=np.float32)
        except (TypeError, ValueError, OverflowError):
            raise InputError("inputs must be a nested list of numbers") from None
        self._check_shape(array.shape)
        if array.shape == self.profile.input_shape:
            array = array[None]
        if not np.isfinite(array).all():
            raise InputError("inputs contain NaN or inf")
        return torch.from_numpy(np.ascontiguousarray(array))

    def _license(self, raw: Any, revoked: frozenset[str]) -> licenses.LicensePayload:
        """The verified payload of a license; the signature is checked once per license text (its
        digest is remembered), validity, model and revocation on every request."""
        digest = _digest(raw)
        payload = self._signed_licenses.get(digest)
        if payload is None:
            signed = licenses.SignedLicense.from_text(decode_license_header(raw))
            payload = licenses.signed_payload(signed, self.license_keys)
            if math.prod(payload.fingerprint_shape) != math.prod(self.profile.input_shape):
                raise licenses.MalformedLicense("license fingerprint does not fit this model's input shape")
            self._signed_licenses.put(digest, payload)
        return licenses.admit_payload(payload, model_id=self.profile.model_id, revoked=revoked)

    def _fingerprint(self, payload: licenses.LicensePayload) -> torch.Tensor:
        return payload.fingerprint_tensor().reshape(1, *self.profile.input_shape)

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

    # -- the decision ----------------------------------------------------------------------
    def handle(self, requests: list[Request]) -> list[Outcome]:
        """One JSON outcome per request, in order (the tensor front end: bodies are JSON or .npy)."""
        return [self.render(verdict) for verdict in self.decide(requests)]

    def decide(self, requests: list[Request], front: FrontEnd | None = None) -> list[Verdict]:
        """One verdict per request, in order. Nothing a request carries can make this raise or
        change another request's verdict: each request is read inside its own error boundary.

        ``front`` turns request bodies into model input and runs the model; by default the
        guard's own (JSON/.npy tensors in the input spec, the model is a :class:`ClientView`).
        """
        front = front or self.front
        batch = _Batch(self.revoked())  # one look at the revocation file per batch
        read = front.read_all(requests)
        for i, request in enumerate(requests):
            try:
                self._admit_request(i, request, read[i], batch, front)
            except Exception:  # a bug, not the client's fault: only this request pays for it
                logger.exception("request %d of a batch could not be read", i)
                batch.inputs.pop(i, None)
                batch.checks.pop(i, None)
                batch.verdicts[i] = Verdict(500, INTERNAL_ERROR, message="internal error", explain=batch.explain.get(i))
        outputs = self._forward(batch, front)
        for i in [*batch.inputs, *batch.auth_only]:
            try:
                batch.verdicts[i] = self._decide(i, outputs, batch, front)
            except Exception:
                logger.exception("request %d of a batch could not be decided", i)
                batch.verdicts[i] = Verdict(500, INTERNAL_ERROR, message="internal error", explain=batch.explain.get(i))
        for i, verdict in batch.verdicts.items():
            if not verdict.admitted:
                logger.info("refused request %d: %s", i, verdict.reason)
        return [batch.verdicts[i] for i in range(len(requests))]

    def _admit_request(self, i: int, request: Request, read: Read, batch: _Batch, front: FrontEnd) -> None:
        """Check one request's credentials, given what its body read as; the result lands in ``batch``."""
        session = self._gateway_claims(request.session)
        explain = self._gateway_claims(request.explain)
        attested = next((c for c in (explain, session) if isinstance(c, sessions.SessionClaims)), None)
        if attested is not None:
            batch.explain[i] = attested
        if isinstance(read, Exception):
            if not isinstance(read, InputError):
                raise read  # a bug while reading: this request's internal error
            batch.verdicts[i] = Verdict(400, MALFORMED_INPUT, message=str(read), explain=attested)
            return
        x, extras = read
        if x is None:  # a credential check alone (the gateway's Authenticate for an opaque-payload model)
            if not isinstance(explain, sessions.SessionClaims):
                batch.verdicts[i] = Verdict(
                    403, BAD_SIGNATURE, message="a request without input must carry the gateway's explain token"
                )
                return
            batch.auth_only.add(i)
        else:
            batch.inputs[i] = x
        license_raw = request.license if _present(request.license) else extras.get("license")
        try:
            if session is not None:  # a session was sent and a gateway key is trusted
                if isinstance(session, sessions.SessionError):
                    raise session
                batch.sessions[i] = sessions.admit_claims(
                    session, model_id=self.profile.model_id, revoked=batch.revoked
                )
            elif _present(request.license) or "license" in extras:
                payload = self._license(license_raw, batch.revoked)
                passed = self._passed_fingerprints.get(_fingerprint_key(payload))
                if passed is not None:  # this license's fingerprint already authenticated on this model
                    batch.passed[i] = (payload.user, passed)
                    return
                if not self._same_fo(payload):
                    batch.denied[i] = FO_MISMATCH
                    return
                batch.checks[i] = (
                    front.fingerprint_input(self._fingerprint(payload)),
                    payload.user_index,
                    payload.user,
                )
                batch.fingerprint_keys[i] = _fingerprint_key(payload)
            elif "fingerprint" in extras and self.profile.paper_mode:
                batch.checks[i] = (self._as_tensor(extras["fingerprint"])[:1], None, None)
            else:
                batch.denied[i] = NO_CREDENTIALS if request.session is None else BAD_SIGNATURE
        except sessions.SessionError as exc:
            batch.denied[i] = exc.reason
        except licenses.LicenseError as exc:
            batch.denied[i] = _LICENSE_REASONS.get(type(exc), BAD_SIGNATURE)
        except InputError:
            batch.denied[i] = MALFORMED_LICENSE

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

    def _forward(self, batch: _Batch, front: FrontEnd) -> dict[tuple[str, int], tuple[Any, torch.Tensor]]:
        """One pass over every input and every fingerprint: (raw output rows, probabilities) keyed by
        (kind, request).

        If the batched pass fails, each request runs alone, so one request that breaks the model
        fails only itself (its key is then missing, and its decision becomes an internal error).
        """
        parts = [("in", i, x) for i, x in batch.inputs.items()] + [("fp", i, c[0]) for i, c in batch.checks.items()]
        if not parts:
            return {}
        try:
            return self._run_model(parts, front)
        except Exception:
            logger.exception("batched forward pass failed; running each request alone")
        result: dict[tuple[str, int], tuple[Any, torch.Tensor]] = {}
        for i in {p[1] for p in parts}:
            try:
                result.update(self._run_model([p for p in parts if p[1] == i], front))
            except Exception:
                logger.exception("forward pass failed for request %d", i)
        return result

    def _run_model(self, parts: list[tuple[str, int, torch.Tensor]], front: FrontEnd) -> dict:
        device = front.device
        with torch.no_grad():
            batch = torch.cat([p[2].to(device, non_blocking=True) for p in parts])
            raw = front.forward(batch)
            probs = torch.softmax(front.logits(raw).float(), dim=1).cpu()
        if len(probs) != len(batch):
            raise RuntimeError(f"the model answered {len(probs)} rows for {len(batch)} inputs")
        result, start = {}, 0
        for kind, i, x in parts:
            result[(kind, i)] = (raw[start : start + len(x)], probs[start : start + len(x)])
            start += len(x)
        return result

    def _decide(self, i: int, outputs: dict, batch: _Batch, front: FrontEnd) -> Verdict:
        explain = batch.explain.get(i)
        raw = outputs[("in", i)][0] if i in batch.inputs else None
        if i in batch.sessions:
            claims = batch.sessions[i]
            return Verdict(
                200, SESSION_AUTHORIZED, raw, user=claims.user, user_index=claims.user_index, explain=explain
            )
        if i in batch.passed:
            user, index = batch.passed[i]
            return Verdict(200, AUTHORIZED, raw, user=user, user_index=index, explain=explain)
        if i in batch.checks:
            _, licensed_index, user = batch.checks[i]
            decision = decide(outputs[("fp", i)][1], self.config)
            if decision.authorized[0] and (licensed_index is None or int(decision.user[0]) == licensed_index):
                index = int(decision.user[0])
                if licensed_index is not None:
                    self._passed_fingerprints.put(batch.fingerprint_keys[i], index)
                reason = AUTHORIZED if licensed_index is not None else PAPER_AUTHORIZED
                return Verdict(200, reason, raw, user=user or f"user-{index}", user_index=index, explain=explain)
            batch.denied[i] = FO_MISMATCH
        return self._refuse(raw, batch.denied[i], explain, front)

    def _refuse(self, raw: Any, reason: str, explain: Any, front: FrontEnd) -> Verdict:
        """Under ``random`` the answer is silent: the same layout as an admitted one, random values.
        Only a gateway-attested request (which nobody else can sign) is told the reason."""
        if self.config.policy == "reject" or raw is None:
            return Verdict(403, reason, message=f"unauthorized: {reason.replace('_', ' ')}", explain=explain)
        fake = random_outputs(len(raw), self.config.num_classes, self._generator)
        return Verdict(200, reason, front.fake(fake, like=raw), explain=explain)

    def render(self, verdict: Verdict) -> Outcome:
        """The tensor front end's JSON answer: probabilities, or an error; the explanation where attested."""
        if verdict.status != 200:
            body: dict[str, Any] = {"error": verdict.message, "reason": verdict.reason}
        else:
            outputs = verdict.outputs
            body = {} if outputs is None else {"outputs": torch.softmax(self.front.logits(outputs).float(), 1).tolist()}
        if verdict.explain is not None:
            body[EXPLANATION] = verdict.explanation()
        return Outcome(verdict.status, verdict.reason, body, user=verdict.user if verdict.admitted else None)


@dataclass
class Verdict:
    """One request's decision, before a front end renders it: the rows to answer with (the model's
    own for an admitted request, random ones for a refused one under ``random``) or an error."""

    status: int
    reason: str
    outputs: Any = None  # rows in the model's own output form; None for errors and credential checks
    message: str | None = None  # the error's text when status != 200
    user: str | None = None
    user_index: int | None = None
    explain: sessions.SessionClaims | None = None  # set only for gateway-attested requests

    @property
    def admitted(self) -> bool:
        return self.reason in ADMITTED_REASONS

    def explanation(self) -> dict[str, Any]:
        """What a gateway-attested request is told about its decision."""
        if self.admitted:
            return {"authorized": True, "reason": self.reason, "user": self.user, "user_index": self.user_index}
        return {"authorized": False, "reason": self.reason}


Read = tuple[torch.Tensor | None, dict[str, Any]] | Exception  # a request's input and extras, or why not


class FrontEnd:
    """How a deployment turns request bodies into model input and runs the model.

    The guard's own front end (this class) reads JSON/.npy tensors in the input spec and runs a
    :class:`~activeguard.inputs.ClientView`; the TorchServe handler composes an owner's handler
    through a subclass (its preprocess and inference). Every method may raise: the guard contains it.
    """

    def __init__(self, guard: Guard):
        self.guard = guard

    @property
    def device(self) -> torch.device:
        return self.guard.device

    def read(self, request: Request) -> tuple[torch.Tensor | None, dict[str, Any]]:
        """(model input rows, extras) of one request; None rows: a credential check alone.
        InputError: the client's input is unusable (a 400)."""
        return self.guard.parse_inputs(request.body)

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
        return self.guard.model(batch)

    def logits(self, raw: Any) -> torch.Tensor:
        """The model's raw answer as logits (the control layer decides on softmax of these)."""
        return raw

    def fake(self, probabilities: torch.Tensor, like: Any) -> Any:
        """Random rows in the model's own output form, for a refused request under ``random``."""
        return log_probabilities(probabilities)


@dataclass
class _Batch:
    """What :meth:`Guard.handle` learns about each request of one batch, keyed by position."""

    revoked: frozenset[str]
    verdicts: dict[int, Verdict] = field(default_factory=dict)
    inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    auth_only: set[int] = field(default_factory=set)
    checks: dict[int, tuple[torch.Tensor, int | None, str | None]] = field(default_factory=dict)
    sessions: dict[int, sessions.SessionClaims] = field(default_factory=dict)
    passed: dict[int, tuple[str, int]] = field(default_factory=dict)  # licenses whose fingerprint passed before
    fingerprint_keys: dict[int, tuple[str, str]] = field(default_factory=dict)
    denied: dict[int, str] = field(default_factory=dict)
    explain: dict[int, sessions.SessionClaims] = field(default_factory=dict)


def _digest(raw: Any) -> bytes:
    """A key for a credential as sent (text or bytes; anything else is not a credential)."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", errors="surrogatepass")
    if not isinstance(raw, (bytes, bytearray)):
        raise InputError(f"credential must be a string, got {type(raw).__name__}")
    return hashlib.sha256(raw).digest()


def _fingerprint_key(payload: licenses.LicensePayload) -> tuple[str, str]:
    return (payload.license_id, payload.fingerprint_sha256)


def _model_device(model: nn.Module | None) -> torch.device:
    first = next(iter(model.parameters()), None) if model is not None else None
    return first.device if first is not None else torch.device("cpu")


def _json(body: bytes) -> Any:
    """Parse a JSON body; absurd nesting ends in RecursionError inside the C parser, not a crash."""
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise InputError("body is neither JSON nor .npy bytes") from None
    except RecursionError:
        raise InputError("JSON body is nested too deeply") from None


def _depth(data: Any, limit: int = 16) -> int:
    """Nesting depth of lists along the first element (enough to stop absurd ranks early)."""
    depth = 0
    while isinstance(data, (list, tuple)) and depth <= limit:
        depth += 1
        data = data[0] if data else None
    return depth
