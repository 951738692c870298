"""A small Python client: authenticate once with a license, predict with numpy (or send a model's
own payload bytes), re-authenticate transparently when the session expires."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import numpy as np

from activeguard.credentials import licenses
from activeguard_proto.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from gateway.tensors import from_tensor, to_tensor

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


def connect(target: str, license_path: str | Path, **kw) -> GatewayClient:
    """``connect("127.0.0.1:50071", "alice.aglicense")``."""
    return GatewayClient(grpc.insecure_channel(target), licenses.read_license(license_path), **kw)
