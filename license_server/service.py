"""The gRPC license service: allocation, fingerprint generation, signing, storage, revocation.

Issuance, step by step (DESIGN §3 "License"):

1. pick a free slot (model, class, confidence) that neither the store nor an in-flight call of
   this process holds (pre-generated slots first);
2. get its fingerprint on the generation worker (never on a gRPC thread): the pre-generated one,
   or a fresh C&W example from :func:`activeguard.fingerprints.generate_fingerprints`;
3. re-check the exact bytes that will be signed through the registered model (checked against its
   model id when loaded) with the core control layer: it must authenticate as this slot's user;
4. sign the canonical payload with the server's Ed25519 key;
5. insert the whole license in one transaction; ``UNIQUE (model, class, confidence)`` refuses a
   slot another process took meanwhile, and the call then retries with another slot.

Nothing is written before step 5, so a crash leaves no slot taken without a license.
"""

from __future__ import annotations

import concurrent.futures
import errno
import json
import logging
import random
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NoReturn

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from activeguard import licenses as lic
from activeguard.control import PAPER_CONFIDENCES, PAPER_EPSILON, ControlConfig
from activeguard.fingerprints import ENCODINGS, authenticate, encode, generate_fingerprints
from activeguard.models import CHECKPOINT_FORMAT, build_model, load_checkpoint
from activeguard.models import input_shape as model_input_shape
from activeguard.models import model_id as compute_model_id
from activeguard_proto.v1 import common_pb2, license_pb2, license_pb2_grpc
from license_server.auth import TOKEN_ENV, AdminAuth, create_admin_token, hash_token, load_token_hash, write_secret
from license_server.store import AlreadyExists, ModelRow, SlotTaken, Store, StoreError, redact_url

log = logging.getLogger("activeguard.license_server")

