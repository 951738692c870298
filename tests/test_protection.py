"""The serving guard without a server: credentials, one forward pass, a decision per request."""

import base64
import io
import json
import time

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from activeguard.credentials import licenses, sessions
from activeguard.credentials.control import ControlConfig
from activeguard.credentials.fingerprints import generate_fingerprints
from activeguard.experiments.core_evaluation import seed_images
from activeguard.guard.guard import Guard
from activeguard.guard.outcomes import Request
from activeguard.guard.profile import Profile
from activeguard.models.architectures import model_id
from tests.serving_fixtures import write_revocations

CONFIG = ControlConfig()


@pytest.fixture(scope="module")
def keys():
    return Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()  # license server, gateway


@pytest.fixture(scope="module")
def fps(lenet, mnist):
    return generate_fingerprints(lenet, CONFIG, [4, 17], seed_images(mnist.x_test, 2, 9))


def make_profile(lenet, keys, tmp_path=None, **kw):
    server, gateway = keys
    return Profile(
        model_id=model_id(lenet),
        input_shape=(1, 28, 28),
        license_public_keys={
            licenses.key_id(server.public_key()): licenses.public_key_pem(server.public_key()).decode()
        },
        gateway_public_key=licenses.public_key_pem(gateway.public_key()).decode(),
        revocation_file=str(revocations(tmp_path, server)) if tmp_path else None,
        **kw,
    )


def revocations(tmp_path, key, *revoked: str, version: int = 0):
    """The license server's signed revocation list in ``tmp_path``."""
    path = tmp_path / "revocations.agrevocations"
    write_revocations(path, key, revoked, version)
    return path


def license_text(lenet, keys, fps, row=0, validity=3600, mid=None):
    server, _ = keys
    user_index = int(fps.users[row])
    payload = licenses.make_payload(
        model_id=mid or model_id(lenet),
        user=f"alice-{user_index}",
        user_index=user_index,
        fo=CONFIG.fo_of_user(user_index),
        epsilon=CONFIG.epsilon,
        fingerprint=fps.inputs[row : row + 1],
        key=server,
        validity_seconds=validity,
    )
    return licenses.sign_license(payload, server).to_text()


def body(x):
    return json.dumps({"inputs": x.tolist()}).encode()


def test_licensed_client_gets_the_real_model_and_others_do_not(lenet, mnist, keys, fps, tmp_path):
    guard = Guard(lenet, make_profile(lenet, keys, tmp_path))
    x = mnist.x_test[:50]
    lic = license_text(lenet, keys, fps)
    out = guard.handle([Request(body(x), license=base64.b64encode(lic.encode())), Request(body(x))])
    real = torch.softmax(lenet(x), 1)
    assert out[0].status == 200 and out[0].reason == "authorized" and out[0].user == "alice-4"
    assert torch.allclose(torch.tensor(out[0].body["outputs"]), real, atol=1e-5)
    assert out[1].status == 200 and out[1].reason == "no_credentials"
    assert set(out[1].body) == set(out[0].body) == {"outputs"}  # silent: a refusal looks like an answer
    fake = torch.tensor(out[1].body["outputs"])
    assert (fake.argmax(1) == real.argmax(1)).float().mean() < 0.5


