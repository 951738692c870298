"""A small Python client: authenticate once with a license, predict with numpy (or send a model's
own payload bytes), re-authenticate transparently when the session expires.

Two modes. **Proxy** (:class:`GatewayClient`): every prediction goes through the gateway, which
forwards it to TorchServe. **Direct** (:class:`DirectClient`): the gateway only authenticates and
hands out the session; predictions go straight to TorchServe's HTTP API with that session, and the
handler checks it (signature, expiry, model, revocation), so no tensor passes through the gateway.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import numpy as np

from activeguard.credentials import licenses
from activeguard.guard import outcomes
from activeguard_proto.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from gateway.errors import handler_refusal
from gateway.tensors import from_tensor, to_tensor

# gRPC's own retries (gRFC A6) through the channel's service config: a call that fails UNAVAILABLE (a
# gateway replica killed or restarting, TorchServe unavailable behind it, a stale revocation list) is
# sent again, with jittered backoff, to the next gateway the target names (round_robin skips dead
# ones). Authenticate and Predict change nothing on the server, so a retry is always safe.
RETRY_SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [
        {
            "name": [{"service": "activeguard.v1.Gateway"}],
            "retryPolicy": {
                "maxAttempts": 5,
                "initialBackoff": "0.1s",
                "maxBackoff": "1s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
}


def channel_options(service_config: dict | None = RETRY_SERVICE_CONFIG) -> list[tuple[str, object]]:
    """``grpc.insecure_channel(target, options=channel_options())``: the retry policy above."""
    if service_config is None:
        return []
    return [("grpc.service_config", json.dumps(service_config)), ("grpc.enable_retries", 1)]


# What the gateway passes on when a model protected with its owner's handler (`activeguard protect`) cannot
# read a request: that handler reads its own payload format (an image, text ...), not a tensor's .npy bytes.
OWNER_HANDLER_REFUSAL = "the model's handler"


class PayloadModelError(grpc.RpcError, ValueError):
    """``predict`` (a tensor) to a model whose own handler reads payloads: use ``predict_payload``.

    Still the gateway's INVALID_ARGUMENT (``code()``, ``details()``), for callers that catch ``grpc.RpcError``."""

    def __init__(self, model: str, refusal: grpc.RpcError):
        self.model, self.refusal = model, refusal
        super().__init__(
            f"model {model!r} is served with its owner's handler, which reads its own payload format, not a "
            f"tensor ({refusal.details()}): send the bytes it reads with "
            f"predict_payload({model!r}, data, content_type)"
        )

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.INVALID_ARGUMENT

    def details(self) -> str:
        return str(self)


