"""A small client for the license service (used by the CLI, tests and later the gateway)."""

from __future__ import annotations

import os
from pathlib import Path

import grpc

from activeguard import licenses as lic
from activeguard_proto.v1 import license_pb2, license_pb2_grpc
from license_server.auth import TOKEN_ENV

SERVER_ENV = "ACTIVEGUARD_LICENSE_SERVER"
DEFAULT_SERVER = "127.0.0.1:50061"


def read_token(token_file: str | Path | None = None) -> str | None:
    """The admin token from a file, else from $ACTIVEGUARD_ADMIN_TOKEN (never from the command line)."""
    if token_file:
        return Path(token_file).read_text().strip()
    return os.environ.get(TOKEN_ENV) or None


class LicenseClient:
    def __init__(self, target: str | None = None, token: str | None = None, *, ca_cert: str | Path | None = None,
                 client_cert: str | Path | None = None, client_key: str | Path | None = None, timeout: float = 600.0):
        self.target = target or os.environ.get(SERVER_ENV) or DEFAULT_SERVER
        if ca_cert:
            creds = grpc.ssl_channel_credentials(
                root_certificates=Path(ca_cert).read_bytes(),
                private_key=Path(client_key).read_bytes() if client_key else None,
                certificate_chain=Path(client_cert).read_bytes() if client_cert else None)
            self.channel = grpc.secure_channel(self.target, creds)
        else:
            self.channel = grpc.insecure_channel(self.target)
        self.stub = license_pb2_grpc.LicenseServiceStub(self.channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "LicenseClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _admin(self, method: str, request, timeout: float | None = None):
        return getattr(self.stub, method)(request, metadata=self._metadata, timeout=timeout or self.timeout)

    def register_model(self, *, model_path: str = "", checkpoint: bytes = b"", name: str = "", pregenerate: bool = False,
                       confidences=(), epsilon: float = 0.0, encoding: str = "", expected_model_id: str = ""):
        return self._admin("RegisterModel", license_pb2.RegisterModelRequest(
            name=name, model_path=model_path, checkpoint=checkpoint, pregenerate=pregenerate,
            confidences=list(confidences), epsilon=epsilon, encoding=encoding, expected_model_id=expected_model_id))

    def issue(self, model_id: str, user: str, validity_seconds: int = 0) -> license_pb2.License:
        return self._admin("IssueLicense", license_pb2.IssueLicenseRequest(
            model_id=model_id, user=user, validity_seconds=validity_seconds))

    def get(self, license_id: str) -> license_pb2.License:
        return self._admin("GetLicense", license_pb2.GetLicenseRequest(license_id=license_id))

    def list(self, *, model_id: str = "", user: str = "", state: int = 0, page_size: int = 0,
             include_signed: bool = False) -> list[license_pb2.License]:
        out, token = [], ""
        while True:
            resp = self._admin("ListLicenses", license_pb2.ListLicensesRequest(
                model_id=model_id, user=user, state=state, page_size=page_size, page_token=token,
                include_signed=include_signed))
            out.extend(resp.licenses)
            token = resp.next_page_token
            if not token:
                return out

    def revoke(self, license_id: str, reason: str = "") -> license_pb2.License:
        return self._admin("RevokeLicense", license_pb2.RevokeLicenseRequest(license_id=license_id, reason=reason))

    def revocations(self, since: int = 0, model_id: str = "") -> license_pb2.ListRevocationsResponse:
        return self.stub.ListRevocations(license_pb2.ListRevocationsRequest(since=since, model_id=model_id),
                                         timeout=self.timeout)

    def verification_keys(self) -> dict:
        """{key_id: Ed25519PublicKey} for every key the server has signed with."""
        resp = self.stub.GetVerificationKey(license_pb2.GetVerificationKeyRequest(), timeout=self.timeout)
        return {k.key_id: lic.public_key_from_bytes(k.public_key) for k in resp.keys}


def to_signed(msg: license_pb2.License) -> lic.SignedLicense:
    return lic.SignedLicense(payload=msg.signed.payload, signature=msg.signed.signature, key_id=msg.signed.key_id)
