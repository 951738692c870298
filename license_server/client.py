"""A small client for the license service (used by the CLI, tests and later the gateway)."""

from __future__ import annotations

import os
from pathlib import Path

import grpc

from activeguard.credentials import licenses as lic
from activeguard_proto.v1 import license_pb2, license_pb2_grpc
from license_server.auth import TOKEN_ENV

SERVER_ENV = "ACTIVEGUARD_LICENSE_SERVER"
DEFAULT_SERVER = "127.0.0.1:50061"
# gRPC's default reconnect backoff grows to 120 s (1 s x 1.6 per failed attempt): a gateway polling
# revocations every 2 s then stayed cut off for ~26 s after a license-server restart.
DEFAULT_RECONNECT_BACKOFF_MS = 1000
MIN_CONNECT_TIMEOUT_MS = 2000  # gRPC's "min_reconnect_backoff": one attempt's TCP + TLS handshake budget


def read_token(token_file: str | Path | None = None) -> str | None:
    """The admin token from a file, else from $ACTIVEGUARD_ADMIN_TOKEN (never from the command line)."""
    if token_file:
        return Path(token_file).read_text().strip()
    return os.environ.get(TOKEN_ENV) or None


def channel_credentials(
    *,
    tls: bool = False,
    ca_cert: str | Path | None = None,
    client_cert: str | Path | None = None,
    client_key: str | Path | None = None,
) -> grpc.ChannelCredentials | None:
    """TLS credentials, or None for plaintext.

    TLS is on when ``tls`` is set or any file is given; without ``ca_cert`` the system's roots verify
    the server. A client certificate (mTLS) needs its key, and vice versa: sending half of the pair
    would silently fall back to an anonymous TLS client the server then refuses.
    """
    if bool(client_cert) != bool(client_key):
        raise ValueError("give both client_cert and client_key (mTLS), or neither")
    if not (tls or ca_cert or client_cert):
        return None
    read = lambda f: Path(f).read_bytes() if f else None  # noqa: E731
    return grpc.ssl_channel_credentials(
        root_certificates=read(ca_cert), private_key=read(client_key), certificate_chain=read(client_cert)
    )