SERVICE_NAME = "activeguard.v1.LicenseService"
DEFAULT_VALIDITY = 365 * 24 * 3600
MAX_VALIDITY = 20 * 365 * 24 * 3600
MAX_NAME = 256
MAX_ID = 128  # model ids are 64 hex digits, license ids 32; longer can only be garbage
MAX_REASON = 1024
MAX_PATH = 4096
MAX_SEQUENCE = 2**63 - 1  # sequence numbers (page tokens, revocation cursors) are signed 64-bit in every store
CLASSIFIERS = ("lenet5", "mlp-classifier")  # licenses identify users by a classifier's top-1 output
STATE_NAMES = {
    license_pb2.LICENSE_STATE_ACTIVE: "active",
    license_pb2.LICENSE_STATE_REVOKED: "revoked",
    license_pb2.LICENSE_STATE_EXPIRED: "expired",
}
ADMIN_METHODS = {"RegisterModel", "IssueLicense", "GetLicense", "ListLicenses", "RevokeLicense"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line; fields come from ``extra={"fields": {...}}``. Never pass secrets."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info).splitlines()[-1]
        return json.dumps(doc, default=str)


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("activeguard")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def _log(level: int, msg: str, **fields: Any) -> None:
    log.log(level, msg, extra={"fields": fields})


@dataclass
class ServerConfig:
    data_dir: Path
    database_url: str = ""  # default: sqlite file in data_dir
    host: str = "127.0.0.1"
    port: int = 50061  # 0: any free port
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = 9461  # None: no metrics endpoint; 0: any free port
    signing_key: Path | None = None  # default: data_dir/signing_key.pem
    admin_token_hash_file: Path | None = None  # default: data_dir/admin_token.sha256
    default_validity: int = DEFAULT_VALIDITY
    max_workers: int = 16
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # mTLS: require client certificates signed by this CA
    generation_timeout: float = 300.0
    max_steps: int = 1000

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.data_dir / 'licenses.db').resolve()}"
        self.signing_key = Path(self.signing_key or self.data_dir / "signing_key.pem")
        self.admin_token_hash_file = Path(self.admin_token_hash_file or self.data_dir / "admin_token.sha256")
        self._check_tls()

    def _check_tls(self) -> None:
        """Refuse half a TLS setup: a client CA without a certificate used to start a plaintext server."""
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("give both tls_cert and tls_key, or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca (mTLS) needs tls_cert and tls_key: client certificates are only "
                             "checked over TLS")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.issued = Counter("activeguard_licenses_issued_total", "Licenses issued", ["model"], registry=r)
        self.issue_failures = Counter(
            "activeguard_license_issue_failures_total", "IssueLicense calls refused or failed", ["code"], registry=r)
        self.issue_latency = Histogram(
            "activeguard_license_issue_seconds", "IssueLicense latency", ["path"], registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.generation = Histogram(
            "activeguard_fingerprint_generation_seconds", "Fingerprint generation (one batch)", registry=r,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.revocations = Counter("activeguard_license_revocations_total", "Licenses revoked", registry=r)
        self.store_errors = Counter("activeguard_store_errors_total", "Database errors", ["op"], registry=r)
        self.slot_conflicts = Counter(
            "activeguard_slot_conflicts_total", "Slots lost to a concurrent issuer (retried)", registry=r)
        self.auth_failures = Counter("activeguard_admin_auth_failures_total", "Admin calls refused", registry=r)
        self.free_slots = Gauge("activeguard_free_slots", "Unissued slots per model", ["model"], registry=r)


class GenerationFailed(Exception):
    pass


@dataclass
class LoadedModel:
    row: ModelRow
    module: torch.nn.Module
    config: ControlConfig
    all_slots: list[tuple[int, int]] = field(default_factory=list)

    def user_index(self, slot: tuple[int, int]) -> int:
        return slot[0] * len(self.config.confidences) + slot[1]


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


# -- request validation (pure: no store, no model; the fuzz tests drive these through the servicer) --

_DECIMAL = re.compile(r"0|[1-9][0-9]*")  # ASCII digits only, no sign, no leading zeros: str(int) of a seq


def _refuse(message: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> NoReturn:
    raise _Abort(code, message)


def shown(value: Any, limit: int = 80) -> str:
    """``repr`` of a client-supplied value, cut short: a refusal must never echo megabytes (gRPC caps
    status details at a few kB, and a longer message turns a clean refusal into a transport error)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def shown_message(message: str, limit: int = 1000) -> str:
    """A refusal message cut to ``limit`` characters (status details travel in a size-capped header)."""
    return message if len(message) <= limit else message[: limit - 1] + "…"


def check_text(field: str, value: str, *, limit: int, required: bool = False) -> None:
    """Client text the server stores, matches or echoes: bounded, printable, not blank.

    Control characters (NUL above all) are refused here because PostgreSQL rejects them in TEXT
    columns; blank values because they can never name anything.
    """
    if not value:
        if required:
            _refuse(f"{field} must not be empty")
        return
    if len(value) > limit:
        _refuse(f"{field} is {len(value)} characters; at most {limit} are allowed")
    if not value.isprintable():
        _refuse(f"{field} must be printable (no control characters)")
    if not value.strip():
        _refuse(f"{field} must not be blank")


def check_reason(reason: str) -> None:
    """A revocation reason: free text that may span lines, but no other control characters."""
    if len(reason) > MAX_REASON:
        _refuse(f"reason is {len(reason)} characters; at most {MAX_REASON} are allowed")
    if not reason.replace("\n", " ").replace("\t", " ").isprintable():
        _refuse("reason must be printable (newlines and tabs are fine, other control characters are not)")


def check_validity(seconds: int, default: int) -> int:
    """The license lifetime in seconds; 0 means the server default."""
    if seconds < 0:
        _refuse(f"validity_seconds must be positive, got {seconds}")
    validity = seconds or default
    if validity > MAX_VALIDITY:
        _refuse(f"validity_seconds may be at most {MAX_VALIDITY} (20 years), got {validity}")
    return validity


def parse_page_token(token: str) -> int:
    """The sequence number after which a page starts; only tokens this server hands out are valid."""
    if not token:
        return 0
    if len(token) > len(str(MAX_SEQUENCE)) or not _DECIMAL.fullmatch(token) or int(token) > MAX_SEQUENCE:
        _refuse(f"page_token {shown(token)} is not one this server returned: pass next_page_token back "
                "unchanged, or leave it empty for the first page")
    return int(token)


def check_list_request(req: license_pb2.ListLicensesRequest) -> tuple[int, int, str]:
    """(page size, sequence to start after, state name or '') of a valid ListLicenses request."""
    if req.page_size > 1000:
        _refuse(f"page_size may be at most 1000, got {req.page_size}")
    if req.state != license_pb2.LICENSE_STATE_UNSPECIFIED and req.state not in STATE_NAMES:
        _refuse(f"state {req.state} is not a LicenseState (0 all, 1 active, 2 revoked, 3 expired)")
    check_text("model_id", req.model_id, limit=MAX_ID)
    check_text("user", req.user, limit=MAX_NAME)
    return req.page_size or 100, parse_page_token(req.page_token), STATE_NAMES.get(req.state, "")


def check_issue_request(req: license_pb2.IssueLicenseRequest, default_validity: int) -> int:
    """The validity in seconds of a valid IssueLicense request (the model is looked up afterwards)."""
    check_text("user", req.user, limit=MAX_NAME, required=True)
    validity = check_validity(req.validity_seconds, default_validity)
    check_text("model_id", req.model_id, limit=MAX_ID, required=True)
    return validity


def check_register_request(req: license_pb2.RegisterModelRequest) -> str:
    """The encoding of a RegisterModel request whose fields are well-formed (the checkpoint is read later)."""
    if bool(req.model_path) == bool(req.checkpoint):
        _refuse("give exactly one of model_path or checkpoint bytes")
    check_text("model_path", req.model_path, limit=MAX_PATH)
    check_text("name", req.name, limit=MAX_NAME)
    check_text("expected_model_id", req.expected_model_id, limit=MAX_ID)
    encoding = req.encoding or "float32"
    if encoding not in ENCODINGS:
        _refuse(f"encoding must be one of {ENCODINGS}, got {shown(encoding)}")
    return encoding


# -- checkpoints named in RegisterModel (every failure names the file and the problem) ---------------


def _read_checkpoint(path: Path, what: str) -> dict[str, Any]:
    """The checkpoint dict stored at ``path``, or a refusal saying why it is not one."""
    try:
        if path.is_dir():
            _refuse(f"{what} is a directory, not a model checkpoint file")
        if not path.exists():
            _refuse(f"{what} does not exist on the license server", grpc.StatusCode.NOT_FOUND)
        if not path.is_file():
            _refuse(f"{what} is not a regular file")
        if path.stat().st_size == 0:
            _refuse(f"{what} is empty (0 bytes), not a model checkpoint")
        return load_checkpoint(path)
    except PermissionError:
        _refuse(f"{what} cannot be read by the license server (permission denied)", grpc.StatusCode.FAILED_PRECONDITION)
    except OSError as exc:  # a name too long is the caller's; anything else is the server's file system
        code = grpc.StatusCode.INVALID_ARGUMENT if exc.errno == errno.ENAMETOOLONG else grpc.StatusCode.FAILED_PRECONDITION
        _refuse(f"{what} cannot be read ({exc.strerror or type(exc).__name__})", code)
    except ValueError as exc:
        if exc.__cause__ is not None:  # torch.load itself failed
            _refuse(f"{what} is not a model checkpoint: torch.load(weights_only=True) cannot read it "
                    f"({type(exc.__cause__).__name__}; a text file, a truncated copy or pickled objects?)")
        _refuse(f"{what} is not an ActiveGuard model checkpoint (a dict with format {CHECKPOINT_FORMAT!r}, "
                "as activeguard.models.save_model writes)")


def _weights_problem(expected: dict[str, torch.Tensor], state: dict[str, Any]) -> str:
    """What keeps ``state`` from loading into a model whose tensors are ``expected`` ('' if nothing)."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state)
                   if not isinstance(state[k], torch.Tensor) or tuple(state[k].shape) != tuple(expected[k].shape))
    parts = [f"{label}: {', '.join(keys[:4])}{' …' if len(keys) > 4 else ''}"
             for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
    if not parts and not all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point()):
        parts.append("NaN or infinite weights")
    return "; ".join(parts)


def checkpoint_classifier(path: Path, what: str) -> torch.nn.Module:
    """The classifier saved at ``path``; built on the meta device first, so a bogus config costs no memory."""
    ckpt = _read_checkpoint(path, what)
    missing = [k for k in ("arch", "config", "state_dict") if k not in ckpt]
    if missing:
        _refuse(f"{what} is an ActiveGuard checkpoint without {', '.join(map(repr, missing))}")
    arch, config, state = ckpt["arch"], ckpt["config"], ckpt["state_dict"]
    if arch not in CLASSIFIERS:
        _refuse(f"{what} holds a {shown(arch)} model; licenses need a classifier ({' or '.join(CLASSIFIERS)})")
    if not isinstance(config, dict) or not isinstance(state, dict):
        _refuse(f"{what}: 'config' and 'state_dict' must both be dicts")
    try:
        with torch.device("meta"):
            skeleton = build_model(arch, **config)
    except Exception as exc:  # noqa: BLE001 - unknown keywords, wrong types, impossible sizes
        _refuse(f"{what}: its config {shown(config, 160)} does not describe a {arch} model ({type(exc).__name__})")
    problem = _weights_problem(skeleton.state_dict(), state)
    if problem:
        _refuse(f"{what}: its weights do not fit its {arch} config ({problem})")
    module = build_model(arch, **config)
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:  # right names and shapes, but tensors that cannot be copied (dtype, layout)
        _refuse(f"{what}: its weights cannot be loaded into a {arch} model ({type(exc).__name__})")
    return module.eval()


def _fingerprint_from_bytes(raw: bytes, shape: tuple[int, ...]) -> torch.Tensor:
    import numpy as np

    arr = np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(shape)
    return torch.from_numpy(arr.copy())[None]


class LicenseService(license_pb2_grpc.LicenseServiceServicer):
    def __init__(self, config: ServerConfig, store: Store, key, auth: AdminAuth, metrics: Metrics):
        self.cfg = config
        self.store = store
        self.key = key
        self.key_id = lic.key_id(key.public_key())
        self.auth = auth
        self.metrics = metrics
        self._models: dict[str, LoadedModel] = {}
        self._models_lock = threading.Lock()
        self._reserved: dict[str, set[tuple[int, int]]] = {}
        self._reserve_lock = threading.Lock()
        # One worker: torch already uses every core for one batch; requests queue, never block gRPC I/O.
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fingerprint-gen")
        self._rng = random.Random()

    # -- plumbing ------------------------------------------------------------------------------

    def _call(self, name: str, context: grpc.ServicerContext, fn: Callable[[], Any]) -> Any:
        try:
            if name in ADMIN_METHODS:
                problem = self.auth.check(context.invocation_metadata())
                if problem is not None:
                    self.metrics.auth_failures.inc()
                    _log(logging.WARNING, "admin call refused", method=name, peer=context.peer())
                    raise _Abort(grpc.StatusCode.UNAUTHENTICATED, problem)
            return fn()
        except _Abort as exc:
            if name == "IssueLicense":
                self.metrics.issue_failures.labels(exc.code.name).inc()
            context.abort(exc.code, shown_message(exc.message))
        except StoreError as exc:
            self.metrics.store_errors.labels(name).inc()
            _log(logging.ERROR, "store error", method=name, error=str(exc))
            context.abort(grpc.StatusCode.UNAVAILABLE, "the license store is unavailable; retry later")
        except Exception as exc:  # noqa: BLE001
            from sqlalchemy.exc import SQLAlchemyError

            if isinstance(exc, SQLAlchemyError):
                self.metrics.store_errors.labels(name).inc()
                _log(logging.ERROR, "store error", method=name, error=type(exc).__name__)
                if name == "IssueLicense":
                    self.metrics.issue_failures.labels("UNAVAILABLE").inc()
                context.abort(grpc.StatusCode.UNAVAILABLE, "the license store is unavailable; retry later")
            _log(logging.ERROR, "internal error", method=name, error=f"{type(exc).__name__}: {exc}")
            if name == "IssueLicense":
                self.metrics.issue_failures.labels("INTERNAL").inc()
            context.abort(grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log")

    def model(self, model_id: str) -> LoadedModel:
        with self._models_lock:
            loaded = self._models.get(model_id)
            if loaded is not None:
                return loaded
            row = self.store.get_model(model_id)
            if row is None:
                raise _Abort(grpc.StatusCode.NOT_FOUND, f"model {shown(model_id)} is not registered (RegisterModel first)")
            try:
                module = checkpoint_classifier(Path(row.model_path), f"model file {row.model_path!r}")
            except _Abort as exc:
                raise _Abort(grpc.StatusCode.FAILED_PRECONDITION,
                             f"the registered checkpoint of model {row.model_id[:16]}… cannot be used any more: "
                             f"{exc.message}") from None
            actual = compute_model_id(module)
            if actual != row.model_id:
                raise _Abort(grpc.StatusCode.FAILED_PRECONDITION,
                             f"the checkpoint at the registered path now has model id {actual[:16]}…, "
                             f"not the registered {row.model_id[:16]}…; refusing to issue for it")
            loaded = self._loaded(row, module)
            self._models[model_id] = loaded
        self._refresh_free_slots(loaded)
        return loaded

    @staticmethod
    def _loaded(row: ModelRow, module: torch.nn.Module) -> LoadedModel:
        config = ControlConfig(num_classes=row.num_classes, confidences=row.confidences, epsilon=row.epsilon)
        slots = [(t, j) for t in range(row.num_classes) for j in range(len(row.confidences))]
        return LoadedModel(row=row, module=module, config=config, all_slots=slots)

    def _license_msg(self, r: Any, include_signed: bool = True) -> license_pb2.License:
        now = int(time.time())
        if r.revoked:
            state = license_pb2.LICENSE_STATE_REVOKED
        elif r.expires_at <= now:
            state = license_pb2.LICENSE_STATE_EXPIRED
        else:
            state = license_pb2.LICENSE_STATE_ACTIVE
        msg = license_pb2.License(
            license_id=r.license_id, model_id=r.model_id, user=r.user_name,
            fo=common_pb2.FingerprintOutput(target_class=r.fo_class, confidence=r.fo_confidence, user_index=r.user_index),
            issued_at=r.issued_at, expires_at=r.expires_at, key_id=r.key_id, state=state,
            revoked_at=r.revoked_at or 0, revoke_reason=r.revoke_reason or "",
        )
        if include_signed:
            msg.signed.CopyFrom(common_pb2.SignedLicense(payload=bytes(r.payload), signature=bytes(r.signature), key_id=r.key_id))
        return msg

    @staticmethod
    def _profile(row: ModelRow) -> common_pb2.ModelProfile:
        return common_pb2.ModelProfile(
            model_id=row.model_id, name=row.name, num_classes=row.num_classes, confidences=list(row.confidences),
            epsilon=row.epsilon, input_shape=list(row.input_shape), encoding=row.encoding)

    # -- generation (runs on the worker thread) -------------------------------------------------

    def _generate(self, m: LoadedModel, slots: list[tuple[int, int]], seed: int) -> dict[tuple[int, int], bytes]:
        """Fingerprints for ``slots`` in one batch; only those that pass the re-check are returned."""
        start = time.perf_counter()
        users = [m.user_index(s) for s in slots]
        torch.set_num_threads(max(1, torch.get_num_threads()))
        fps = generate_fingerprints(
            m.module, m.config, users, input_shape=m.row.input_shape, encoding=m.row.encoding, seed=seed,
            max_steps=self.cfg.max_steps)
        self.metrics.generation.observe(time.perf_counter() - start)
        out = {}
        for i, slot in enumerate(slots):
            if bool(fps.success[i]):
                raw, _, _, _ = lic.fingerprint_bytes(fps.inputs[i : i + 1])
                if self._recheck(m, slot, raw):
                    out[slot] = raw
        return out

    def _recheck(self, m: LoadedModel, slot: tuple[int, int], raw: bytes) -> bool:
        """The exact bytes to be signed, decoded as a verifier will, through the registered model."""
        x = _fingerprint_from_bytes(raw, m.row.input_shape)
        if not torch.equal(encode(x, m.row.encoding), x):
            return False
        authorized, user = authenticate(m.module, x, m.config)
        return bool(authorized[0]) and int(user[0]) == m.user_index(slot)

    def _fingerprint_for(self, m: LoadedModel, slot: tuple[int, int]) -> tuple[bytes, str]:
        """(raw fingerprint, 'pregenerated'|'generated'), re-checked; runs on the worker."""
        raw = self.store.pregenerated_for(m.row.model_id, slot)
        if raw is not None and self._recheck(m, slot, raw):
            return raw, "pregenerated"
        for _ in range(3):
            got = self._generate(m, [slot], seed=self._rng.randrange(2**31))
            if slot in got:
                return got[slot], "generated"
        raise GenerationFailed(
            f"no fingerprint reached class {slot[0]} at confidence {m.row.confidences[slot[1]]} ± {m.row.epsilon / 2} "
            "after 3 attempts")

    # -- slots ---------------------------------------------------------------------------------

    def _reserve(self, m: LoadedModel, exclude: set[tuple[int, int]]) -> tuple[int, int]:
        mid = m.row.model_id
        with self._reserve_lock:
            taken = self.store.taken_slots(mid)
            reserved = self._reserved.setdefault(mid, set())
            free = [s for s in m.all_slots if s not in taken and s not in reserved and s not in exclude]
            self._set_free_slots(m, len(taken))
            if not free:
                cap = len(m.all_slots)
                k, t = m.row.num_classes, len(m.row.confidences)
                if len(taken) >= cap:
                    msg = f"all {cap} license slots of model {mid[:16]}… are issued ({k} classes × {t} confidences); no FO is ever reused"
                else:
                    msg = (f"all {cap} license slots of model {mid[:16]}… ({k} classes × {t} confidences) are issued "
                           f"or being issued ({len(taken)} issued, {len(reserved)} in flight)")
                raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, msg)
            pre = self.store.pregenerated_slots(mid)
            ready = [s for s in free if s in pre]
            slot = self._rng.choice(ready or free)
            reserved.add(slot)
            return slot

    def _set_free_slots(self, m: LoadedModel, issued: int) -> None:
        """Set the free-slot gauge; the caller holds ``_reserve_lock`` so counts are published in order."""
        self.metrics.free_slots.labels(m.row.model_id[:16]).set(len(m.all_slots) - issued)

    def _refresh_free_slots(self, m: LoadedModel) -> None:
        """Publish the free slots after registration, a model load or a committed license.

        Setting the gauge only while reserving (as before) counted the slot being issued as free.
        """
        with self._reserve_lock:
            self._set_free_slots(m, self.store.count_licenses(m.row.model_id))

    def _release(self, model_id: str, slot: tuple[int, int]) -> None:
        with self._reserve_lock:
            self._reserved.get(model_id, set()).discard(slot)

    # -- RPCs ----------------------------------------------------------------------------------

    def RegisterModel(self, request, context):  # noqa: N802
        return self._call("RegisterModel", context, lambda: self._register(request))

    @staticmethod
    def _named(model_path: str) -> tuple[Path, torch.nn.Module]:
        """(resolved path, classifier) for a checkpoint path on the server's file system."""
        try:
            path = Path(model_path).resolve()
        except (OSError, RuntimeError) as exc:  # symlink loops and the like
            _refuse(f"model_path {shown(model_path, 200)} cannot be resolved ({type(exc).__name__})")
        return path, checkpoint_classifier(path, f"model file {shown(str(path), 200)}")

    def _uploaded(self, checkpoint: bytes) -> tuple[Path, torch.nn.Module]:
        """(stored path, classifier) for uploaded checkpoint bytes; nothing stays on disk when they are refused."""
        models_dir = self.cfg.data_dir / "models"
        models_dir.mkdir(parents=True, exist_ok=True)
        tmp = models_dir / f"upload-{threading.get_ident()}-{time.time_ns()}.pt"
        tmp.write_bytes(checkpoint)
        try:
            module = checkpoint_classifier(tmp, f"the uploaded checkpoint ({len(checkpoint)} bytes)")
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        path = models_dir / f"{compute_model_id(module)}.pt"
        tmp.replace(path)
        return path, module

    def _register(self, req: license_pb2.RegisterModelRequest) -> license_pb2.RegisterModelResponse:
        encoding = check_register_request(req)
        path, module = self._uploaded(req.checkpoint) if req.checkpoint else self._named(req.model_path)
        mid = compute_model_id(module)
        if req.expected_model_id and req.expected_model_id != mid:
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION,
                         f"checkpoint has model id {mid[:16]}…, not the expected {req.expected_model_id[:16]}…")
        shape = model_input_shape(module)
        with torch.no_grad():
            width = int(module(torch.zeros(1, *shape)).reshape(1, -1).shape[1])
        k = req.num_classes or width
        if k != width:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"num_classes={k} but the model outputs {width} values")
        try:
            config = ControlConfig(num_classes=k, confidences=tuple(req.confidences) or PAPER_CONFIDENCES,
                                   epsilon=req.epsilon or PAPER_EPSILON)
        except ValueError as exc:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, shown_message(str(exc))) from None
        row = ModelRow(model_id=mid, name=req.name or mid[:16], num_classes=k, confidences=config.confidences,
                       epsilon=config.epsilon, input_shape=tuple(shape), encoding=encoding, model_path=str(path),
                       created_at=int(time.time()))
        try:
            row, created = self.store.add_model(row)
        except AlreadyExists as exc:
            raise _Abort(grpc.StatusCode.ALREADY_EXISTS, str(exc)) from None
        m = self._loaded(row, module)
        with self._models_lock:
            self._models.setdefault(mid, m)
            m = self._models[mid]
        self._refresh_free_slots(m)
        if req.pregenerate:
            taken = self.store.taken_slots(mid)
            todo = [s for s in m.all_slots if s not in taken and s not in self.store.pregenerated_slots(mid)]
            if todo:
                start = time.perf_counter()
                fut = self.pool.submit(self._generate, m, todo, self._rng.randrange(2**31))
                got = fut.result(timeout=self.cfg.generation_timeout)
                self.store.save_pregenerated(mid, [(c, j, raw) for (c, j), raw in got.items()])
                _log(logging.INFO, "pregenerated fingerprints", model_id=mid[:16], slots=len(todo), ok=len(got),
                     seconds=round(time.perf_counter() - start, 3))
        _log(logging.INFO, "model registered" if created else "model already registered", model_id=mid[:16],
             name=row.name, capacity=row.capacity)
        return license_pb2.RegisterModelResponse(
            profile=self._profile(row), created=created, capacity=row.capacity,
            issued=self.store.count_licenses(mid), pregenerated=len(self.store.pregenerated_slots(mid)))

    def IssueLicense(self, request, context):  # noqa: N802
        return self._call("IssueLicense", context, lambda: self._issue(request, context))

    def _issue(self, req: license_pb2.IssueLicenseRequest, context) -> license_pb2.License:
        start = time.perf_counter()
        user = req.user
        validity = check_issue_request(req, self.cfg.default_validity)
        m = self.model(req.model_id)
        lost: set[tuple[int, int]] = set()
        for _attempt in range(len(m.all_slots) + 1):
            slot = self._reserve(m, lost)
            try:
                fut = self.pool.submit(self._fingerprint_for, m, slot)
                try:
                    raw, path = fut.result(timeout=self.cfg.generation_timeout)
                except GenerationFailed as exc:
                    raise _Abort(grpc.StatusCode.INTERNAL, str(exc)) from None
                except concurrent.futures.TimeoutError:
                    fut.cancel()
                    raise _Abort(grpc.StatusCode.DEADLINE_EXCEEDED, "fingerprint generation timed out") from None
                if not context.is_active():
                    raise _Abort(grpc.StatusCode.CANCELLED, "the client went away before the license was signed")
                x = _fingerprint_from_bytes(raw, m.row.input_shape)
                payload = lic.make_payload(
                    model_id=m.row.model_id, user=user, user_index=m.user_index(slot),
                    fo=(slot[0], m.row.confidences[slot[1]]), epsilon=m.row.epsilon, fingerprint=x, key=self.key,
                    validity_seconds=validity, encoding=m.row.encoding)
                signed = lic.sign_license(payload, self.key)
                row = dict(
                    license_id=payload.license_id, model_id=payload.model_id, user_name=user,
                    fo_class=slot[0], conf_index=slot[1], fo_confidence=payload.fo_confidence,
                    user_index=payload.user_index, payload=signed.payload, signature=signed.signature,
                    key_id=signed.key_id, issued_at=payload.issued_at, expires_at=payload.expires_at)
                try:
                    self.store.insert_license(row)
                except SlotTaken:
                    self.metrics.slot_conflicts.inc()
                    lost.add(slot)
                    _log(logging.INFO, "slot taken by a concurrent issuer; retrying", model_id=m.row.model_id[:16],
                         fo_class=slot[0], conf_index=slot[1])
                    continue
            finally:
                self._release(m.row.model_id, slot)
            self._refresh_free_slots(m)
            elapsed = time.perf_counter() - start
            self.metrics.issued.labels(m.row.model_id[:16]).inc()
            self.metrics.issue_latency.labels(path).observe(elapsed)
            _log(logging.INFO, "license issued", license_id=payload.license_id, model_id=m.row.model_id[:16],
                 user=user, fo_class=slot[0], fo_confidence=payload.fo_confidence, path=path,
                 seconds=round(elapsed, 4))
            return self._license_msg(self.store.get_license(payload.license_id))
        raise _Abort(grpc.StatusCode.ABORTED, "lost every candidate slot to concurrent issuers; retry")

    def GetLicense(self, request, context):  # noqa: N802
        def run():
            check_text("license_id", request.license_id, limit=MAX_ID, required=True)
            r = self.store.get_license(request.license_id)
            if r is None:
                raise _Abort(grpc.StatusCode.NOT_FOUND, f"no license {shown(request.license_id)}")
            return self._license_msg(r)

        return self._call("GetLicense", context, run)

    def ListLicenses(self, request, context):  # noqa: N802
        def run():
            size, after, state = check_list_request(request)
            rows = self.store.list_licenses(model_id=request.model_id, user=request.user, state=state,
                                            after_seq=after, limit=size + 1)
            more = len(rows) > size
            rows = rows[:size]
            return license_pb2.ListLicensesResponse(
                licenses=[self._license_msg(r, request.include_signed) for r in rows],
                next_page_token=str(rows[-1].seq) if more and rows else "")

        return self._call("ListLicenses", context, run)

    def RevokeLicense(self, request, context):  # noqa: N802
        def run():
            check_text("license_id", request.license_id, limit=MAX_ID, required=True)
            check_reason(request.reason)
            r, new = self.store.revoke(request.license_id, request.reason or "unspecified")
            if r is None:
                raise _Abort(grpc.StatusCode.NOT_FOUND, f"no license {shown(request.license_id)}")
            if new:
                self.metrics.revocations.inc()
                _log(logging.INFO, "license revoked", license_id=r.license_id, model_id=r.model_id[:16])
            return self._license_msg(r)

        return self._call("RevokeLicense", context, run)

    def ListRevocations(self, request, context):  # noqa: N802
        def run():
            if request.since < 0:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"since must be >= 0, got {request.since}")
            check_text("model_id", request.model_id, limit=MAX_ID)
            size = min(request.page_size or 1000, 10000)
            rows = self.store.list_revocations(request.since, request.model_id, size)
            return license_pb2.ListRevocationsResponse(
                revocations=[license_pb2.Revocation(sequence=r.seq, license_id=r.license_id, model_id=r.model_id,
                                                    revoked_at=r.revoked_at, reason=r.reason) for r in rows],
                cursor=rows[-1].seq if rows else request.since)

        return self._call("ListRevocations", context, run)

    def GetVerificationKey(self, request, context):  # noqa: N802
        def run():
            keys = []
            for kid, raw, _ in self.store.keys():
                pub = lic.public_key_from_bytes(raw)
                keys.append(license_pb2.VerificationKey(
                    key_id=kid, public_key=raw, public_key_pem=lic.public_key_pem(pub).decode("ascii"),
                    current=kid == self.key_id))
            return license_pb2.GetVerificationKeyResponse(keys=keys)

        return self._call("GetVerificationKey", context, run)


