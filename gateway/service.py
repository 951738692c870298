"""The gateway's gRPC service: licenses in, sessions out, inference forwarded to TorchServe.

Authenticate verifies a license locally (signature, expiry, model, revocation), runs its
fingerprint through the *served* model (TorchServe, license in ``input``) and, if the handler
admits it, issues a session signed with the gateway key that the handler trusts. Predict checks
the session, applies per-user limits and forwards the inputs with the session in ``input``.
The handler's JSON outcome (gRPC returns OK with the body) is mapped to gRPC status codes.
"""

from __future__ import annotations

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

from activeguard import licenses, sessions
from activeguard_proto.v1 import gateway_pb2, gateway_pb2_grpc
from gateway.tensors import from_tensor, to_tensor
from gateway.upstreams import UpstreamPool, UpstreamUnavailable

log = logging.getLogger("activeguard.gateway")

# handler reasons → the gRPC code a client sees
REASON_CODES = {
    "no_credentials": grpc.StatusCode.UNAUTHENTICATED,
    "bad_signature": grpc.StatusCode.UNAUTHENTICATED,
    "malformed_license": grpc.StatusCode.UNAUTHENTICATED,
    "bad_session": grpc.StatusCode.UNAUTHENTICATED,
    "expired": grpc.StatusCode.UNAUTHENTICATED,
    "expired_session": grpc.StatusCode.UNAUTHENTICATED,
    "revoked": grpc.StatusCode.PERMISSION_DENIED,
    "wrong_model": grpc.StatusCode.PERMISSION_DENIED,
    "fo_mismatch": grpc.StatusCode.PERMISSION_DENIED,
    "malformed_input": grpc.StatusCode.INVALID_ARGUMENT,
}


@dataclass
class ModelRoute:
    name: str  # the name clients use and TorchServe serves
    model_id: str
    upstreams: list[str]


@dataclass
class GatewayConfig:
    models: list[ModelRoute]
    signing_key: Path  # the gateway's Ed25519 key (0600), created on first start
    license_server: str | None = None  # host:port for keys and revocations
    license_keys_pem: list[str] = field(default_factory=list)  # extra trusted license keys
    revocation_file: Path | None = None  # the handler's revocation file, written on every sync
    session_ttl_s: float = 900.0
    poll_interval_s: float = 2.0
    upstream_deadline_s: float = 10.0
    rate_per_user_per_s: float = 200.0
    max_sessions_per_user: int = 8

    @classmethod
    def from_json(cls, path: Path) -> "GatewayConfig":
        doc = json.loads(Path(path).read_text())
        doc["models"] = [ModelRoute(**m) for m in doc["models"]]
        doc["signing_key"] = Path(doc["signing_key"])
        if doc.get("revocation_file"):
            doc["revocation_file"] = Path(doc["revocation_file"])
        return cls(**doc)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("activeguard_gateway_requests", "gRPC requests by method and code",
                                ["method", "code"], registry=self.registry)
        self.upstream_latency = Histogram("activeguard_gateway_upstream_seconds", "TorchServe call latency",
                                          registry=self.registry)
        self.active_sessions = Gauge("activeguard_gateway_active_sessions", "unexpired sessions issued",
                                     registry=self.registry)
        self.sync_age = Gauge("activeguard_gateway_revocation_sync_age_seconds",
                              "seconds since the last successful revocation sync", registry=self.registry)
        self.sync_errors = Counter("activeguard_gateway_revocation_sync_errors", "failed revocation syncs",
                                   registry=self.registry)


class Refusal(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class RevocationSync:
    """Polls ListRevocations with a cursor; keeps the last list when the server is unreachable."""

    def __init__(self, config: GatewayConfig, metrics: Metrics):
        self.config, self.metrics = config, metrics
        self.revoked: frozenset[str] = frozenset()
        self.cursor = 0
        self.last_ok = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="revocation-sync", daemon=True)
        self._client = None
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
            self._write_file()
        self.cursor = max(self.cursor, resp.cursor)
        self.last_ok = time.monotonic()

    def _write_file(self) -> None:
        path = self.config.revocation_file
        if path is None:
            return
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(f"{i}\n" for i in sorted(self.revoked)))
        tmp.replace(path)  # atomic: the handler never reads half a file

    def _run(self) -> None:
        while not self._stop.wait(self.config.poll_interval_s):
            self.sync_once()
            self.metrics.sync_age.set(time.monotonic() - self.last_ok)

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
        self._sessions: dict[str, dict[str, float]] = defaultdict(dict)
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

    def add_session(self, user: str, session_id: str, expires_at: float) -> None:
        now = time.time()
        with self._lock:
            live = {s: e for s, e in self._sessions[user].items() if e > now}
            if len(live) >= self.max_sessions:
                raise Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"user has {len(live)} active sessions (limit {self.max_sessions})")
            live[session_id] = expires_at
            self._sessions[user] = live

    def active_sessions(self) -> int:
        now = time.time()
        with self._lock:
            return sum(e > now for s in self._sessions.values() for e in s.values())


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


