"""Property-based fuzzing (hypothesis) of the license server's request validation.

The servicer of one in-process server is called directly with a stand-in for gRPC's context, so
every example runs the servicer path (validation, store, refusal mapping; the admin interceptor in
front of it has its own tests) without a network round trip. Properties, for every request:

- nothing escapes but the service's own refusal (``context.abort``), and no refusal is INTERNAL;
- every refusal has a validation-style code and a non-empty message short enough for gRPC's
  status header (a refusal must not echo a megabyte back);
- no valid request is refused (the oracle below states what valid means, independently of the code).

Examples are derandomized and bounded so CI is stable: the count of each target is at its decorator.
"""

from __future__ import annotations

import secrets
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

grpc = pytest.importorskip("grpc", reason="needs the license-server extra: ./setup.sh --dev")
hypothesis = pytest.importorskip("hypothesis", reason="needs the dev extra: ./setup.sh --dev")
import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from activeguard.models.architectures import LeNet5, save_model  # noqa: E402
from activeguard_proto.v1 import license_pb2  # noqa: E402
from license_server.config import ServerConfig  # noqa: E402
from license_server.process import in_process  # noqa: E402
from license_server.servicer import LicenseServicer as LicenseService  # noqa: E402

pytestmark = pytest.mark.timeout(300)
TOKEN = "agt_fuzz_" + secrets.token_urlsafe(24)
FUZZ = settings(
    max_examples=200,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
MAX_DETAILS = 1000  # status details travel in a header; gRPC refuses a few kB
VALIDATION = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}
INT64 = st.integers(-(2**63), 2**63 - 1)
UINT32 = st.integers(0, 2**32 - 1)

# Strings: short unicode (control characters, NUL, odd scripts), ASCII, blanks, and huge ones. Only what
# UTF-8 can carry: protobuf refuses to build a request with a lone surrogate, so no client can send one.
UTF8 = st.characters(codec="utf-8")
texts = st.one_of(
    st.text(UTF8, max_size=40),
    st.text(alphabet=string.printable, max_size=300),
    st.sampled_from(["", " ", "\t", "\x00", "\u00a0", "a\nb", "\u202e", "\U0001f600", "1" * 129, "x" * 257]),
    st.builds(lambda c, n: c * n, UTF8, st.integers(1000, 200_000)),
)
digits = st.integers(0, 2**70).map(str)  # canonical decimals, some beyond the 64-bit sequence range
page_tokens = st.one_of(
    texts,
    digits,
    st.integers(-(2**70), 2**70).map(lambda n: f"{n:+d}"),
    digits.map(lambda d: f"0{d}"),
    digits.map(lambda d: f" {d}"),
    st.sampled_from(["-1", "0", "\u0661", "1_000", "0x10", "1e3", str(2**63 - 1), str(2**63)]),
)


