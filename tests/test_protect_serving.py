"""Protect what you already serve: an owner's archive and handler, protected, served by a real TorchServe.

The owner's archive is the Fashion-MNIST ResNet as plain TorchScript with the owner's PNG handler
(tests/owner_files/fashion_handler.py), built with plain torch-model-archiver. One TorchServe serves
it unprotected, protected under ``random`` and protected under ``reject``; clients send PNG bytes
over HTTP (as curl would) and over TorchServe's gRPC API.
"""

from __future__ import annotations

import json
import threading
import urllib.request

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from activeguard.cli.app import main
from activeguard.credentials.header import encode_license_header
from activeguard_proto.torchserve import inference_pb2, inference_pb2_grpc
from handlers.server import ManagedTorchServe
from tests.protect_fixtures import FASHION_LABELS, Licensing, png
from tests.serving_fixtures import post

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def served(fashion_archive, tmp_path_factory):
    root, store = fashion_archive["root"], tmp_path_factory.mktemp("store")
    pub = fashion_archive["licensing"].write_public_key(root / "license.pub.pem")
    revoked = fashion_archive["licensing"].write_revocations(root / "revocations.agrevocations")
    common = ["--out-dir", str(store), "--license-key", str(pub), "--revocation-file", str(revoked)]
    common += ["--input-shape", "1,28,28"]  # plain TorchScript does not say what its input is
    (store / "fashion.mar").write_bytes(fashion_archive["mar"].read_bytes())
    assert main(["protect", str(fashion_archive["mar"]), "--name", "guarded", *common]) == 0
    assert main(["protect", str(fashion_archive["mar"]), "--name", "strict", "--policy", "reject", *common]) == 0
    assert main(["protect", str(fashion_archive["mar"]), "--name", "late", *common]) == 0  # registered by a test
    models = {n: f"{n}.mar" for n in ("fashion", "guarded", "strict")}
    config = root / "config.properties"  # the owner's deployment registers models at run time
    config.write_text("enable_model_api=true\n")
    with ManagedTorchServe(store, models, batch_size=8, max_batch_delay_ms=100, owner_config=config) as ts:
        yield {"ts": ts, "revoked": revoked}


def http(ts, model: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, object]:
    """A PNG upload, as curl would send it."""
    return post(f"{ts.url}/predictions/{model}", body, {"Content-Type": "image/png", **(headers or {})})


JSON = {"Content-Type": "application/json"}


def license_header(licensing: Licensing, row: int, user: str) -> dict[str, str]:
    return {"X-ActiveGuard-License": encode_license_header(licensing.license(row, user).to_text())}


def test_licensed_png_clients_get_the_owners_answers_over_http_and_grpc(served, fashion_archive):
    ts, licensing = served["ts"], fashion_archive["licensing"]
    headers = license_header(licensing, 0, "alice")
    stub = inference_pb2_grpc.InferenceAPIsServiceStub(grpc.insecure_channel(ts.grpc_target))
    grpc_license = licensing.license(1, "bob").to_text().encode()
    for image in fashion_archive["images"][:10]:
        body = png(image)
        status, plain = http(ts, "fashion", body)
        assert status == 200 and set(plain) == {"label", "confidence"} and plain["label"] in FASHION_LABELS
        assert http(ts, "guarded", body, headers) == (200, plain)
        assert http(ts, "strict", body, headers) == (200, plain)
        want = stub.Predictions(inference_pb2.PredictionsRequest(model_name="fashion", input={"data": body}))
        got = stub.Predictions(
            inference_pb2.PredictionsRequest(model_name="guarded", input={"data": body, "license": grpc_license})
        )
        assert json.loads(got.prediction) == json.loads(want.prediction) == plain


def test_a_license_in_a_json_body_is_taken_out_before_the_owners_handler(served, fashion_archive):
    """The owner's handler refuses unknown JSON fields: under protect it never sees the license, and
    the licensed answer is the unprotected archive's (never the control layer's)."""
    ts, licensing = served["ts"], fashion_archive["licensing"]
    text = licensing.license(0, "alice").to_text()
    for image in fashion_archive["images"][:6]:
        plain = {"image": image[0].tolist()}
        status, want = post(f"{ts.url}/predictions/fashion", json.dumps(plain).encode(), JSON)
        assert status == 200 and set(want) == {"label", "confidence"}
        body = json.dumps({**plain, "license": text}).encode()
        assert post(f"{ts.url}/predictions/fashion", body, JSON)[0] >= 400  # unprotected: the field reaches it
        for model in ("guarded", "strict"):
            assert post(f"{ts.url}/predictions/{model}", body, JSON) == (200, want)
    forged = Licensing(licensing.model_id, Ed25519PrivateKey.generate(), licensing.users, licensing.fingerprints)
    body = json.dumps(
        {"image": fashion_archive["images"][0][0].tolist(), "license": forged.license(0, "eve").to_text()}
    )
    status, answer = post(f"{ts.url}/predictions/strict", body.encode(), JSON)
    assert status == 403 and answer["reason"] == "bad_signature"


