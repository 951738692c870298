"""Property-based fuzzing of every parser a client can reach: the guard (bodies and credentials,
mixed into batches with licensed requests), license and session parsing, the gateway's tensors.

Example counts are bounded and derandomized so CI is stable; raise ``FUZZ_EXAMPLES`` locally for a
longer hunt (``FUZZ_EXAMPLES=5000 pytest tests/test_fuzz_parsers.py``).
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from activeguard.credentials import licenses, sessions
from activeguard.credentials.header import decode_license_header
from activeguard.guard import outcomes as protection
from activeguard.guard.guard import Guard
from activeguard.guard.outcomes import Request
from activeguard_proto.v1 import gateway_pb2
from gateway.tensors import from_tensor, to_tensor
from tests.fuzzing import FUZZ
from tests.serving_fixtures import json_body

# -- strategies ---------------------------------------------------------------------------------

json_leaves = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20)
json_trees = st.recursive(
    json_leaves,
    lambda kids: st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=8), kids, max_size=5),
    max_leaves=30,
)
credentials = (
    st.none()
    | st.text(max_size=200)
    | st.binary(max_size=200)
    | st.integers()
    | json_trees
    | st.just("")
    | st.just(b"")
    | st.just("Bearer ")
    | st.just("v1.e30.AAAA")
)
npy_dtypes = st.sampled_from(["<f4", "<f8", ">f4", "|u1", "<i8", "|b1", "<c8", "|O", "<U3", "V8", "zz"])
npy_shapes = st.lists(st.integers(min_value=-3, max_value=10**13) | st.sampled_from([1, 28]), max_size=6)


def npy_bytes(descr: str, shape: list[int], fortran: bool, tail: bytes) -> bytes:
    """An .npy file whose header says anything at all, followed by arbitrary data."""
    header = f"{{'descr': {descr!r}, 'fortran_order': {fortran!r}, 'shape': {tuple(shape)}, }}"
    header += " " * ((64 - (10 + len(header) + 1) % 64) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode("latin1") + tail


bodies = st.one_of(
    st.binary(max_size=300),
    json_trees.map(lambda t: json.dumps(t).encode()),
    json_trees,  # what TorchServe hands over after decoding an application/json body itself
    st.builds(lambda inputs, lic: json.dumps({"inputs": inputs, "license": lic}).encode(), json_trees, json_trees),
    st.builds(lambda lic: {"inputs": [[[[0.5] * 28] * 28]], "license": lic}, credentials),
    st.builds(npy_bytes, npy_dtypes, npy_shapes, st.booleans(), st.binary(max_size=64)),
    st.integers(min_value=1, max_value=5000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(min_value=1, max_value=3000).map(lambda n: ('{"inputs": ' + "[" * n + "]" * n + "}").encode()),
)
hostile_requests = st.builds(Request, body=bodies, license=credentials, session=credentials, explain=credentials)


# -- the guard ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def licensed(deployment, lenet, mnist):
    """A reject-policy guard, one valid licensed request and the exact outputs it must get."""
    guard = Guard(lenet, deployment.profile(policy="reject"))
    x = mnist.x_test[:2]
    request = Request(json_body(x), license=deployment.license(0))
    with torch.no_grad():
        expected = torch.softmax(lenet(x), 1)
    return guard, request, expected


@FUZZ
@given(hostile=st.lists(hostile_requests, min_size=1, max_size=6), where=st.integers(0, 6))
def test_hostile_requests_never_disturb_licensed_ones(licensed, hostile, where):
    guard, good, expected = licensed
    batch = list(hostile)
    position = min(where, len(batch))
    batch.insert(position, good)
    outcomes = guard.handle(batch)  # nothing may escape
    assert len(outcomes) == len(batch)
    admitted = outcomes[position]
    assert admitted.status == 200 and admitted.reason == protection.AUTHORIZED
    assert torch.allclose(torch.tensor(admitted.body["outputs"]), expected, atol=1e-5)
    for i, outcome in enumerate(outcomes):
        if i == position:
            continue
        # every bad request gets its own 4xx and reason; a 500 would mean a parser bug
        assert outcome.status in (400, 403), (batch[i], outcome)
        assert outcome.reason in protection.REFUSED_REASONS and outcome.body["reason"] == outcome.reason
        assert "outputs" not in outcome.body


@FUZZ
@given(descr=npy_dtypes, shape=npy_shapes, fortran=st.booleans(), tail=st.binary(max_size=64))
def test_npy_headers_are_checked_before_any_allocation(licensed, descr, shape, fortran, tail):
    guard = licensed[0]
    raw = npy_bytes(descr, shape, fortran, tail)
    try:
        x, _ = guard.parser.parse(raw)
    except protection.InputError as exc:
        assert str(exc)
        return
    assert tuple(x.shape[1:]) == (1, 28, 28) and torch.isfinite(x).all()


def test_a_huge_declared_npy_is_refused_by_its_header(licensed):
    raw = npy_bytes("<f4", [10**13, 1, 28, 28], False, b"\0" * 16)  # 192 bytes claiming 30 PB
    with pytest.raises(protection.InputError, match="rows per request|declares"):
        licensed[0].parser.parse(raw)


def test_valid_npy_layouts_round_trip(licensed, mnist):
    x = mnist.x_test[:3].numpy()
    for array in (x, np.asfortranarray(x), x.astype(">f8")):
        buf = io.BytesIO()
        np.save(buf, array)
        assert np.allclose(licensed[0].parser.parse(buf.getvalue())[0].numpy(), x)


# -- licenses and sessions ------------------------------------------------------------------------

SESSION_KEY = Ed25519PrivateKey.generate()


@FUZZ
@given(raw=credentials)
def test_license_parsing_raises_only_license_errors(raw):
    try:
        text = decode_license_header(raw)
        signed = licenses.SignedLicense.from_text(text)
        licenses.verify_license(signed, {"k": SESSION_KEY.public_key()})
    except licenses.LicenseError as exc:
        assert exc.reason


@FUZZ
@given(
    payload=st.binary(max_size=400) | json_trees.map(lambda t: json.dumps(t).encode()),
    signature=st.binary(max_size=80),
    key_id=st.text(max_size=20),
)
def test_signed_license_fields_raise_only_license_errors(payload, signature, key_id):
    with pytest.raises(licenses.LicenseError):
        licenses.verify_license(licenses.SignedLicense(payload, signature, key_id), {key_id: SESSION_KEY.public_key()})
    try:
        licenses.LicensePayload.decode(payload)
    except licenses.MalformedLicense:
        pass


@FUZZ
@given(token=credentials.filter(lambda t: isinstance(t, str)), claims=json_trees)
def test_session_parsing_raises_only_session_errors(token, claims):
    with pytest.raises(sessions.SessionError):
        sessions.verify_session(token, SESSION_KEY.public_key())
    # a correctly signed token whose claims are arbitrary JSON: still only a SessionError
    body = json.dumps(claims, sort_keys=True).encode()
    signed = f"v1.{sessions._b64(body)}.{sessions._b64(SESSION_KEY.sign(sessions.DOMAIN + body))}"
    with pytest.raises(sessions.SessionError):
        sessions.verify_session(signed, SESSION_KEY.public_key(), revoked=frozenset({"x"}))


# -- the gateway's tensor codec -------------------------------------------------------------------


@FUZZ
@given(
    data=st.binary(max_size=256),
    shape=st.lists(st.integers(-2, 2**62), max_size=12),
    dtype=st.sampled_from(["float32", "float64", "", "int8"]) | st.text(max_size=8),
)
def test_tensor_codec_raises_only_value_errors(data, shape, dtype):
    try:
        array = from_tensor(gateway_pb2.Tensor(data=data, shape=shape, dtype=dtype))
    except ValueError as exc:
        assert str(exc)
        return
    assert array.shape == tuple(shape) and np.isfinite(array).all()


@FUZZ
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4), seed=st.integers(0, 2**32 - 1))
def test_tensor_codec_round_trips_valid_arrays(shape, seed):
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    assert np.array_equal(from_tensor(to_tensor(x)), x)