class Refused(Exception):
    """What ``context.abort`` raises here, as gRPC's does (the servicer must end with it or a reply)."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details[:200]}")
        self.code, self.details = code, details


class Context:
    """The part of ``grpc.ServicerContext`` the servicer uses, for an authorized admin caller."""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {TOKEN}"),)

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def is_active(self) -> bool:
        return True

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Refused(code, details)


@pytest.fixture(scope="module")
def service(tmp_path_factory) -> Any:
    """One server for the module with a registered (untrained) LeNet and one stored license."""
    data = tmp_path_factory.mktemp("fuzz")
    path = data / "lenet.pt"
    torch.manual_seed(0)
    save_model(LeNet5(), path)
    config = ServerConfig(data_dir=data / "server", port=0, metrics_port=None, max_workers=2)
    with in_process(config, TOKEN) as server:
        svc = server.service
        mid = _call(svc.RegisterModel, license_pb2.RegisterModelRequest(model_path=str(path))).profile.model_id
        svc.store.insert_license(
            dict(  # a stored license without generating a fingerprint (not verified here)
                license_id="f" * 32,
                model_id=mid,
                user_name="fuzz",
                fo_class=0,
                conf_index=0,
                fo_confidence=0.2,
                user_index=0,
                payload=b"p",
                signature=b"s",
                key_id=svc.key_id,
                issued_at=1,
                expires_at=2**40,
            )
        )
        svc.fuzz_model_id, svc.fuzz_model_path = mid, path
        yield svc


def _call(method: Callable, request: Any) -> Any:
    return method(request, Context())


def _outcome(method: Callable, request: Any, refusals: set[grpc.StatusCode] = VALIDATION) -> Refused | Any:
    """The reply, or the refusal after checking its code and message (any other exception fails the test)."""
    try:
        return _call(method, request)
    except Refused as refusal:
        assert refusal.code in refusals, refusal
        assert refusal.details and len(refusal.details) <= MAX_DETAILS, refusal
        return refusal


def _ok_text(value: str, limit: int, *, required: bool = False) -> bool:
    """The oracle for client text: optional unless required; at most ``limit`` printable, non-blank characters."""
    if not value:
        return not required
    return len(value) <= limit and value.isprintable() and bool(value.strip())


def _is_refused(result: Any, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> bool:
    return isinstance(result, Refused) and result.code == code


@FUZZ  # 200 examples
@given(model_id=texts, user=texts, validity=INT64)
def test_issue_license_validation(service: LicenseService, model_id: str, user: str, validity: int):
    """Unregistered models keep this fast: a valid request gets past validation to NOT_FOUND."""
    result = _outcome(
        service.IssueLicense, license_pb2.IssueLicenseRequest(model_id=model_id, user=user, validity_seconds=validity)
    )
    valid = (
        _ok_text(user, 256, required=True)
        and _ok_text(model_id, 128, required=True)
        and 0 <= validity <= 20 * 365 * 24 * 3600
    )
    if valid:
        assert _is_refused(result, grpc.StatusCode.NOT_FOUND) and "not registered" in result.details, result
    else:
        assert _is_refused(result), result


@FUZZ  # 200 examples
@given(
    model_id=texts,
    user=texts,
    state=st.one_of(st.integers(0, 3), st.integers(-(2**31), 2**31 - 1)),
    page_size=st.one_of(st.integers(0, 1001), UINT32),
    page_token=page_tokens,
    include_signed=st.booleans(),
)
def test_list_licenses_validation(
    service: LicenseService, model_id: str, user: str, state: int, page_size: int, page_token: str, include_signed: bool
):
    result = _outcome(
        service.ListLicenses,
        license_pb2.ListLicensesRequest(
            model_id=model_id,
            user=user,
            state=state,
            page_size=page_size,
            page_token=page_token,
            include_signed=include_signed,
        ),
    )
    token_ok = page_token == "" or (
        len(page_token) <= 19
        and page_token.isascii()
        and page_token.isdigit()
        and str(int(page_token)) == page_token
        and int(page_token) < 2**63
    )
    valid = _ok_text(model_id, 128) and _ok_text(user, 256) and 0 <= state <= 3 and page_size <= 1000 and token_ok
    assert isinstance(result, license_pb2.ListLicensesResponse) if valid else _is_refused(result), result


@FUZZ  # 200 examples
@given(
    license_id=st.one_of(texts, st.just("f" * 32)),
    reason=st.one_of(texts, st.just("leaked\n\tagain")),
    revoke=st.booleans(),
)
def test_get_and_revoke_license_validation(service: LicenseService, license_id: str, reason: str, revoke: bool):
    if revoke:
        result = _outcome(service.RevokeLicense, license_pb2.RevokeLicenseRequest(license_id=license_id, reason=reason))
        reason_ok = len(reason) <= 1024 and reason.replace("\n", " ").replace("\t", " ").isprintable()
    else:
        result = _outcome(service.GetLicense, license_pb2.GetLicenseRequest(license_id=license_id))
        reason_ok = True
    if not (_ok_text(license_id, 128, required=True) and reason_ok):
        assert _is_refused(result), result
    elif license_id == "f" * 32:
        assert isinstance(result, license_pb2.License) and result.license_id == license_id, result
    else:
        assert _is_refused(result, grpc.StatusCode.NOT_FOUND), result


@FUZZ  # 200 examples
@given(since=INT64, model_id=texts, page_size=UINT32)
def test_list_revocations_validation(service: LicenseService, since: int, model_id: str, page_size: int):
    result = _outcome(
        service.ListRevocations, license_pb2.ListRevocationsRequest(since=since, model_id=model_id, page_size=page_size)
    )
    valid = since >= 0 and _ok_text(model_id, 128)
    assert isinstance(result, license_pb2.ListRevocationsResponse) if valid else _is_refused(result), result


REGISTER_REFUSALS = VALIDATION | {grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS}


@FUZZ  # 200 examples
@given(
    model_path=st.one_of(texts, st.just("")),
    checkpoint=st.one_of(st.just(b""), st.binary(max_size=2048)),
    name=texts,
    encoding=st.one_of(texts, st.sampled_from(["float32", "uint8"])),
    confidences=st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=5),
    epsilon=st.floats(),
    num_classes=UINT32,
    expected_model_id=texts,
)
def test_register_model_refuses_cleanly(
    service: LicenseService,
    model_path: str,
    checkpoint: bytes,
    name: str,
    encoding: str,
    confidences: list[float],
    epsilon: float,
    num_classes: int,
    expected_model_id: str,
):
    """Arbitrary paths, bytes and profiles: a reply or a clean refusal, never an internal error."""
    _outcome(
        service.RegisterModel,
        license_pb2.RegisterModelRequest(
            model_path=model_path,
            checkpoint=checkpoint,
            name=name,
            encoding=encoding,
            confidences=confidences,
            epsilon=epsilon,
            num_classes=num_classes,
            expected_model_id=expected_model_id,
        ),
        REGISTER_REFUSALS,
    )


@FUZZ  # 200 examples
@given(
    name=texts,
    expected=st.one_of(texts, st.just("model id")),
    encoding=st.sampled_from(["", "float32"]),
    num_classes=st.sampled_from([0, 10]),
)
def test_register_model_accepts_every_valid_name(
    service: LicenseService, name: str, expected: str, encoding: str, num_classes: int
):
    """The registered checkpoint with its own profile: refused only for a bad name or another model id."""
    mid = service.fuzz_model_id
    expected = mid if expected == "model id" else expected
    result = _outcome(
        service.RegisterModel,
        license_pb2.RegisterModelRequest(
            model_path=str(service.fuzz_model_path),
            name=name,
            encoding=encoding,
            num_classes=num_classes,
            expected_model_id=expected,
        ),
        REGISTER_REFUSALS,
    )
    if not (_ok_text(name, 256) and _ok_text(expected, 128)):
        assert _is_refused(result), result
    elif expected not in ("", mid):
        assert _is_refused(result, grpc.StatusCode.FAILED_PRECONDITION), result
    else:
        assert isinstance(result, license_pb2.RegisterModelResponse) and result.profile.model_id == mid, result


def test_the_fuzzed_store_is_intact(service: LicenseService):
    """Refused writes left nothing behind: one model, the one planted license, no stray uploads."""
    assert [m.model_id for m in service.store.list_models()] == [service.fuzz_model_id]
    assert service.store.count_licenses() == 1
    assert not list(Path(service.cfg.data_dir / "models").glob("upload-*"))
