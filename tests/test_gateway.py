"""End to end: license server, TorchServe and the gateway as real processes on loopback."""

from __future__ import annotations

import json
import random
import statistics
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch

from activeguard.credentials import licenses, sessions
from activeguard.guard.profile import Profile
from activeguard.models.architectures import predict
from activeguard_proto.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from gateway.client import GatewayClient
from gateway.tensors import to_tensor
from handlers.packaging import package
from handlers.server import ManagedTorchServe
from license_server.client import to_signed
from tests.processes import GatewayProcess, ServerProcess

pytestmark = pytest.mark.slow
POLL_S = 1.0


@pytest.fixture(scope="module")
def stack(lenet, deployment, tmp_path_factory):
    """License server → licenses for alice and bob → .mar trusting both keys → TorchServe → gateway."""
    root = tmp_path_factory.mktemp("gateway")
    ls = ServerProcess(root / "license-server")
    ts = gw = None
    try:
        with ls.client() as admin:
            reg = admin.register_model(
                model_path=str(deployment.model_path), name="mnist", pregenerate=True, fo_scheme="paper"
            )
            mid = reg.profile.model_id
            issued = {user: to_signed(admin.issue(mid, user, 3600)) for user in ("alice", "bob", "carol")}
            pems = {kid: licenses.public_key_pem(key).decode() for kid, key in admin.verification_keys().items()}
        gateway_key_path = root / "gateway.key"
        gateway_key = licenses.generate_signing_key(gateway_key_path)
        revocations = root / "revoked.txt"
        profile = Profile(
            model_id=mid,
            input_shape=(1, 28, 28),
            policy="reject",
            license_public_keys=pems,
            gateway_public_key=licenses.public_key_pem(gateway_key.public_key()).decode(),
            revocation_file=str(revocations),
        )
        store = root / "store"
        package(deployment.model_path, profile, "mnist", store)
        ts = ManagedTorchServe(store, {"mnist": "mnist.mar"}, batch_size=8, max_batch_delay_ms=2).start()
        config = {
            "models": [{"name": "mnist", "model_id": mid, "upstreams": [ts.grpc_target]}],
            "signing_key": str(gateway_key_path),
            "license_server": ls.target,
            "revocation_file": str(revocations),
            "poll_interval_s": POLL_S,
            "session_ttl_s": 60,
            "upstream_deadline_s": 5,
            "rate_per_user_per_s": 10000,
            "max_sessions_per_user": 64,
        }
        (root / "gateway.json").write_text(json.dumps(config))
        gw = GatewayProcess(root / "gateway.json", root)
        channel = grpc.insecure_channel(gw.target)
        state = {
            "ls": ls,
            "ts": ts,
            "gw": gw,
            "channel": channel,
            "licenses": issued,
            "gateway_key": gateway_key,
            "model_id": mid,
        }
        yield state
        channel.close()
        ts = state["ts"]  # a test may have replaced TorchServe with a restarted one: stop that one
    finally:
        for proc in (gw, ts):
            if proc is not None:
                proc.stop()
        ls.stop()


def client(stack, user) -> GatewayClient:
    return GatewayClient(stack["channel"], stack["licenses"][user])


