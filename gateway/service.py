"""The gateway's gRPC service: licenses in, sessions out, inference forwarded to TorchServe.

Authenticate verifies a license locally (signature, expiry, model, revocation), runs its
fingerprint through the *served* model (TorchServe, license in ``input``) and, if the handler
admits it, issues a session signed with the gateway key that the handler trusts. Predict checks
the session, applies per-user limits and forwards the inputs with the session in ``input``: a
tensor as .npy, or an opaque payload (for a model protected with its owner's handler) as it came.
The handler's JSON outcome (gRPC returns OK with the body) is mapped to gRPC status codes; an
owner's answer comes back inside it as base64 and reaches the client as a payload, unchanged.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from activeguard.credentials import licenses, sessions
from activeguard.guard.outcomes import EXPLANATION, MALFORMED_INPUT
from activeguard.guard.recent import Recent
from activeguard_proto.rpc import ErrorMapper
from activeguard_proto.v1 import gateway_pb2, gateway_pb2_grpc
from gateway.errors import Refusal, handler_refusal, upstream_refusal
from gateway.tensors import MAX_PAYLOAD_BYTES, check_payload, is_media_type, npy_from_tensor, to_tensor
from gateway.upstreams import UpstreamError, UpstreamPool

log = logging.getLogger("activeguard.gateway")
SESSION_CACHE_ENTRIES = 65536  # verified session tokens remembered (~1 KB each)
MAX_PROBLEM_CHARS = 300  # of the handler's account of a malformed input, passed on to the client


@dataclass
class ModelRoute:
    name: str  # the name clients use and TorchServe serves
    model_id: str
    upstreams: list[str]  # TorchServe gRPC targets, host:port
    # TorchServe HTTP APIs (http://host:port) for Predict, the hot path: TorchServe answers HTTP
    # sooner than gRPC, and HTTP carries a payload's content type. Empty: Predict uses ``upstreams``.
    http_upstreams: list[str] = field(default_factory=list)


@dataclass
class GatewayConfig:
    models: list[ModelRoute]
    signing_key: Path  # the gateway's Ed25519 key (0600), created on first start
    license_server: str | None = None  # host:port for keys and revocations
    license_keys_pem: list[str] = field(default_factory=list)  # extra trusted license keys
    revocation_file: Path | None = None  # the handler's revocation file, written on every sync
    session_ttl_s: float = 900.0
    poll_interval_s: float = 2.0
    # Past this many seconds without a successful revocation sync, new Authenticate calls are
    # refused (UNAVAILABLE): the gateway fails closed rather than trust a stale list.
    max_revocation_staleness_s: float = 60.0
    upstream_deadline_s: float = 10.0
    rate_per_user_per_s: float = 200.0
    max_sessions_per_user: int = 8
    max_payload_bytes: int = MAX_PAYLOAD_BYTES  # the largest opaque payload Predict forwards
    metrics_port: int = 0  # Prometheus; 0: any free port (`gateway --metrics-port` overrides it)

    @classmethod
    def from_json(cls, path: Path) -> GatewayConfig:
        return cls.from_json_text(Path(path).read_text())

    @classmethod
    def from_json_text(cls, text: str) -> GatewayConfig:
        doc = json.loads(text)
        doc["models"] = [ModelRoute(**m) for m in doc["models"]]
        doc["signing_key"] = Path(doc["signing_key"])
        if doc.get("revocation_file"):
            doc["revocation_file"] = Path(doc["revocation_file"])
        return cls(**doc)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "activeguard_gateway_requests",
            "gRPC requests by method and code",
            ["method", "code"],
            registry=self.registry,
        )
        self.upstream_latency = Histogram(
            "activeguard_gateway_upstream_seconds", "TorchServe call latency", registry=self.registry
        )
        self.active_sessions = Gauge(
            "activeguard_gateway_active_sessions",
            "sessions issued that are neither expired nor revoked",
            registry=self.registry,
        )
        self.sync_age = Gauge(
            "activeguard_gateway_revocation_sync_age_seconds",
            "seconds since the last successful revocation sync (staleness of the list)",
            registry=self.registry,
        )
        self.sync_errors = Counter(
            "activeguard_gateway_revocation_sync_errors", "failed revocation syncs", registry=self.registry
        )

    def count(self, method: str, code: grpc.StatusCode, _exc: BaseException | None = None) -> None:
        """The shared error mapper's hook: one request counted per method and final code."""
        self.requests.labels(method, code.name).inc()


