"""Revocation enforced by TorchServe alone, with real processes: a license server, a TorchServe whose
handler fetches the server's signed revocation list (no gateway anywhere), and direct HTTP clients."""

from __future__ import annotations

import base64
import json
import time
import urllib.request

import pytest

from activeguard.credentials import licenses as lic
from activeguard.credentials.header import encode_license_header
from activeguard.credentials.revocations import RevocationListError, sign_revocations, verify_revocations
from activeguard.guard.profile import Profile
from license_server.client import to_signed
from tests.serving_fixtures import json_body, post
from tests.test_license_server import model_paths  # noqa: F401 - a fixture

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

REFRESH_S = 1.0


@pytest.fixture(scope="module")
def stack(lenet, model_paths, tmp_path_factory):  # noqa: F811
    """A license server with one registered model and two licenses; TorchServe fetching its revocations."""
    from handlers.packaging import package
    from handlers.server import ManagedTorchServe
    from tests.processes import ServerProcess

    root = tmp_path_factory.mktemp("revocation")
    server = ServerProcess(root / "ls")
    try:
        with server.client() as c:
            registered = c.register_model(model_path=str(model_paths[0]), fo_scheme="paper", pregenerate=True)
            mid = registered.profile.model_id
            issued = [to_signed(c.issue(mid, user, 3600)) for user in ("alice", "bob")]
            public = c.verification_keys()[server.key_id]
        key = lic.public_key_pem(public).decode()
        profile = Profile(
            model_id=mid,
            input_shape=(1, 28, 28),
            policy="reject",  # a refusal is a visible 403 with its reason
            license_public_keys={server.key_id: key},
            revocation_server=server.target,
            revocation_refresh_s=REFRESH_S,
            revocation_max_age_s=3600,
        )
        package(model_paths[0], profile, "guarded", root / "store")
        with ManagedTorchServe(root / "store", {"guarded": "guarded.mar"}, batch_size=4) as ts:
            yield {"server": server, "ts": ts, "licenses": issued, "model_id": mid}
    finally:
        server.stop()


def _ask(stack, signed: lic.SignedLicense, x) -> tuple[int, dict]:
    headers = {"X-ActiveGuard-License": encode_license_header(signed.to_text())}
    return post(f"{stack['ts'].url}/predictions/guarded", json_body(x), headers)


def _age_metric(ts) -> float | None:
    text = urllib.request.urlopen(ts.metrics_url, timeout=10).read().decode()
    values = [
        line.rsplit(" ", 1)[1] for line in text.splitlines() if line.startswith("ActiveGuardRevocationListAgeSeconds")
    ]
    return float(values[-1]) if values else None


def test_a_revocation_reaches_torchserve_within_the_refresh_bound_without_a_gateway(stack, mnist):
    alice, bob = stack["licenses"]
    x = mnist.x_test[:2]
    assert _ask(stack, alice, x)[0] == 200
    with stack["server"].client() as c:
        c.revoke(alice.parsed().license_id, "test: leaked")
    revoked_at = time.monotonic()
    while True:
        status, body = _ask(stack, alice, x)
        if status == 403:
            break
        assert time.monotonic() - revoked_at < 2 * REFRESH_S + 2, "the revocation did not reach the handler in time"
        time.sleep(0.1)
    waited = time.monotonic() - revoked_at
    print(f"\nrevocation reached TorchServe after {waited:.2f} s (refresh {REFRESH_S:g} s)")
    assert body["reason"] == "revoked" and waited <= REFRESH_S + 1.5
    assert _ask(stack, bob, x)[0] == 200  # the others still served
    age = _age_metric(stack["ts"])
    assert age is not None and age < 60  # the handler's list is fresh, and says so


def test_a_killed_license_server_leaves_the_handler_on_its_last_list(stack, mnist):
    """The server goes away: the revoked license stays refused and the others served, on the held list,
    whose age (the metric) grows."""
    alice, bob = stack["licenses"]
    x = mnist.x_test[:1]
    with stack["server"].client() as c:  # idempotent: the revocation holds whatever the test order
        c.revoke(alice.parsed().license_id, "test: leaked")
    time.sleep(REFRESH_S + 0.5)
    stack["server"].kill()
    time.sleep(3 * REFRESH_S)  # several failed fetches
    assert _ask(stack, alice, x)[1]["reason"] == "revoked"
    assert _ask(stack, bob, x)[0] == 200
    first = _age_metric(stack["ts"])
    time.sleep(2)
    deadline = time.monotonic() + 15  # a batch's metrics reach TorchServe's scrape a little after its answer
    while True:
        _ask(stack, bob, x)
        age = _age_metric(stack["ts"])
        if age >= first + 1.5 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert age >= first + 1.5, (first, age)


def test_forged_and_rolled_back_lists_are_refused():
    """A list signed by another key, a tampered one and an older one: none replaces the held list."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from activeguard.guard.revocation import SignedRevocations

    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    keys = {lic.key_id(key.public_key()): key.public_key()}
    texts = iter(
        [
            sign_revocations(["L1"], 5, key),
            sign_revocations([], 9, other),  # forged: another key
            sign_revocations([], 3, key),  # rolled back: older than the held version 5
            None,  # nothing new
        ]
    )
    held = SignedRevocations(lambda: next(texts), keys, refresh_s=1, max_age_s=60, clock=lambda: time.time())
    assert held.refresh() and held.current().revoked == {"L1"}
    for _ in range(2):
        assert not held.refresh()
    assert held.current().revoked == {"L1"} and held.held.version == 5 and held.refused == 2
    assert not held.refresh()
    with pytest.raises(RevocationListError, match="another key|does not trust"):
        verify_revocations(sign_revocations([], 1, other), keys)
    doc = json.loads(sign_revocations(["L1"], 2, key))
    payload = json.loads(base64.b64decode(doc["payload"]))
    payload["revoked"] = []  # un-revoke L1 without the key
    doc["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    with pytest.raises(RevocationListError, match="does not match"):
        verify_revocations(json.dumps(doc), keys)


def test_a_stale_list_fails_closed_or_serves_as_the_profile_says():
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from activeguard.guard.revocation import SignedRevocations

    key = Ed25519PrivateKey.generate()
    keys = {lic.key_id(key.public_key()): key.public_key()}
    now = [1000.0]
    text = sign_revocations(["L1"], 1, key, issued_at=1000)
    for policy, stale in (("refuse", True), ("serve", False)):
        held = SignedRevocations(lambda text=text: text, keys, max_age_s=60, policy=policy, clock=lambda: now[0])
        now[0] = 1030.0
        assert not held.current().stale and held.current().age_s == pytest.approx(30.0)
        now[0] = 1100.0
        state = held.current()
        assert state.stale == stale and state.revoked == {"L1"}
    never = SignedRevocations(lambda: None, keys, policy="refuse")
    assert never.current().stale  # a worker that never held a list refuses
