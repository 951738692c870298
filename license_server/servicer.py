"""The gRPC face of the license server: protobuf in, :class:`~license_server.issuance.Issuer` call, protobuf out.

No logic lives here. :data:`STATUS_CODES` is the one table from domain errors to gRPC status
codes, applied by the shared :class:`activeguard_proto.rpc.ErrorMapper`; the admin check runs in
:class:`license_server.interceptors.AdminAuthInterceptor` before any of this.
"""

from __future__ import annotations

import logging

import grpc

from activeguard.credentials import licenses as lic
from activeguard.credentials.fo_space import FO
from activeguard.watermark.record_store import RecordStore, RecordStoreError
from activeguard_proto.rpc import ErrorMapper
from activeguard_proto.v1 import common_pb2, license_pb2, license_pb2_grpc
from license_server import errors as e
from license_server.issuance import Issuer, Registration, license_state
from license_server.journal_ledger import JournalLedger, LicenseUsage
from license_server.logs import log, log_event
from license_server.metrics import Metrics
from license_server.store import AlreadyExists, LicenseRecord, ModelRecord, StoreError

SERVICE_NAME = "activeguard.v1.LicenseService"
ADMIN_METHODS = ("RegisterModel", "IssueLicense", "GetLicense", "ListLicenses", "RevokeLicense", "GetLicenseUsage")
Code = grpc.StatusCode

STATUS_CODES: dict[type[BaseException], grpc.StatusCode] = {
    e.InvalidRequest: Code.INVALID_ARGUMENT,
    e.NotFound: Code.NOT_FOUND,
    e.PreconditionFailed: Code.FAILED_PRECONDITION,
    e.Exhausted: Code.RESOURCE_EXHAUSTED,
    e.Conflict: Code.ABORTED,
    e.Unavailable: Code.UNAVAILABLE,
    e.TimedOut: Code.DEADLINE_EXCEEDED,
    e.ClientGone: Code.CANCELLED,
    e.GenerationFailed: Code.INTERNAL,
    AlreadyExists: Code.ALREADY_EXISTS,
    StoreError: Code.UNAVAILABLE,  # its message is the store's own, written for clients
    RecordStoreError: Code.UNAVAILABLE,
}
STATES = {
    "active": license_pb2.LICENSE_STATE_ACTIVE,
    "revoked": license_pb2.LICENSE_STATE_REVOKED,
    "expired": license_pb2.LICENSE_STATE_EXPIRED,
}
STATE_NAMES = {v: k for k, v in STATES.items()}


def license_msg(r: LicenseRecord, fo: FO, include_signed: bool = True) -> license_pb2.License:
    msg = license_pb2.License(
        license_id=r.license_id,
        model_id=r.model_id,
        user=r.user_name,
        fo=fo_msg(r, fo),
        issued_at=r.issued_at,
        expires_at=r.expires_at,
        key_id=r.key_id,
        state=STATES[license_state(r)],
        revoked_at=r.revoked_at or 0,
        revoke_reason=r.revoke_reason or "",
    )
    if include_signed:
        msg.signed.CopyFrom(common_pb2.SignedLicense(payload=r.payload, signature=r.signature, key_id=r.key_id))
    return msg


def fo_msg(r: LicenseRecord, fo: FO) -> common_pb2.FingerprintOutput:
    """The license's whole FO (``fo``: its model's FO of the license's user index)."""
    return common_pb2.FingerprintOutput(
        target_class=r.fo_class,
        confidence=r.fo_confidence,
        user_index=r.user_index,
        runner_up_class=-1 if fo.runner_up is None else fo.runner_up,
        runner_up_confidence=fo.runner_up_confidence or 0.0,
    )


def profile_msg(row: ModelRecord) -> common_pb2.ModelProfile:
    return common_pb2.ModelProfile(
        model_id=row.model_id,
        name=row.name,
        num_classes=row.num_classes,
        confidences=list(row.confidences),
        epsilon=row.epsilon,
        input_shape=list(row.input_shape),
        encoding=row.encoding,
        fo_scheme=row.control.space.scheme,
        runner_up_confidences=list(row.runner_up_confidences),
        capacity=row.capacity,
    )


def usage_msg(u: LicenseUsage, answer_records: int) -> license_pb2.LicenseUsage:
    return license_pb2.LicenseUsage(
        license_id=u.license_id,
        served=u.served,
        refused=[license_pb2.RefusalCount(reason=k, rows=n) for k, n in sorted(u.refused.items())],
        last_seen=u.last_seen or 0.0,
        alerts=[
            license_pb2.LicenseAlert(
                reason=a.reason,
                policy=a.policy,
                at=a.at,
                detail=a.detail,
                acted_at=a.acted_at or 0,
                action=a.action or "",
            )
            for a in u.alerts
        ],
        answer_records=answer_records,
    )