class RevocationSync:
    """Polls ListRevocations with a cursor; keeps the last list when the server is unreachable; writes the
    server's signed list to ``revocation_file`` for the handlers on this host."""

    def __init__(self, config: GatewayConfig, metrics: Metrics):
        self.config, self.metrics = config, metrics
        self.revoked: frozenset[str] = frozenset()
        self.cursor = 0
        self.last_ok = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="revocation-sync", daemon=True)
        self._client = None
        metrics.sync_age.set_function(self.staleness)
        if config.license_server:
            from license_server.client import LicenseClient

            self._client = LicenseClient(config.license_server, timeout=max(1.0, config.poll_interval_s))

    def verification_keys(self) -> dict:
        keys = {}
        for pem in self.config.license_keys_pem:
            key = licenses.public_key_from_pem(pem, "a license_keys_pem entry")
            keys[licenses.key_id(key)] = key
        if self._client is not None:
            keys.update(self._client.verification_keys())
        return keys

    def sync_once(self) -> None:
        if self._client is None:
            return
        try:
            resp = self._client.revocations(since=self.cursor)
        except grpc.RpcError as err:
            self.metrics.sync_errors.inc()
            log.warning("revocation sync failed (%s); keeping the last list of %d", err.code().name, len(self.revoked))
            return
        if resp.revocations:
            self.revoked = self.revoked | {r.license_id for r in resp.revocations}
        self.cursor = max(self.cursor, resp.cursor)
        self.last_ok = time.monotonic()
        self._write_file()

    def _write_file(self) -> None:
        """The license server's signed list, every sync, for the handlers on this host (they verify it, and
        its fresh issue time keeps their staleness bounded by the poll interval)."""
        path = self.config.revocation_file
        if path is None:
            return
        try:
            text = self._client.revocation_list().text
        except grpc.RpcError as err:
            self.metrics.sync_errors.inc()
            log.warning("signed revocation list not fetched (%s); the file keeps the last one", err.code().name)
            return
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)  # atomic: the handler never reads half a file

    def staleness(self) -> float:
        """Seconds since the revocation list was last known to be complete (0 without a server)."""
        return 0.0 if self._client is None else time.monotonic() - self.last_ok

    def require_fresh(self) -> None:
        """Fail closed: refuse to vouch for a license while the revocation list is too old."""
        age = self.staleness()
        if age > self.config.max_revocation_staleness_s:
            raise Refusal(
                grpc.StatusCode.UNAVAILABLE,
                f"the license server has not been reachable for {age:.0f} s; the revocation list is too "
                f"stale to authenticate (limit {self.config.max_revocation_staleness_s:g} s)",
            )

    def _run(self) -> None:
        while not self._stop.wait(self.config.poll_interval_s):
            self.sync_once()

    def start(self) -> None:
        self.sync_once()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._client is not None:
            self._client.close()


class Limits:
    """Per-user request rate (sliding one-second window) and concurrent-session caps."""

    def __init__(self, rate_per_s: float, max_sessions: int):
        self.rate, self.max_sessions = rate_per_s, max_sessions
        self._calls: dict[str, deque] = defaultdict(deque)
        self._sessions: dict[str, dict[str, tuple[str, float]]] = defaultdict(dict)  # user → id → (license, expiry)
        self._lock = threading.Lock()

    def admit_call(self, user: str) -> None:
        now = time.monotonic()
        with self._lock:
            calls = self._calls[user]
            while calls and now - calls[0] > 1.0:
                calls.popleft()
            if len(calls) >= self.rate:
                raise Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, f"rate limit: {self.rate:g} requests/s per user")
            calls.append(now)

    def add_session(
        self, user: str, session_id: str, expires_at: float, license_id: str = "", revoked: frozenset[str] = frozenset()
    ) -> None:
        with self._lock:
            live = self._live(self._sessions[user], revoked)
            if len(live) >= self.max_sessions:
                raise Refusal(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"user has {len(live)} active sessions (limit {self.max_sessions})",
                )
            live[session_id] = (license_id, expires_at)
            self._sessions[user] = live

    def active_sessions(self, revoked: frozenset[str] = frozenset()) -> int:
        with self._lock:
            return sum(len(self._live(s, revoked)) for s in self._sessions.values())

    @staticmethod
    def _live(sessions_: dict[str, tuple[str, float]], revoked: frozenset[str]) -> dict[str, tuple[str, float]]:
        now = time.time()
        return {s: (lic, exp) for s, (lic, exp) in sessions_.items() if exp > now and lic not in revoked}


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _answered_payload(body: dict) -> gateway_pb2.Payload:
    """An owner's handler's answer: its bytes (base64 in the handler's JSON) and content type."""
    encoded, kind = body.get("payload_b64"), body.get("content_type")
    if not isinstance(encoded, str) or not isinstance(kind, str) or not is_media_type(kind):
        raise Refusal(
            grpc.StatusCode.INTERNAL,
            "the model's handler answered a payload without base64 'payload_b64' and a media type 'content_type'",
        )
    try:
        data = base64.b64decode(encoded, validate=True)
    except ValueError:  # binascii.Error, or a str that is not ASCII
        raise Refusal(grpc.StatusCode.INTERNAL, "the model's handler answered a payload that is not base64") from None
    return gateway_pb2.Payload(data=data, content_type=kind)


