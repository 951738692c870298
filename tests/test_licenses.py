"""Core license format: canonical payload, Ed25519 signatures, refusals, key and license files."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
import torch

from activeguard.credentials import licenses as lic
from activeguard.credentials.control import ControlConfig
from activeguard.credentials.fingerprints import authenticate, generate_fingerprints
from activeguard.credentials.fo_space import FO
from activeguard.models.architectures import input_shape, model_id


@pytest.fixture(scope="module")
def key(tmp_path_factory):
    return lic.generate_signing_key(tmp_path_factory.mktemp("key") / "signing.pem")


def _payload(key, *, validity=3600, now=None, mid="m" * 64, fp=None):
    fp = torch.rand(1, 1, 28, 28) if fp is None else fp
    return lic.make_payload(
        model_id=mid,
        user="alice",
        user_index=4,
        fo=FO(1, 0.3),
        epsilon=0.01,
        fingerprint=fp,
        key=key,
        validity_seconds=validity,
        now=now,
    )


def test_sign_verify_roundtrip_and_canonical_bytes(key):
    payload = _payload(key)
    signed = lic.sign_license(payload, key)
    assert signed.key_id == lic.key_id(key.public_key()) == payload.key_id and len(signed.key_id) == 16
    again = lic.LicensePayload.decode(signed.payload)
    assert again == payload and again.encode() == signed.payload
    verified = lic.verify_license(signed, key.public_key(), model_id="m" * 64)
    assert verified.user == "alice" and verified.fo == (1, 0.3)
    assert torch.equal(verified.fingerprint_tensor(), payload.fingerprint_tensor())


@pytest.mark.parametrize("where", ["payload", "signature"])
def test_any_altered_byte_is_refused(key, where):
    signed = lic.sign_license(_payload(key), key)
    for pos in (0, 40, -3):
        data = bytearray(getattr(signed, where))
        data[pos] ^= 0x01
        bad = lic.SignedLicense(**{**signed.__dict__, where: bytes(data)})
        with pytest.raises(lic.TamperedLicense):
            lic.verify_license(bad, key.public_key())


def test_refusal_reasons(key, tmp_path):
    signed = lic.sign_license(_payload(key, validity=10, now=1000), key)
    with pytest.raises(lic.ExpiredLicense):
        lic.verify_license(signed, key.public_key(), now=1010)
    assert lic.verify_license(signed, key.public_key(), now=1009).license_id
    with pytest.raises(lic.NotYetValid):
        lic.verify_license(signed, key.public_key(), now=800)
    with pytest.raises(lic.WrongModel):
        lic.verify_license(signed, key.public_key(), model_id="x" * 64, now=1005)
    other = lic.generate_signing_key(tmp_path / "other.pem")
    with pytest.raises(lic.UnknownKey):
        lic.verify_license(signed, other.public_key(), now=1005)
    with pytest.raises(lic.RevokedLicense):
        lic.verify_license(signed, key.public_key(), revoked={signed.parsed().license_id}, now=1005)
    # A key id swapped outside the signature is caught too.
    forged = lic.SignedLicense(signed.payload, other.sign(lic.DOMAIN + signed.payload), lic.key_id(other.public_key()))
    with pytest.raises(lic.TamperedLicense):
        lic.verify_license(forged, {lic.key_id(other.public_key()): other.public_key()}, now=1005)
    with pytest.raises(ValueError):
        _payload(key, validity=-1)
    with pytest.raises(ValueError, match="batch of one"):
        _payload(key, fp=torch.rand(2, 1, 28, 28))


def test_license_and_key_files_are_private(key, tmp_path):
    signed = lic.sign_license(_payload(key), key)
    path = lic.write_license(signed, tmp_path / "alice.aglicense")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert lic.read_license(path) == signed
    with pytest.raises(lic.MalformedLicense):
        lic.SignedLicense.from_text("not a license")
    key_path = tmp_path / "k.pem"
    k, created = lic.load_or_create_signing_key(key_path)
    assert created and stat.S_IMODE(key_path.stat().st_mode) == 0o600
    k2, created2 = lic.load_or_create_signing_key(key_path)
    assert not created2 and lic.key_id(k2.public_key()) == lic.key_id(k.public_key())
    os.chmod(key_path, 0o644)
    with pytest.raises(lic.KeyFileError, match="chmod 600"):
        lic.load_signing_key(key_path)
    with pytest.raises(lic.KeyFileError):
        lic.generate_signing_key(key_path)


def test_signed_fingerprint_authenticates_through_control_layer(lenet, key):
    config = ControlConfig()
    fps = generate_fingerprints(lenet, config, [7], input_shape=input_shape(lenet), seed=3)
    assert bool(fps.success[0])
    signed = lic.sign_license(
        lic.make_payload(
            model_id=model_id(lenet),
            user="bob",
            user_index=7,
            fo=config.fo_of_user(7),
            epsilon=config.epsilon,
            fingerprint=fps.inputs[0:1],
            key=key,
            validity_seconds=60,
        ),
        key,
    )
    payload = lic.verify_license(
        lic.SignedLicense.from_text(signed.to_text()), key.public_key(), model_id=model_id(lenet)
    )
    ok, user = authenticate(lenet, payload.fingerprint_tensor(), config)
    assert bool(ok[0]) and int(user[0]) == 7


def test_core_does_not_import_server_packages():
    code = (
        "import sys, activeguard.credentials.licenses; bad = [m for m in sys.modules if m.split('.')[0] in "
        "('grpc', 'license_server', 'activeguard_proto', 'sqlalchemy')]; print(bad); sys.exit(bool(bad))"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0
