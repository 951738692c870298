"""The gateway in front of a protected owner's archive: PNG bytes in, the owner's label JSON out.

The owner's Fashion-MNIST archive (the ``fashion_archive`` fixture, tests/protect_fixtures.py) is protected with
``activeguard protect`` trusting the license key and this gateway's key; one real TorchServe serves
it beside the unprotected ``fashion.mar`` (the reference answers, over HTTP as curl would get them),
and the real gateway runs in this process (:func:`gateway.server.start`).
"""

from __future__ import annotations

import urllib.request

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from activeguard.cli.app import main
from activeguard.credentials import licenses, sessions
from activeguard_proto.v1 import gateway_pb2, gateway_pb2_grpc
from gateway import server
from gateway.client import GatewayClient
from gateway.service import GatewayConfig, ModelRoute
from handlers.server import ManagedTorchServe
from tests.protect_fixtures import Licensing, png

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
MAX_PAYLOAD = 64 * 1024  # a 28x28 PNG is under 1 KiB


@pytest.fixture(scope="module")
def stack(fashion_archive, tmp_path_factory):
    root, store = tmp_path_factory.mktemp("gateway"), tmp_path_factory.mktemp("store")
    licensing: Licensing = fashion_archive["licensing"]
    gateway_key = licenses.generate_signing_key(root / "gateway.key")
    gateway_pub = root / "gateway.pub.pem"
    gateway_pub.write_bytes(licenses.public_key_pem(gateway_key.public_key()))
    license_pub = licensing.write_public_key(root / "license.pub.pem")
    revoked = licensing.write_revocations(root / "revocations.agrevocations")
    (store / "fashion.mar").write_bytes(fashion_archive["mar"].read_bytes())
    args = [
        "protect",
        str(fashion_archive["mar"]),
        "--name",
        "guarded",
        "--out-dir",
        str(store),
        "--input-shape",
        "1,28,28",
    ]
    args += ["--license-key", str(license_pub), "--gateway-key", str(gateway_pub), "--revocation-file", str(revoked)]
    assert main(args) == 0
    models = {"fashion": "fashion.mar", "guarded": "guarded.mar"}
    with ManagedTorchServe(store, models, batch_size=4, max_batch_delay_ms=20) as ts:
        config = GatewayConfig(
            # Authenticate over TorchServe's gRPC API, Predict over its HTTP API (content type kept)
            models=[ModelRoute("guarded", licensing.model_id, [ts.grpc_target], http_upstreams=[ts.url])],
            signing_key=root / "gateway.key",
            license_keys_pem=[license_pub.read_text()],
            revocation_file=revoked,
            upstream_deadline_s=30,
            max_payload_bytes=MAX_PAYLOAD,
        )
        grpc_server, service, port, _ = server.start(config)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        try:
            yield {"ts": ts, "channel": channel, "licensing": licensing, "gateway_key": gateway_key}
        finally:
            channel.close()
            grpc_server.stop(grace=1).wait()
            service.close()


def reference(ts: ManagedTorchServe, body: bytes) -> tuple[bytes, str | None]:
    """The unprotected archive's answer over TorchServe's HTTP API: body bytes and Content-Type (or None)."""
    req = urllib.request.Request(f"{ts.url}/predictions/fashion", data=body, headers={"Content-Type": "image/png"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return resp.read(), resp.headers.get("Content-Type")


def rpc_code(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code(), info.value.details()


def test_a_licensed_client_gets_exactly_the_owners_answer(stack, fashion_archive):
    alice = GatewayClient(stack["channel"], stack["licensing"].license(0, "alice"))
    for image in fashion_archive["images"][:8]:
        body = png(image)
        want, want_type = reference(stack["ts"], body)
        got, got_type = alice.predict_payload("guarded", body, "image/png")
        assert got == want and b'"label"' in got
        # TorchServe sends no Content-Type for a handler that set none; the composed handler names
        # the JSON it serialized (handlers.composition.response_bytes)
        assert (got_type, want_type) == ("application/json", None)
    assert alice.user == "alice"
    # a tensor sent to a model whose handler takes PNG bytes: the owner's handler cannot read it
    x = fashion_archive["images"][:1].numpy()
    code, message = rpc_code(lambda: alice.predict("guarded", x))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "malformed input" in message


def test_no_valid_session_is_unauthenticated(stack, fashion_archive):
    stub = gateway_pb2_grpc.GatewayStub(stack["channel"])
    request = gateway_pb2.PredictRequest(
        model="guarded", payload=gateway_pb2.Payload(data=png(fashion_archive["images"][0]), content_type="image/png")
    )
    foreign, _ = sessions.issue_session(
        Ed25519PrivateKey.generate(),
        user="mallory",
        user_index=0,
        license_id="x",
        model_id=stack["licensing"].model_id,
        ttl_seconds=60,
    )
    for metadata in ((), (("authorization", "Bearer not-a-session"),), (("authorization", f"Bearer {foreign}"),)):
        code, _ = rpc_code(lambda m=metadata: stub.Predict(request, metadata=m, timeout=30))
        assert code == grpc.StatusCode.UNAUTHENTICATED
    lic = stack["licensing"]
    forged = Licensing(lic.model_id, Ed25519PrivateKey.generate(), lic.users, lic.fingerprints).license(0, "eve")
    code, _ = rpc_code(lambda: GatewayClient(stack["channel"], forged).predict_payload("guarded", b"x", "image/png"))
    assert code == grpc.StatusCode.UNAUTHENTICATED


def test_empty_oversized_and_unlabelled_payloads_are_invalid(stack, fashion_archive):
    bob = GatewayClient(stack["channel"], stack["licensing"].license(1, "bob"))
    cases = [(b"", "image/png", "empty"), (b"\0" * (MAX_PAYLOAD + 1), "image/png", f"at most {MAX_PAYLOAD}")]
    cases.append((png(fashion_archive["images"][0]), "png", "media type"))
    for data, kind, message in cases:
        code, details = rpc_code(lambda d=data, k=kind: bob.predict_payload("guarded", d, k))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and message in details


def test_garbage_bytes_are_invalid_and_the_next_call_still_works(stack, fashion_archive):
    carol = GatewayClient(stack["channel"], stack["licensing"].license(2, "carol"))
    code, message = rpc_code(lambda: carol.predict_payload("guarded", b"not a png at all", "image/png"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "malformed input" in message
    body = png(fashion_archive["images"][1])
    assert carol.predict_payload("guarded", body, "image/png")[0] == reference(stack["ts"], body)[0]
    assert stack["ts"].worker_status("guarded") == "READY"