class GatewayService(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, config: GatewayConfig):
        self.config = config
        self.metrics = Metrics()
        self.key, _ = licenses.load_or_create_signing_key(config.signing_key)
        self._public_key = self.key.public_key()
        self._sessions: Recent[str, sessions.SessionClaims] = Recent(SESSION_CACHE_ENTRIES)
        self.routes = {m.name: m for m in config.models}
        self.pools = {
            m.name: UpstreamPool(m.name, m.upstreams, deadline_s=config.upstream_deadline_s) for m in config.models
        }
        self.predict_pools = {
            m.name: UpstreamPool(m.name, m.http_upstreams, deadline_s=config.upstream_deadline_s)
            if m.http_upstreams
            else self.pools[m.name]
            for m in config.models
        }
        self.sync = RevocationSync(config, self.metrics)
        self.license_keys = self.sync.verification_keys()
        self.limits = Limits(config.rate_per_user_per_s, config.max_sessions_per_user)
        self.metrics.active_sessions.set_function(lambda: self.limits.active_sessions(self.sync.revoked))
        self._errors = ErrorMapper(log, on_result=self.metrics.count)

    # -- helpers ------------------------------------------------------------------------------
    def _route(self, name: str) -> ModelRoute:
        if name not in self.routes:
            raise Refusal(grpc.StatusCode.NOT_FOUND, f"unknown model {name!r}; ListModels shows what is served")
        return self.routes[name]

    def _forward(
        self, model: str, inputs: dict[str, bytes], content_type: str | None = None, predict: bool = False
    ) -> dict:
        """The handler's JSON answer from TorchServe (``predict``: over the route's Predict upstreams)."""
        pool = (self.predict_pools if predict else self.pools)[model]
        try:
            body, seconds = pool.predict(inputs, content_type)
        except UpstreamError as exc:
            log.warning("upstream failure for model %s: %s", model, exc)
            raise upstream_refusal(exc.code, model) from None
        self.metrics.upstream_latency.observe(seconds)
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError):
            doc = None
        if not isinstance(doc, dict):
            raise Refusal(grpc.StatusCode.INTERNAL, "TorchServe answered with a body that is not a JSON object")
        return doc

    @staticmethod
    def _outcome(body: dict) -> dict:
        """The handler's explanation of an attested request; refusals become their table's code."""
        explanation = body.get(EXPLANATION)
        if not isinstance(explanation, dict):
            if isinstance(body.get("reason"), str):
                raise handler_refusal(body["reason"])
            raise Refusal(
                grpc.StatusCode.INTERNAL,
                "the model's handler did not explain its decision: is this "
                "gateway's public key in the model's protection profile?",
            )
        if not explanation.get("authorized"):
            reason = str(explanation.get("reason", "unknown"))
            problem = body.get("error")
            if reason == MALFORMED_INPUT and isinstance(problem, str):  # the handler's words for its client
                raise handler_refusal(reason, f"refused: malformed input: {problem[:MAX_PROBLEM_CHARS]}")
            raise handler_refusal(reason)
        return explanation

    def _signed_claims(self, token: str) -> sessions.SessionClaims:
        """The claims of a session this gateway signed: the signature is checked once per token
        (remembered until the token ages out of a bounded map); purpose, expiry, model and
        revocation are checked by the caller on every call."""
        claims = self._sessions.get(token)
        if claims is None:
            claims = sessions.signed_claims(token, self._public_key)
            self._sessions.put(token, claims)
        return claims

    def _data(self, request: gateway_pb2.PredictRequest) -> bytes:
        """The ``data`` TorchServe gets: a tensor as .npy, a payload's bytes exactly as they came."""
        carried = request.WhichOneof("body")
        try:
            if carried == "payload":
                data = check_payload(request.payload, self.config.max_payload_bytes)
                log.debug("payload of %d bytes (%s) for %s", len(data), request.payload.content_type, request.model)
                return data
            if carried == "inputs":
                return npy_from_tensor(request.inputs)
        except ValueError as exc:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, "send inputs (a tensor) or a payload (bytes and content type)")

    @staticmethod
    def _answer(body: dict, user: str) -> gateway_pb2.PredictResponse:
        """What the model answered, whatever the request carried: a payload when its handler is the
        owner's (``payload_b64``), else tensor outputs."""
        if "payload_b64" in body:
            return gateway_pb2.PredictResponse(payload=_answered_payload(body), user=user)
        try:
            outputs = np.asarray(body["outputs"], dtype=np.float32)
        except (KeyError, TypeError, ValueError):
            raise Refusal(grpc.StatusCode.INTERNAL, "the model's handler answered without outputs") from None
        return gateway_pb2.PredictResponse(outputs=to_tensor(outputs), user=user)

    def _run(self, method: str, context: grpc.ServicerContext, fn):
        """Run one RPC through the shared mapping: a Refusal becomes its code, a bug INTERNAL."""
        return self._errors.run(method, context, fn)

    # -- RPCs -----------------------------------------------------------------------------------
    def Authenticate(self, request, context):
        def run():
            route = self._route(request.model)
            self.sync.require_fresh()
            signed = licenses.SignedLicense(request.license.payload, request.license.signature, request.license.key_id)
            try:
                payload = licenses.verify_license(
                    signed, self.license_keys, model_id=route.model_id, revoked=self.sync.revoked
                )
            except (licenses.RevokedLicense, licenses.WrongModel) as exc:
                raise Refusal(grpc.StatusCode.PERMISSION_DENIED, str(exc)) from None
            except licenses.LicenseError as exc:
                raise Refusal(grpc.StatusCode.UNAUTHENTICATED, str(exc)) from None
            fingerprint = payload.fingerprint_tensor().numpy()
            explain, _ = sessions.issue_session(
                self.key,
                user=payload.user,
                user_index=payload.user_index,
                license_id=payload.license_id,
                model_id=route.model_id,
                ttl_seconds=self.config.upstream_deadline_s + 5,
                purpose=sessions.EXPLAIN,
            )
            body = self._forward(
                route.name,
                {"data": _npy(fingerprint), "license": signed.to_text().encode(), "explain": explain.encode()},
            )
            if self._outcome(body).get("user") != payload.user:
                raise Refusal(grpc.StatusCode.PERMISSION_DENIED, "the served model named another user")
            token, claims = sessions.issue_session(
                self.key,
                user=payload.user,
                user_index=payload.user_index,
                license_id=payload.license_id,
                model_id=route.model_id,
                ttl_seconds=min(self.config.session_ttl_s, payload.expires_at - time.time()),
            )
            self.limits.add_session(
                payload.user, claims.session_id, claims.expires_at, payload.license_id, self.sync.revoked
            )
            log.info("session issued user=%s model=%s", payload.user, route.name)
            return gateway_pb2.AuthenticateResponse(
                session_token=token, user=payload.user, user_index=payload.user_index, expires_at=claims.expires_at
            )

        return self._run("Authenticate", context, run)

    def Predict(self, request, context):
        def run():
            route = self._route(request.model)
            token = dict(context.invocation_metadata()).get("authorization", "")
            if not token.lower().startswith("bearer "):
                raise Refusal(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "no session: call Authenticate and send 'authorization: Bearer <token>'",
                )
            try:
                claims = sessions.admit_claims(
                    self._signed_claims(token[7:].strip()), model_id=route.model_id, revoked=self.sync.revoked
                )
            except sessions.RevokedSession as exc:
                raise Refusal(grpc.StatusCode.PERMISSION_DENIED, str(exc)) from None
            except sessions.SessionError as exc:
                raise Refusal(grpc.StatusCode.UNAUTHENTICATED, str(exc)) from None
            self.limits.admit_call(claims.user)
            data = self._data(request)
            kind = request.payload.content_type if request.WhichOneof("body") == "payload" else None
            body = self._forward(route.name, {"data": data, "session": token[7:].strip().encode()}, kind, predict=True)
            self._outcome(body)
            return self._answer(body, claims.user)

        return self._run("Predict", context, run)

    def ListModels(self, request, context):
        def run():
            return gateway_pb2.ListModelsResponse(
                models=[
                    gateway_pb2.ModelInfo(
                        name=r.name,
                        model_id=r.model_id,
                        upstreams=len(r.upstreams),
                        upstreams_up=self.pools[r.name].up_count(),
                    )
                    for r in self.routes.values()
                ]
            )

        return self._run("ListModels", context, run)

    def close(self) -> None:
        self.sync.stop()
        for pool in {id(p): p for p in [*self.pools.values(), *self.predict_pools.values()]}.values():
            pool.close()