def test_unlicensed_clients_get_chance_labels_under_random_and_403_under_reject(served, fashion_archive):
    ts, images, truth = served["ts"], fashion_archive["images"], fashion_archive["labels"]
    names = [FASHION_LABELS[int(y)] for y in truth]
    headers = license_header(fashion_archive["licensing"], 2, "carol")
    licensed = [http(ts, "guarded", png(x), headers)[1]["label"] for x in images]
    unlicensed = []
    for x in images:
        status, answer = http(ts, "guarded", png(x))
        assert status == 200 and set(answer) == {"label", "confidence"}  # the form of a real answer
        unlicensed.append(answer["label"])
    accuracy = lambda labels: sum(a == b for a, b in zip(labels, names)) / len(names)  # noqa: E731
    assert accuracy(licensed) > 0.6, accuracy(licensed)
    assert accuracy(unlicensed) < 0.3, accuracy(unlicensed)  # chance is 0.1
    assert len(set(unlicensed)) >= 4  # random labels, not one constant answer
    status, answer = http(ts, "strict", png(images[0]))
    assert status == 403 and answer["reason"] == "no_credentials"
    lic = fashion_archive["licensing"]
    forged = license_header(
        Licensing(lic.model_id, Ed25519PrivateKey.generate(), lic.users, lic.fingerprints), 0, "eve"
    )
    status, answer = http(ts, "strict", png(images[0]), forged)
    assert status == 403 and answer["reason"] == "bad_signature"


def test_a_revoked_license_is_refused_without_restart(served, fashion_archive):
    ts, licensing = served["ts"], fashion_archive["licensing"]
    body = png(fashion_archive["images"][0])
    alice, bob = licensing.license(0, "alice"), licensing.license(1, "bob")
    alice_id = alice.parsed().license_id
    headers = {"X-ActiveGuard-License": encode_license_header(alice.to_text())}
    assert http(ts, "strict", body, headers)[0] == 200
    licensing.write_revocations(served["revoked"], alice_id, version=1)
    try:
        status, answer = http(ts, "strict", body, headers)
        assert status == 403 and answer["reason"] == "revoked"
        assert http(ts, "strict", body, {"X-ActiveGuard-License": encode_license_header(bob.to_text())})[0] == 200
    finally:
        licensing.write_revocations(served["revoked"], version=2)


def test_a_request_the_owners_handler_cannot_read_fails_alone(served, fashion_archive):
    """Garbage bytes make the owner's preprocess raise; they share batches with licensed PNGs."""
    ts, licensing = served["ts"], fashion_archive["licensing"]
    headers = license_header(licensing, 0, "alice")
    images = fashion_archive["images"][:6]
    expected = [http(ts, "fashion", png(x))[1] for x in images]
    results: dict[str, tuple] = {}

    def call(key: str, body: bytes, hdrs: dict[str, str]) -> None:
        results[key] = http(ts, "guarded", body, hdrs)

    threads = [threading.Thread(target=call, args=(f"ok{i}", png(x), headers)) for i, x in enumerate(images)]
    threads += [threading.Thread(target=call, args=(f"bad{i}", b"not a png at all" * i, headers)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(3):
        status, answer = results[f"bad{i}"]
        assert status == 400 and answer["reason"] == "malformed_input", answer
    assert [results[f"ok{i}"] for i in range(len(images))] == [(200, e) for e in expected]
    assert ts.worker_status("guarded") == "READY"  # the worker lives on


def test_the_protected_archive_registers_through_the_management_api(served, fashion_archive):
    """Model-store conventions kept: POST /models registers it like any other archive."""
    ts = served["ts"]
    url = f"{ts.management_url}/models?url=late.mar&initial_workers=1&synchronous=true"
    with urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=120) as resp:
        assert resp.status == 200
    body = png(fashion_archive["images"][0])
    expected = http(ts, "fashion", body)
    assert http(ts, "late", body, license_header(fashion_archive["licensing"], 0, "alice")) == expected
    status, answer = http(ts, "late", body)
    assert status == 200 and set(answer) == {"label", "confidence"}