class GatewayClient:
    def __init__(self, channel: grpc.Channel, license: licenses.SignedLicense, *, timeout: float = 30.0):
        self.stub = gateway_pb2_grpc.GatewayStub(channel)
        self.license = license
        self.timeout = timeout
        self._sessions: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()
        self.user: str | None = None

    def authenticate(self, model: str) -> str:
        signed = common_pb2.SignedLicense(
            payload=self.license.payload, signature=self.license.signature, key_id=self.license.key_id
        )
        reply = self.stub.Authenticate(
            gateway_pb2.AuthenticateRequest(model=model, license=signed), timeout=self.timeout
        )
        with self._lock:
            self._sessions[model] = (reply.session_token, reply.expires_at)
        self.user = reply.user
        return reply.session_token

    def session(self, model: str) -> str:
        """This client's session token for ``model`` (authenticating when it has none or it is about to
        expire): what direct mode sends to TorchServe as ``Authorization: Bearer <token>``."""
        return self._token(model)

    def forget(self, model: str) -> None:
        """Drop the session for ``model``; the next call authenticates again."""
        with self._lock:
            self._sessions.pop(model, None)

    def _token(self, model: str) -> str:
        with self._lock:
            token, expires = self._sessions.get(model, ("", 0.0))
        return token if token and expires - time.time() > 1.0 else self.authenticate(model)

    def predict(self, model: str, inputs: np.ndarray) -> np.ndarray:
        """The model's outputs for a tensor (ActiveGuard's tensor handler). A model protected with its
        owner's handler takes that handler's payloads instead: :class:`PayloadModelError` says so."""
        try:
            reply = self._predict(gateway_pb2.PredictRequest(model=model, inputs=to_tensor(inputs)))
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.INVALID_ARGUMENT and OWNER_HANDLER_REFUSAL in (err.details() or ""):
                raise PayloadModelError(model, err) from None
            raise
        if reply.WhichOneof("body") != "outputs":
            raise ValueError(f"model {model!r} answered a payload, not a tensor: call predict_payload")
        return from_tensor(reply.outputs)

    def predict_payload(self, model: str, data: bytes, content_type: str) -> tuple[bytes, str]:
        """(answer bytes, content type) for a payload sent to a model protected with its owner's
        handler: the bytes reach that handler as an HTTP body would, and its answer comes back as-is."""
        payload = gateway_pb2.Payload(data=data, content_type=content_type)
        reply = self._predict(gateway_pb2.PredictRequest(model=model, payload=payload))
        if reply.WhichOneof("body") != "payload":
            raise ValueError(f"model {model!r} answered a tensor, not a payload: call predict")
        return reply.payload.data, reply.payload.content_type

    def _predict(self, request: gateway_pb2.PredictRequest) -> gateway_pb2.PredictResponse:
        """Predict with this client's session for the model; an expired session is renewed once."""
        model = request.model
        for attempt in range(2):
            metadata = (("authorization", f"Bearer {self._token(model)}"),)
            try:
                return self.stub.Predict(request, metadata=metadata, timeout=self.timeout)
            except grpc.RpcError as err:  # an expired session: authenticate again, once
                if (
                    attempt == 0
                    and err.code() == grpc.StatusCode.UNAUTHENTICATED
                    and "expired" in (err.details() or "")
                ):
                    with self._lock:
                        self._sessions.pop(model, None)
                    continue
                raise
        raise AssertionError("unreachable")


def connect(
    target: str, license_path: str | Path, *, service_config: dict | None = RETRY_SERVICE_CONFIG, **kw
) -> GatewayClient:
    """``connect("127.0.0.1:50071", "alice.aglicense")``: a channel with :data:`RETRY_SERVICE_CONFIG`.

    ``target`` may name several gateways (``ipv4:10.0.0.1:50071,10.0.0.2:50071``, or a DNS name with
    several addresses): calls are spread over them and a failed one is retried on another."""
    channel = grpc.insecure_channel(target, options=channel_options(service_config))
    return GatewayClient(channel, licenses.read_license(license_path), **kw)