class LicenseServicer(license_pb2_grpc.LicenseServiceServicer):
    """Thin adapter over :class:`Issuer`; ``store``, ``key_id`` and ``cfg`` are the issuer's, for callers and tests."""

    def __init__(self, issuer: Issuer, metrics: Metrics, ledger: JournalLedger, records: RecordStore):
        self.issuer, self.metrics, self.ledger, self.records = issuer, metrics, ledger, records
        self.store, self.key_id, self.cfg = issuer.store, issuer.key_id, issuer.cfg
        self._errors = ErrorMapper(log, STATUS_CODES, on_result=self._count)

    def _count(self, method: str, code: grpc.StatusCode, exc: BaseException | None) -> None:
        """Failure metrics and the store-error log line (the store's detail never reaches the client)."""
        if method == "IssueLicense" and code != Code.OK:
            self.metrics.issue_failures.labels(code.name).inc()
        if isinstance(exc, StoreError | RecordStoreError) and code == Code.UNAVAILABLE:
            self.metrics.store_errors.labels(method).inc()
            log_event(logging.ERROR, "store error", method=method, error=str(exc), detail=getattr(exc, "detail", ""))

    def _license(self, r: LicenseRecord, include_signed: bool = True) -> license_pb2.License:
        return license_msg(r, self.issuer.fo_of(r), include_signed)

    def RegisterModel(self, request, context):  # noqa: N802
        def run() -> license_pb2.RegisterModelResponse:
            done = self.issuer.register(
                Registration(
                    model_path=request.model_path,
                    checkpoint=request.checkpoint,
                    name=request.name,
                    expected_model_id=request.expected_model_id,
                    encoding=request.encoding,
                    num_classes=request.num_classes,
                    confidences=tuple(request.confidences),
                    epsilon=request.epsilon,
                    pregenerate=request.pregenerate,
                    model_file_text=request.model_file_text,
                    model_class=request.model_class,
                    input_spec=request.input_spec,
                    fo_scheme=request.fo_scheme,
                    runner_up_confidences=tuple(request.runner_up_confidences),
                    pregenerate_count=request.pregenerate_count,
                )
            )
            return license_pb2.RegisterModelResponse(
                profile=profile_msg(done.model),
                created=done.created,
                capacity=done.model.capacity,
                issued=done.issued,
                pregenerated=done.pregenerated,
                pregeneration_target=done.pregeneration_target,
                source=done.model.source,
                input_spec=done.model.input_spec or "",
            )

        return self._errors.run("RegisterModel", context, run)

    def IssueLicense(self, request, context):  # noqa: N802
        return self._errors.run(
            "IssueLicense",
            context,
            lambda: self._license(
                self.issuer.issue(
                    request.model_id, request.user, request.validity_seconds, still_wanted=context.is_active
                )
            ),
        )

    def GetLicense(self, request, context):  # noqa: N802
        return self._errors.run("GetLicense", context, lambda: self._license(self.issuer.get(request.license_id)))

    def ListLicenses(self, request, context):  # noqa: N802
        def run() -> license_pb2.ListLicensesResponse:
            if request.state != license_pb2.LICENSE_STATE_UNSPECIFIED and request.state not in STATE_NAMES:
                raise e.InvalidRequest(
                    f"state {request.state} is not a LicenseState (0 all, 1 active, 2 revoked, 3 expired)"
                )
            page = self.issuer.list(
                model_id=request.model_id,
                user=request.user,
                state=STATE_NAMES.get(request.state, ""),
                page_size=request.page_size,
                page_token=request.page_token,
            )
            return license_pb2.ListLicensesResponse(
                licenses=[self._license(r, request.include_signed) for r in page.licenses],
                next_page_token=page.next_page_token,
            )

        return self._errors.run("ListLicenses", context, run)

    def RevokeLicense(self, request, context):  # noqa: N802
        return self._errors.run(
            "RevokeLicense", context, lambda: self._license(self.issuer.revoke(request.license_id, request.reason))
        )

    def GetRevocationList(self, request, context):  # noqa: N802
        def run() -> license_pb2.SignedRevocationList:
            text, version = self.issuer.revocation_list(request.model_id)
            return license_pb2.SignedRevocationList(text=text, version=version)

        return self._errors.run("GetRevocationList", context, run)

    def ListRevocations(self, request, context):  # noqa: N802
        def run() -> license_pb2.ListRevocationsResponse:
            rows, cursor = self.issuer.revocations(request.since, request.model_id, request.page_size)
            return license_pb2.ListRevocationsResponse(
                revocations=[
                    license_pb2.Revocation(
                        sequence=r.seq,
                        license_id=r.license_id,
                        model_id=r.model_id,
                        revoked_at=r.revoked_at,
                        reason=r.reason,
                    )
                    for r in rows
                ],
                cursor=cursor,
            )

        return self._errors.run("ListRevocations", context, run)

    def GetLicenseUsage(self, request, context):  # noqa: N802
        def run() -> license_pb2.LicenseUsage:
            r = self.issuer.get(request.license_id)
            kept = self.records.count(model_id=r.model_id, license_id=r.license_id)
            return usage_msg(self.ledger.usage(r.license_id), kept)

        return self._errors.run("GetLicenseUsage", context, run)

    def GetVerificationKey(self, request, context):  # noqa: N802
        def run() -> license_pb2.GetVerificationKeyResponse:
            return license_pb2.GetVerificationKeyResponse(
                keys=[
                    license_pb2.VerificationKey(
                        key_id=v.key.key_id,
                        public_key=v.key.public_key,
                        current=v.current,
                        public_key_pem=lic.public_key_pem(lic.public_key_from_bytes(v.key.public_key)).decode("ascii"),
                    )
                    for v in self.issuer.verification_keys()
                ]
            )

        return self._errors.run("GetVerificationKey", context, run)