def rpc_code(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code(), info.value.details()


def test_licensed_users_get_the_real_model_with_their_identity(stack, lenet, mnist):
    alice, bob = client(stack, "alice"), client(stack, "bob")
    outputs = np.concatenate([alice.predict("mnist", chunk.numpy()) for chunk in torch.split(mnist.x_test, 250)])
    expected = torch.softmax(predict(lenet, mnist.x_test), 1).numpy()
    assert np.allclose(outputs, expected, atol=1e-5)
    assert alice.user == "alice"
    bob.predict("mnist", mnist.x_test[:2].numpy())
    assert bob.user == "bob"
    models = gateway_pb2_grpc.GatewayStub(stack["channel"]).ListModels(gateway_pb2.ListModelsRequest(), timeout=5)
    assert [(m.name, m.upstreams_up) for m in models.models] == [("mnist", 1)]


def test_bad_credentials_get_the_right_code_and_no_outputs(stack, mnist):
    stub = gateway_pb2_grpc.GatewayStub(stack["channel"])
    request = gateway_pb2.PredictRequest(model="mnist", inputs=to_tensor(mnist.x_test[:2].numpy()))

    def call(token=None):
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        return stub.Predict(request, metadata=metadata, timeout=10)

    assert rpc_code(call)[0] == grpc.StatusCode.UNAUTHENTICATED
    expired, _ = sessions.issue_session(
        stack["gateway_key"], user="alice", user_index=0, license_id="x", model_id=stack["model_id"], ttl_seconds=-1
    )
    code, message = rpc_code(lambda: call(expired))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "expired" in message
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    foreign, _ = sessions.issue_session(
        Ed25519PrivateKey.generate(),
        user="alice",
        user_index=0,
        license_id="x",
        model_id=stack["model_id"],
        ttl_seconds=60,
    )
    assert rpc_code(lambda: call(foreign))[0] == grpc.StatusCode.UNAUTHENTICATED
    lic = stack["licenses"]["alice"]
    raw = bytearray(lic.payload)
    raw[len(raw) // 3] ^= 0x04
    tampered = common_pb2.SignedLicense(payload=bytes(raw), signature=lic.signature, key_id=lic.key_id)
    code, message = rpc_code(
        lambda: stub.Authenticate(gateway_pb2.AuthenticateRequest(model="mnist", license=tampered), timeout=10)
    )
    assert code == grpc.StatusCode.UNAUTHENTICATED and message
    bad_tensor = gateway_pb2.PredictRequest(
        model="mnist", inputs=gateway_pb2.Tensor(data=b"\0" * 7, shape=[1, 1, 28, 28], dtype="float32")
    )
    token = client(stack, "alice").authenticate("mnist")
    code, message = rpc_code(
        lambda: stub.Predict(bad_tensor, metadata=(("authorization", f"Bearer {token}"),), timeout=10)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "bytes" in message
    assert (
        rpc_code(lambda: stub.Predict(gateway_pb2.PredictRequest(model="nope"), timeout=10))[0]
        == grpc.StatusCode.NOT_FOUND
    )


def test_load_8_clients_2000_requests_10_percent_unauthorized(stack, mnist):
    stub = gateway_pb2_grpc.GatewayStub(stack["channel"])
    token = client(stack, "carol").authenticate("mnist")
    x = mnist.x_test[:4].numpy()
    request = gateway_pb2.PredictRequest(model="mnist", inputs=to_tensor(x))
    rng = random.Random(0)
    plan = [rng.random() < 0.1 for _ in range(2000)]  # True: no credentials

    def one(unauthorized: bool):
        start = time.perf_counter()
        try:
            meta = () if unauthorized else (("authorization", f"Bearer {token}"),)
            reply = stub.Predict(request, metadata=meta, timeout=30)
            return unauthorized, "OK", time.perf_counter() - start, len(reply.outputs.data)
        except grpc.RpcError as err:
            return unauthorized, err.code().name, time.perf_counter() - start, 0

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, plan))
    unexpected = [r for r in results if (r[1] != "OK") != r[0] or (r[0] and r[1] != "UNAUTHENTICATED")]
    leaked = [r for r in results if r[0] and r[3] > 0]
    latencies = sorted(r[2] * 1000 for r in results if not r[0])
    print(
        f"\ngateway load: p50 {statistics.median(latencies):.1f} ms, "
        f"p99 {latencies[int(0.99 * (len(latencies) - 1))]:.1f} ms over {len(results)} requests"
    )
    assert unexpected == [] and leaked == []


def test_revocation_kills_sessions_within_the_poll_interval(stack, mnist):
    bob = client(stack, "bob")
    bob.predict("mnist", mnist.x_test[:1].numpy())
    license_id = json.loads(stack["licenses"]["bob"].payload)["license_id"]
    with stack["ls"].client() as admin:
        admin.revoke(license_id, "test")
    revoked_at = time.monotonic()
    deadline = revoked_at + POLL_S + 1.0
    while True:
        try:
            bob.predict("mnist", mnist.x_test[:1].numpy())
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED
            break
        assert time.monotonic() < deadline, "revoked session still served after the poll interval + 1 s"
        time.sleep(0.05)
    code, _ = rpc_code(lambda: client(stack, "bob").authenticate("mnist"))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    metrics = urllib.request.urlopen(stack["gw"].metrics_url, timeout=5).read().decode()
    assert "activeguard_gateway_revocation_sync_age_seconds" in metrics
    assert 'activeguard_gateway_requests_total{code="PERMISSION_DENIED",method="Predict"}' in metrics


def test_torchserve_down_gives_unavailable_and_recovers_without_gateway_restart(stack, mnist):
    alice = client(stack, "alice")
    x = mnist.x_test[:2].numpy()
    alice.predict("mnist", x)
    ts = stack["ts"]
    ts.stop()
    start = time.monotonic()
    code, message = rpc_code(lambda: alice.predict("mnist", x))
    assert code == grpc.StatusCode.UNAVAILABLE and "TorchServe" in message
    assert time.monotonic() - start < 5 + 1  # bounded by the upstream deadline
    restarted = ManagedTorchServe(ts.model_store, ts.models, ports=ts.ports, batch_size=8, max_batch_delay_ms=2)
    stack["ts"] = restarted.start()
    deadline = time.monotonic() + 30
    while True:
        try:
            assert alice.predict("mnist", x).shape == (2, 10)
            break
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline
            time.sleep(0.5)