class DirectModeError(grpc.RpcError, RuntimeError):
    """A direct-mode refusal, with the gRPC code the gateway would have given it (``code()``,
    ``details()``), so callers handle both modes alike; ``reason`` is the handler's own."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str = "", status: int = 0):
        self._code, self.reason, self.status = code, reason, status
        super().__init__(message)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return str(self)


class DirectClient:
    """Direct mode: the gateway authenticates (``Authenticate``, once per session) and TorchServe serves.

    ``torchserve`` is one or more TorchServe inference URLs (``http://10.0.0.5:8080``: a load
    balancer, or each replica). Requests go out on kept-alive HTTP connections, one per thread and
    replica, spread round-robin over the replicas; a replica that cannot answer (connection refused
    or reset, HTTP 502/503/504) is skipped and the request sent to the next,
    each replica once. An expired session is renewed once through the gateway. Refusals raise
    :class:`DirectModeError` with the gateway's code for the same reason.

    ``DirectClient(connect("gw:50071", "alice.aglicense"), ["http://ts:8080"]).predict("mnist", x)``
    """

    RETRY_STATUSES = frozenset({502, 503, 504})

    def __init__(self, gateway: GatewayClient, torchserve: str | Sequence[str], *, timeout: float = 30.0):
        urls = [torchserve] if isinstance(torchserve, str) else list(torchserve)
        if not urls:
            raise ValueError("name at least one TorchServe inference URL")
        self.gateway, self.timeout = gateway, timeout
        self.replicas = [urlsplit(u if "//" in u else f"http://{u}") for u in urls]
        self._local = threading.local()
        self._all: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def predict(self, model: str, inputs: np.ndarray) -> np.ndarray:
        """The model's outputs for a tensor (ActiveGuard's tensor handler), as ``GatewayClient.predict``."""
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(inputs, dtype=np.float32))
        answer = self._post(model, buf.getvalue(), "application/octet-stream")
        if "outputs" not in answer:
            raise ValueError(f"model {model!r} answered a payload, not a tensor: call predict_payload")
        return np.asarray(answer["outputs"], dtype=np.float32)

    def predict_payload(self, model: str, data: bytes, content_type: str) -> tuple[bytes, str]:
        """(answer bytes, content type) from a model protected with its owner's handler."""
        answer = self._post(model, data, content_type)
        if "payload_b64" not in answer:
            raise ValueError(f"model {model!r} answered a tensor, not a payload: call predict")
        return base64.b64decode(answer["payload_b64"]), answer.get("content_type") or "application/octet-stream"

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()

    def __enter__(self) -> DirectClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _post(self, model: str, body: bytes, content_type: str) -> dict:
        """The handler's JSON answer for this session, renewing an expired session once."""
        for attempt in range(2):
            headers = {"Authorization": f"Bearer {self.gateway.session(model)}", "Content-Type": content_type}
            status, raw = self._send(f"/predictions/{model}", body, headers)
            try:
                answer = json.loads(raw)
            except ValueError:
                raise DirectModeError(
                    grpc.StatusCode.INTERNAL, f"TorchServe answered HTTP {status} without JSON", status=status
                ) from None
            decision = answer.get(outcomes.EXPLANATION) if isinstance(answer, dict) else None
            if status == 200 and isinstance(decision, dict) and decision.get("authorized"):
                return answer
            reason = (decision or {}).get("reason") or (answer.get("reason") if isinstance(answer, dict) else "")
            if attempt == 0 and reason == outcomes.EXPIRED_SESSION:
                self.gateway.forget(model)
                continue
            refusal = handler_refusal(str(reason or ""), answer.get("error") if isinstance(answer, dict) else None)
            raise DirectModeError(refusal.code, refusal.message, str(reason or ""), status)
        raise AssertionError("unreachable")

    def _send(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        """(status, body) from the first replica that answers, starting with the next in turn."""
        start = self._next()
        failure = ""
        for k in range(len(self.replicas)):
            i = (start + k) % len(self.replicas)
            conn = self._conn(i)
            try:
                conn.request("POST", path, body=body, headers=headers)
                response = conn.getresponse()
                raw = response.read()
            except (OSError, http.client.HTTPException) as err:
                conn.close()  # reconnects on its next use
                failure = f"{self.replicas[i].netloc}: {type(err).__name__}"
                continue
            if response.status in self.RETRY_STATUSES:
                failure = f"{self.replicas[i].netloc}: HTTP {response.status}"
                continue
            return response.status, raw
        raise DirectModeError(grpc.StatusCode.UNAVAILABLE, f"no TorchServe replica could answer ({failure})")

    def _next(self) -> int:
        turn = getattr(self._local, "turn", -1) + 1
        self._local.turn = turn
        return turn

    def _conn(self, i: int) -> http.client.HTTPConnection:
        conns = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        if i not in conns:
            replica = self.replicas[i]
            conns[i] = http.client.HTTPConnection(replica.hostname, replica.port or 80, timeout=self.timeout)
            with self._lock:
                self._all.append(conns[i])
        return conns[i]