class GatewayService(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, config: GatewayConfig):
        self.config = config
        self.metrics = Metrics()
        self.key, _ = licenses.load_or_create_signing_key(config.signing_key)
        self.routes = {m.name: m for m in config.models}
        self.pools = {m.name: UpstreamPool(m.name, m.upstreams, deadline_s=config.upstream_deadline_s)
                      for m in config.models}
        self.sync = RevocationSync(config, self.metrics)
        self.license_keys = self.sync.verification_keys()
        self.limits = Limits(config.rate_per_user_per_s, config.max_sessions_per_user)

    # -- helpers ------------------------------------------------------------------------------
    def _route(self, name: str) -> ModelRoute:
        if name not in self.routes:
            raise Refusal(grpc.StatusCode.NOT_FOUND, f"unknown model {name!r}; ListModels shows what is served")
        return self.routes[name]

    def _forward(self, model: str, inputs: dict[str, bytes]) -> dict:
        try:
            body, seconds = self.pools[model].predict(inputs)
        except UpstreamUnavailable as exc:
            raise Refusal(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
        except grpc.RpcError as err:
            code = err.code()
            raise Refusal(code if code != grpc.StatusCode.INTERNAL else grpc.StatusCode.UNAVAILABLE,
                          f"TorchServe refused the call: {err.details()}") from None
        self.metrics.upstream_latency.observe(seconds)
        try:
            return json.loads(body)
        except ValueError:
            raise Refusal(grpc.StatusCode.INTERNAL, "TorchServe answered with a body that is not JSON") from None

    @staticmethod
    def _outcome(body: dict) -> None:
        if not body.get("authorized"):
            reason = body.get("reason", "unknown")
            code = REASON_CODES.get(reason, grpc.StatusCode.PERMISSION_DENIED)
            raise Refusal(code, body.get("error") or f"refused: {reason.replace('_', ' ')}")

    def _run(self, method: str, context: grpc.ServicerContext, fn):
        try:
            result = fn()
            self.metrics.requests.labels(method, "OK").inc()
            return result
        except Refusal as refusal:
            self.metrics.requests.labels(method, refusal.code.name).inc()
            context.abort(refusal.code, str(refusal))

    # -- RPCs -----------------------------------------------------------------------------------
    def Authenticate(self, request, context):
        def run():
            route = self._route(request.model)
            signed = licenses.SignedLicense(request.license.payload, request.license.signature,
                                            request.license.key_id)
            try:
                payload = licenses.verify_license(signed, self.license_keys, model_id=route.model_id,
                                                  revoked=self.sync.revoked)
            except (licenses.RevokedLicense, licenses.WrongModel) as exc:
                raise Refusal(grpc.StatusCode.PERMISSION_DENIED, str(exc)) from None
            except licenses.LicenseError as exc:
                raise Refusal(grpc.StatusCode.UNAUTHENTICATED, str(exc)) from None
            fingerprint = payload.fingerprint_tensor().numpy()
            body = self._forward(route.name, {"data": _npy(fingerprint), "license": signed.to_text().encode()})
            self._outcome(body)
            if body.get("user") != payload.user:
                raise Refusal(grpc.StatusCode.PERMISSION_DENIED, "the served model named another user")
            token, claims = sessions.issue_session(
                self.key, user=payload.user, user_index=payload.user_index, license_id=payload.license_id,
                model_id=route.model_id, ttl_seconds=min(self.config.session_ttl_s, payload.expires_at - time.time()))
            self.limits.add_session(payload.user, claims.session_id, claims.expires_at)
            self.metrics.active_sessions.set(self.limits.active_sessions())
            log.info("session issued user=%s model=%s", payload.user, route.name)
            return gateway_pb2.AuthenticateResponse(session_token=token, user=payload.user,
                                                    user_index=payload.user_index, expires_at=claims.expires_at)

        return self._run("Authenticate", context, run)

    def Predict(self, request, context):
        def run():
            route = self._route(request.model)
            token = dict(context.invocation_metadata()).get("authorization", "")
            if not token.lower().startswith("bearer "):
                raise Refusal(grpc.StatusCode.UNAUTHENTICATED,
                              "no session: call Authenticate and send 'authorization: Bearer <token>'")
            try:
                claims = sessions.verify_session(token[7:].strip(), self.key.public_key(), model_id=route.model_id,
                                                 revoked=self.sync.revoked)
            except sessions.RevokedSession as exc:
                raise Refusal(grpc.StatusCode.PERMISSION_DENIED, str(exc)) from None
            except sessions.SessionError as exc:
                raise Refusal(grpc.StatusCode.UNAUTHENTICATED, str(exc)) from None
            self.limits.admit_call(claims.user)
            try:
                inputs = from_tensor(request.inputs)
            except ValueError as exc:
                raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
            body = self._forward(route.name, {"data": _npy(inputs), "session": token[7:].strip().encode()})
            self._outcome(body)
            return gateway_pb2.PredictResponse(outputs=to_tensor(np.asarray(body["outputs"], dtype=np.float32)),
                                               user=claims.user)

        return self._run("Predict", context, run)

    def ListModels(self, request, context):
        return self._run("ListModels", context, lambda: gateway_pb2.ListModelsResponse(models=[
            gateway_pb2.ModelInfo(name=r.name, model_id=r.model_id, upstreams=len(r.upstreams),
                                  upstreams_up=self.pools[r.name].up_count())
            for r in self.routes.values()]))

    def close(self) -> None:
        self.sync.stop()
        for pool in self.pools.values():
            pool.close()