class LicenseServer:
    """The whole server: store, key, token, gRPC (+ health, reflection) and the metrics endpoint."""

    def __init__(self, config: ServerConfig, *, admin_token_hash: str | None = None):
        """``admin_token_hash`` (sha256 hex) overrides the token files and environment: for embedding."""
        self.cfg = config
        self._admin_token_hash = admin_token_hash
        self.grpc_server: grpc.Server | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._httpd = None

    def _admin_auth(self) -> AdminAuth:
        if self._admin_token_hash:
            return AdminAuth(self._admin_token_hash)
        hash_file = self.cfg.admin_token_hash_file
        env_token = __import__("os").environ.get(TOKEN_ENV)
        if env_token:
            write_secret(hash_file, hash_token(env_token) + "\n")
            _log(logging.INFO, "admin token hash set from the environment", hash_file=str(hash_file))
        elif not hash_file.exists():
            token_file = self.cfg.data_dir / "admin.token"
            create_admin_token(hash_file, token_file)
            _log(logging.WARNING, "created an admin token; move it somewhere safe", token_file=str(token_file))
        return AdminAuth(load_token_hash(hash_file))

    def start(self) -> "LicenseServer":
        cfg = self.cfg
        if not cfg.data_dir.exists():
            cfg.data_dir.mkdir(parents=True, mode=0o700)  # holds the key, the token and the license DB
        key, created = lic.load_or_create_signing_key(cfg.signing_key)
        kid = lic.key_id(key.public_key())
        _log(logging.INFO, "signing key " + ("created" if created else "loaded"), key_id=kid, path=str(cfg.signing_key))
        store = Store(cfg.database_url)
        store.record_key(kid, lic.public_key_bytes(key.public_key()))
        _log(logging.INFO, "store ready", database=redact_url(cfg.database_url), schema_version=store.schema_version())
        self.store = store
        self.metrics = Metrics()
        self.service = LicenseService(cfg, store, key, self._admin_auth(), self.metrics)

        server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=cfg.max_workers,
                                                                   thread_name_prefix="grpc"))
        license_pb2_grpc.add_LicenseServiceServicer_to_server(self.service, server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
        address = f"{cfg.host}:{cfg.port}"
        if cfg.tls_cert and cfg.tls_key:
            creds = grpc.ssl_server_credentials(
                [(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())],
                root_certificates=Path(cfg.tls_client_ca).read_bytes() if cfg.tls_client_ca else None,
                require_client_auth=bool(cfg.tls_client_ca))
            self.port = server.add_secure_port(address, creds)
        else:
            self.port = server.add_insecure_port(address)
        if not self.port:
            raise OSError(f"cannot bind gRPC to {address}")
        server.start()
        self.grpc_server = server
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        if cfg.metrics_port is not None:
            self._httpd, _ = start_http_server(cfg.metrics_port, addr=cfg.metrics_host, registry=self.metrics.registry)
            self.metrics_port = self._httpd.server_port
        _log(logging.INFO, "serving", address=f"{cfg.host}:{self.port}", tls=bool(cfg.tls_cert),
             mtls=bool(cfg.tls_client_ca),
             metrics=f"{cfg.metrics_host}:{self.metrics_port}" if self.metrics_port else None, key_id=kid)
        return self

    def stop(self, grace: float = 2.0) -> None:
        if self.grpc_server is not None:
            self.health.enter_graceful_shutdown()
            self.grpc_server.stop(grace).wait()
            self.grpc_server = None
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd = None
        self.service.pool.shutdown(wait=True, cancel_futures=True)
        self.store.close()

    def wait(self) -> None:
        if self.grpc_server is not None:
            self.grpc_server.wait_for_termination()