def channel_options(reconnect_backoff_ms: int = DEFAULT_RECONNECT_BACKOFF_MS) -> list[tuple[str, int]]:
    """Reconnect to a server that went away at least every ``reconnect_backoff_ms`` (plus 20 % jitter)."""
    if reconnect_backoff_ms < 100:
        raise ValueError(f"reconnect_backoff_ms must be at least 100 (gRPC's floor), got {reconnect_backoff_ms}")
    return [
        ("grpc.initial_reconnect_backoff_ms", max(100, reconnect_backoff_ms // 2)),
        ("grpc.max_reconnect_backoff_ms", reconnect_backoff_ms),
        ("grpc.min_reconnect_backoff_ms", max(reconnect_backoff_ms, MIN_CONNECT_TIMEOUT_MS)),
    ]


class LicenseClient:
    """Admin and verifier calls to a license server, over plaintext, TLS or mTLS.

    Calls fail fast while the server is unreachable (``wait_for_ready=False``) and the channel
    retries the connection at most ``reconnect_backoff_ms`` apart, so periodic pollers (the
    gateway's revocation sync) recover within about a second of a server restart.
    """

    def __init__(
        self,
        target: str | None = None,
        token: str | None = None,
        *,
        ca_cert: str | Path | None = None,
        client_cert: str | Path | None = None,
        client_key: str | Path | None = None,
        tls: bool = False,
        timeout: float = 600.0,
        reconnect_backoff_ms: int = DEFAULT_RECONNECT_BACKOFF_MS,
        wait_for_ready: bool = False,
    ):
        self.target = target or os.environ.get(SERVER_ENV) or DEFAULT_SERVER
        creds = channel_credentials(tls=tls, ca_cert=ca_cert, client_cert=client_cert, client_key=client_key)
        options = channel_options(reconnect_backoff_ms)
        self.channel = (
            grpc.secure_channel(self.target, creds, options=options)
            if creds is not None
            else grpc.insecure_channel(self.target, options=options)
        )
        self.stub = license_pb2_grpc.LicenseServiceStub(self.channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout
        self.wait_for_ready = wait_for_ready

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> LicenseClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _admin(self, method: str, request, timeout: float | None = None):
        return self._rpc(method, request, timeout, self._metadata)

    def _rpc(self, method: str, request, timeout: float | None = None, metadata=()):
        return getattr(self.stub, method)(
            request, metadata=metadata, timeout=timeout or self.timeout, wait_for_ready=self.wait_for_ready
        )

    def register_model(
        self,
        *,
        model_path: str = "",
        checkpoint: bytes = b"",
        name: str = "",
        pregenerate: bool = False,
        confidences=(),
        epsilon: float = 0.0,
        encoding: str = "",
        expected_model_id: str = "",
        model_file_text: str = "",
        model_class: str = "",
        input_spec: str = "",
        fo_scheme: str = "",
        runner_up_confidences=(),
        pregenerate_count: int = 0,
    ):
        """``model_path`` or ``checkpoint`` may hold any model source; a state dict needs ``model_file_text``.
        ``fo_scheme`` '' means ranked unless only ``confidences`` are given (then paper)."""
        return self._admin(
            "RegisterModel",
            license_pb2.RegisterModelRequest(
                name=name,
                model_path=model_path,
                checkpoint=checkpoint,
                pregenerate=pregenerate,
                confidences=list(confidences),
                epsilon=epsilon,
                encoding=encoding,
                expected_model_id=expected_model_id,
                model_file_text=model_file_text,
                model_class=model_class,
                input_spec=input_spec,
                fo_scheme=fo_scheme,
                runner_up_confidences=list(runner_up_confidences),
                pregenerate_count=pregenerate_count,
            ),
        )

    def issue(self, model_id: str, user: str, validity_seconds: int = 0) -> license_pb2.License:
        return self._admin(
            "IssueLicense",
            license_pb2.IssueLicenseRequest(model_id=model_id, user=user, validity_seconds=validity_seconds),
        )

    def get(self, license_id: str) -> license_pb2.License:
        return self._admin("GetLicense", license_pb2.GetLicenseRequest(license_id=license_id))

    def usage(self, license_id: str) -> license_pb2.LicenseUsage:
        """What the ingested answer journals say about the license (served, refused, alerts, records kept)."""
        return self._admin("GetLicenseUsage", license_pb2.GetLicenseRequest(license_id=license_id))

    def list(
        self, *, model_id: str = "", user: str = "", state: int = 0, page_size: int = 0, include_signed: bool = False
    ) -> list[license_pb2.License]:
        out, token = [], ""
        while True:
            resp = self._admin(
                "ListLicenses",
                license_pb2.ListLicensesRequest(
                    model_id=model_id,
                    user=user,
                    state=state,
                    page_size=page_size,
                    page_token=token,
                    include_signed=include_signed,
                ),
            )
            out.extend(resp.licenses)
            token = resp.next_page_token
            if not token:
                return out

    def revoke(self, license_id: str, reason: str = "") -> license_pb2.License:
        return self._admin("RevokeLicense", license_pb2.RevokeLicenseRequest(license_id=license_id, reason=reason))

    def revocations(self, since: int = 0, model_id: str = "") -> license_pb2.ListRevocationsResponse:
        return self._rpc("ListRevocations", license_pb2.ListRevocationsRequest(since=since, model_id=model_id))

    def revocation_list(self, model_id: str = "") -> license_pb2.SignedRevocationList:
        """The signed revocation list (open: no admin token needed)."""
        return self._rpc("GetRevocationList", license_pb2.GetRevocationListRequest(model_id=model_id))

    def verification_keys(self) -> dict:
        """{key_id: Ed25519PublicKey} for every key the server has signed with."""
        resp = self._rpc("GetVerificationKey", license_pb2.GetVerificationKeyRequest())
        return {k.key_id: lic.public_key_from_bytes(k.public_key) for k in resp.keys}


def to_signed(msg: license_pb2.License) -> lic.SignedLicense:
    return lic.SignedLicense(payload=msg.signed.payload, signature=msg.signed.signature, key_id=msg.signed.key_id)