def test_every_refusal_has_its_own_reason(lenet, mnist, keys, fps, tmp_path):
    profile = make_profile(lenet, keys, tmp_path, policy="reject")
    guard = Guard(lenet, profile)
    x = body(mnist.x_test[:2])
    good = license_text(lenet, keys, fps)
    doc = json.loads(good)
    raw = bytearray(base64.b64decode(doc["payload"]))
    raw[len(raw) // 2] ^= 0x01
    tampered = json.dumps(dict(doc, payload=base64.b64encode(bytes(raw)).decode()))
    forged = (
        licenses.sign_license(licenses.LicensePayload.decode(base64.b64decode(doc["payload"])), keys[0])
        .to_text()
        .replace(doc["signature"][:8], "AAAAAAAA")
    )
    other_key = Ed25519PrivateKey.generate()
    cases = {
        "bad_signature": tampered,
        "expired": license_text(lenet, keys, fps, validity=1),
        "wrong_model": license_text(lenet, keys, fps, mid="0" * 64),
        "malformed_license": "{not json",
    }
    time.sleep(1.1)
    out = guard.handle([Request(x, license=v) for v in cases.values()])
    assert [o.reason for o in out] == list(cases)
    assert all(o.status == 403 and "outputs" not in o.body for o in out)
    # forged signature and an unknown signing key
    out = guard.handle([Request(x, license=forged)])
    assert out[0].reason in ("bad_signature", "malformed_license")
    unknown = licenses.make_payload(
        model_id=model_id(lenet),
        user="eve",
        user_index=12,
        fo=CONFIG.fo_of_user(12),
        epsilon=0.01,
        fingerprint=fps.inputs[0:1],
        key=other_key,
        validity_seconds=60,
    )
    out = guard.handle([Request(x, license=licenses.sign_license(unknown, other_key).to_text())])
    assert out[0].reason == "bad_signature"
    # revocation is picked up from the file without a restart
    lic_id = json.loads(base64.b64decode(doc["payload"]))["license_id"]
    assert guard.handle([Request(x, license=good)])[0].reason == "authorized"
    revocations(tmp_path, keys[0], lic_id, version=1)
    assert guard.handle([Request(x, license=good)])[0].reason == "revoked"


def test_license_whose_fingerprint_decodes_to_another_user_is_refused(lenet, mnist, keys, fps):
    server, _ = keys
    # user 17's fingerprint signed as user 4's license: valid signature, wrong FO
    payload = licenses.make_payload(
        model_id=model_id(lenet),
        user="mallory",
        user_index=4,
        fo=CONFIG.fo_of_user(4),
        epsilon=0.01,
        fingerprint=fps.inputs[1:2],
        key=server,
        validity_seconds=60,
    )
    out = Guard(lenet, make_profile(lenet, keys)).handle(
        [Request(body(mnist.x_test[:1]), license=licenses.sign_license(payload, server).to_text())]
    )
    assert out[0].reason == "fo_mismatch"


def test_sessions(lenet, mnist, keys):
    _, gateway = keys
    guard = Guard(lenet, make_profile(lenet, keys))
    token, _ = sessions.issue_session(
        gateway, user="bob", user_index=7, license_id="L1", model_id=model_id(lenet), ttl_seconds=60
    )
    expired, _ = sessions.issue_session(
        gateway, user="bob", user_index=7, license_id="L1", model_id=model_id(lenet), ttl_seconds=-1
    )
    foreign, _ = sessions.issue_session(
        Ed25519PrivateKey.generate(),
        user="bob",
        user_index=7,
        license_id="L1",
        model_id=model_id(lenet),
        ttl_seconds=60,
    )
    out = guard.handle([Request(body(mnist.x_test[:3]), session=f"Bearer {t}") for t in (token, expired, foreign)])
    assert [o.reason for o in out] == ["session_authorized", "expired_session", "bad_session"]
    assert out[0].user == "bob"


def test_paper_mode_identity_from_fingerprint_alone(lenet, mnist, keys, fps):
    guard = Guard(lenet, make_profile(lenet, keys, paper_mode=True))
    req = json.dumps({"inputs": mnist.x_test[:2].tolist(), "fingerprint": fps.inputs[1].tolist()}).encode()
    out = guard.handle([Request(req)])
    assert out[0].reason == "paper_mode_authorized" and out[0].user == "user-17"
    strict = Guard(lenet, make_profile(lenet, keys))  # the default refuses bare fingerprints
    assert strict.handle([Request(req)])[0].reason == "no_credentials"


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"", "empty"),
        (b"\x00\x01garbage", "neither JSON"),
        (b'{"inputs": [[1, 2, 3]]}', "shape"),
        (b'{"inputs": "abc"}', "nested list"),
        (b'{"data": []}', "inputs"),
        (json.dumps({"inputs": np.full((1, 1, 28, 28), np.nan).tolist()}).replace("NaN", "NaN").encode(), "NaN"),
        (b"x" * (5 * 1024 * 1024), "exceeds"),
    ],
)
def test_malformed_bodies_get_400_and_do_not_spoil_the_batch(lenet, mnist, keys, raw, message):
    guard = Guard(lenet, make_profile(lenet, keys))
    out = guard.handle([Request(raw), Request(body(mnist.x_test[:1]))])
    assert out[0].status == 400 and message in out[0].body["error"]
    assert out[1].status == 200 and len(out[1].body["outputs"]) == 1


def test_npy_bodies(lenet, mnist, keys):
    buf = io.BytesIO()
    np.save(buf, mnist.x_test[:4].numpy())
    out = Guard(lenet, make_profile(lenet, keys)).handle([Request(buf.getvalue())])
    assert out[0].status == 200 and len(out[0].body["outputs"]) == 4


class CountingFront:
    """Wraps the guard's front end to count the rows each forward pass runs."""

    def __init__(self, guard):
        self.inner, self.rows = guard.front, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def forward(self, batch):
        self.rows.append(len(batch))
        return self.inner.forward(batch)


def test_a_licenses_fingerprint_runs_once_but_expiry_and_revocation_are_checked_every_time(
    lenet, mnist, keys, fps, tmp_path
):
    guard = Guard(lenet, make_profile(lenet, keys, tmp_path, policy="reject"))
    front = CountingFront(guard)
    x = body(mnist.x_test[:3])
    lic = license_text(lenet, keys, fps)
    first = guard.decide([Request(x, license=lic)], front)
    second = guard.decide([Request(x, license=lic)], front)
    assert [first[0].reason, second[0].reason] == ["authorized", "authorized"]
    assert front.rows == [4, 3]  # the fingerprint's row joined the first pass only
    assert torch.allclose(first[0].outputs, second[0].outputs, atol=1e-5)
    revocations(tmp_path, keys[0], licenses.SignedLicense.from_text(lic).parsed().license_id, version=1)
    assert guard.decide([Request(x, license=lic)], front)[0].reason == "revoked"
    short = license_text(lenet, keys, fps, row=1, validity=2)
    assert guard.decide([Request(x, license=short)], front)[0].reason == "authorized"
    time.sleep(2.1)
    assert guard.decide([Request(x, license=short)], front)[0].reason == "expired"


def test_a_failed_fingerprint_is_checked_again_every_time(lenet, mnist, keys, fps, tmp_path):
    """Only successes are remembered: a license whose fingerprint does not decode pays every time."""
    guard = Guard(lenet, make_profile(lenet, keys, tmp_path, policy="reject"))
    front = CountingFront(guard)
    server, _ = keys
    payload = licenses.make_payload(
        model_id=model_id(lenet),
        user="mallory",
        user_index=int(fps.users[1]),  # bob's FO with alice's fingerprint: decodes to alice, not mallory's FO
        fo=CONFIG.fo_of_user(int(fps.users[1])),
        epsilon=CONFIG.epsilon,
        fingerprint=fps.inputs[0:1],
        key=server,
        validity_seconds=3600,
    )
    lic = licenses.sign_license(payload, server).to_text()
    x = body(mnist.x_test[:1])
    assert [guard.decide([Request(x, license=lic)], front)[0].reason for _ in range(2)] == ["fo_mismatch"] * 2
    assert front.rows == [2, 2]
