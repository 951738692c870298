"""The gateway's Python client against a real gateway (gRPC, its own service code) whose TorchServe is a
stand-in HTTP server answering as ActiveGuard's handler does: a tensor sent with ``predict`` to a model
protected with its owner's handler is refused with an error that names ``predict_payload``; other malformed
inputs keep the handler's own account. Also: the gateway binds the metrics port its config names."""

from __future__ import annotations

import http.server
import json
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from activeguard.credentials import licenses, sessions
from gateway import server
from gateway.client import GatewayClient, PayloadModelError
from gateway.service import GatewayConfig, ModelRoute
from handlers.server import free_port

MODEL_ID = "c" * 64


def refusal(error: str) -> bytes:
    """The handler's 400 for a gateway-attested request whose input it cannot read."""
    explanation = {"authorized": False, "reason": "malformed_input"}
    return json.dumps({"error": error, "reason": "malformed_input", "activeguard": explanation}).encode()


ANSWERS = {  # model -> what its handler answers a tensor
    # activeguard protect: the owner's handler reads PNG, and the .npy bytes of a tensor are not one
    "fashion": refusal("the model's handler could not read this request (UnidentifiedImageError)"),
    # ActiveGuard's tensor handler, sent a tensor of the wrong shape
    "mnist": refusal("inputs must have shape (N, 1, 28, 28), got (2, 3)"),
}


class TorchServe(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        answer = ANSWERS[self.path.rsplit("/", 1)[-1]]
        self.send_response(400)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    root = tmp_path_factory.mktemp("gateway-client")
    torchserve = http.server.ThreadingHTTPServer(("127.0.0.1", 0), TorchServe)
    threading.Thread(target=torchserve.serve_forever, daemon=True).start()
    http_upstream = f"http://127.0.0.1:{torchserve.server_port}"
    metrics_port = free_port()
    config = GatewayConfig(
        models=[ModelRoute(name, MODEL_ID, ["127.0.0.1:1"], [http_upstream]) for name in ANSWERS],
        signing_key=root / "gateway.key",
        metrics_port=metrics_port,
    )
    grpc_server, service, port, bound_metrics = server.start(config)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield {"channel": channel, "service": service, "metrics_port": metrics_port, "bound_metrics": bound_metrics}
    channel.close()
    grpc_server.stop(grace=None).wait()
    service.close()
    torchserve.shutdown()
    torchserve.server_close()


def client(gateway) -> GatewayClient:
    """A client holding a live session for every model (as Authenticate would have given it)."""
    license = licenses.SignedLicense(b"{}", b"", "")  # never sent: the sessions below stand in
    c = GatewayClient(gateway["channel"], license)
    for model in ANSWERS:
        token, claims = sessions.issue_session(
            gateway["service"].key, user="alice", user_index=0, license_id="L1", model_id=MODEL_ID, ttl_seconds=600
        )
        c._sessions[model] = (token, claims.expires_at)
    return c


def test_a_tensor_to_an_owner_handler_model_names_predict_payload(gateway):
    with pytest.raises(PayloadModelError) as info:
        client(gateway).predict("fashion", np.zeros((1, 1, 28, 28), np.float32))
    message = str(info.value)
    assert "predict_payload('fashion', data, content_type)" in message
    assert "owner's handler" in message and "UnidentifiedImageError" in message
    # still the gateway's INVALID_ARGUMENT for callers that catch grpc.RpcError
    assert isinstance(info.value, grpc.RpcError) and isinstance(info.value, ValueError)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed input" in info.value.details()


def test_a_malformed_tensor_to_a_tensor_model_keeps_the_handlers_account(gateway):
    with pytest.raises(grpc.RpcError) as info:
        client(gateway).predict("mnist", np.zeros((2, 3), np.float32))
    assert not isinstance(info.value, PayloadModelError)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "refused: malformed input: inputs must have shape (N, 1, 28, 28), got (2, 3)"


def test_the_gateway_binds_the_metrics_port_of_its_config(gateway):
    assert gateway["bound_metrics"] == gateway["metrics_port"]
    deadline = time.monotonic() + 10
    while True:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{gateway['metrics_port']}/metrics", timeout=5).read()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert b"activeguard_gateway_requests" in text


def test_a_foreign_session_is_not_mistaken_for_a_payload_model(gateway):
    """Only INVALID_ARGUMENT from the owner's handler becomes PayloadModelError; a bad session stays itself."""
    c = client(gateway)
    foreign, claims = sessions.issue_session(
        Ed25519PrivateKey.generate(), user="eve", user_index=0, license_id="L2", model_id=MODEL_ID, ttl_seconds=600
    )
    c._sessions["fashion"] = (foreign, claims.expires_at)
    with pytest.raises(grpc.RpcError) as info:
        c.predict("fashion", np.zeros((1, 1, 28, 28), np.float32))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED and not isinstance(info.value, PayloadModelError)


class _Sessions:
    """The session source DirectClient asks: numbered tokens, renewed when forgotten."""

    def __init__(self):
        self.issued = 0

    def session(self, model: str) -> str:
        return f"token-{self.issued}"

    def forget(self, model: str) -> None:
        self.issued += 1


def test_direct_mode_skips_a_dead_replica_renews_an_expired_session_and_names_refusals():
    """DirectClient against stand-ins answering as the handler does: the first replica's port is
    closed, the live one calls token-0 expired, admits token-1 and then refuses it as revoked."""
    from gateway.client import DirectClient, DirectModeError

    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the stdlib's name
            self.rfile.read(int(self.headers["Content-Length"]))
            token = self.headers["Authorization"].removeprefix("Bearer ")
            seen.append(token)
            if token == "token-0":
                status, reason = 401, "expired_session"
            elif len(seen) <= 2:
                status, reason = 200, "session_authorized"
            else:
                status, reason = 403, "revoked"
            decision = {"authorized": status == 200, "reason": reason}
            body = {"outputs": [[0.25, 0.75]]} if status == 200 else {"error": reason, "reason": reason}
            body["activeguard"] = decision
            raw = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *args):
            pass

    live = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=live.serve_forever, daemon=True).start()
    sessions_ = _Sessions()
    try:
        urls = [f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{live.server_address[1]}"]
        with DirectClient(sessions_, urls, timeout=5) as client:
            assert client.predict("mnist", np.zeros((1, 1, 28, 28), np.float32)).tolist() == [[0.25, 0.75]]
            assert seen == ["token-0", "token-1"] and sessions_.issued == 1  # renewed once
            with pytest.raises(DirectModeError) as refused:
                client.predict("mnist", np.zeros((1, 1, 28, 28), np.float32))
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert (refused.value.reason, refused.value.status) == ("revoked", 403)
            assert isinstance(refused.value, grpc.RpcError)
        with DirectClient(sessions_, urls[:1], timeout=5) as dead, pytest.raises(DirectModeError) as down:
            dead.predict("mnist", np.zeros((1, 1, 28, 28), np.float32))
        assert down.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        live.shutdown()
