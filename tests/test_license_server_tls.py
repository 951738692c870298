"""TLS and mTLS of the license server over real gRPC on loopback.

A throwaway PKI is made here with ``cryptography``: two CAs, a server certificate for
127.0.0.1/localhost, and a client certificate from each CA (keys written 0600). Servers run in this
process (:func:`license_server.process.in_process`), one per mode for the whole module.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

grpc = pytest.importorskip("grpc", reason="needs the license-server extra: ./setup.sh --dev")
x509 = pytest.importorskip("cryptography.x509")

from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from license_server.auth import TOKEN_ENV, write_secret  # noqa: E402
from license_server.client import LicenseClient  # noqa: E402
from license_server.config import ServerConfig  # noqa: E402
from license_server.process import in_process  # noqa: E402
from license_server.server import LicenseServer  # noqa: E402

pytestmark = pytest.mark.timeout(120)
TOKEN = "agt_tls_" + secrets.token_urlsafe(24)
SERVER_AUTH, CLIENT_AUTH = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH


@dataclass(frozen=True)
class Identity:
    """A PEM certificate and its 0600 key on disk."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca: Path  # signs the server and the good client
    server: Identity
    client: Identity
    other_ca: Path  # a stranger: signs the rogue client
    rogue_client: Identity


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[str, ec.EllipticCurvePrivateKey] | None,
    *,
    usage: x509.ObjectIdentifier | None = None,
    san: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    """A one-day certificate: a self-signed CA when ``issuer`` is None, else a leaf for ``usage``."""
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer or (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write_cert(where: Path, name: str, cert: x509.Certificate) -> Path:
    path = where / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _leaf(
    where: Path,
    name: str,
    ca: tuple[str, ec.EllipticCurvePrivateKey],
    usage: x509.ObjectIdentifier,
    san: list[x509.GeneralName] | None = None,
) -> Identity:
    """A certificate signed by ``ca`` and its key, created 0600 like every secret of the project."""
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    write_secret(where / f"{name}.key", pem.decode("ascii"))
    return Identity(_write_cert(where, name, _certificate(name, key, ca, usage=usage, san=san)), where / f"{name}.key")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    where = tmp_path_factory.mktemp("pki")
    cas = {}
    for name in ("activeguard-test-ca", "stranger-ca"):
        key = ec.generate_private_key(ec.SECP256R1())
        _write_cert(where, name, _certificate(name, key, None))
        cas[name] = (name, key)
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    return Pki(
        ca=where / "activeguard-test-ca.pem",
        server=_leaf(where, "license-server", cas["activeguard-test-ca"], SERVER_AUTH, san),
        client=_leaf(where, "gateway", cas["activeguard-test-ca"], CLIENT_AUTH),
        other_ca=where / "stranger-ca.pem",
        rogue_client=_leaf(where, "rogue", cas["stranger-ca"], CLIENT_AUTH),
    )


def _serve(tmp_path_factory, pki: Pki, *, mtls: bool) -> Iterator[LicenseServer]:
    config = ServerConfig(
        data_dir=tmp_path_factory.mktemp("mtls" if mtls else "tls"),
        port=0,
        metrics_port=None,
        max_workers=4,
        tls_cert=pki.server.cert,
        tls_key=pki.server.key,
        tls_client_ca=pki.ca if mtls else None,
    )
    with in_process(config, TOKEN) as server:
        yield server


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory, pki) -> Iterator[LicenseServer]:
    yield from _serve(tmp_path_factory, pki, mtls=False)


@pytest.fixture(scope="module")
def mtls_server(tmp_path_factory, pki) -> Iterator[LicenseServer]:
    yield from _serve(tmp_path_factory, pki, mtls=True)


def _target(server: LicenseServer) -> str:
    return f"127.0.0.1:{server.port}"


def _served(server: LicenseServer, **tls) -> bool:
    """Whether a client with these TLS options gets answers (an open and an admin call); False when refused."""
    with LicenseClient(_target(server), TOKEN, timeout=10, **tls) as c:
        try:
            keys = c.verification_keys()
            c.list()
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc  # the handshake failed; nothing was answered
            return False
    assert list(keys) == [server.service.key_id]
    return True


def test_tls_serves_clients_that_trust_the_ca(tls_server, pki):
    assert _served(tls_server, ca_cert=pki.ca)
    channel = grpc.secure_channel(_target(tls_server), grpc.ssl_channel_credentials(pki.ca.read_bytes()))
    with channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_tls_refuses_plaintext_and_untrusted_servers(tls_server, pki):
    assert not _served(tls_server)  # plaintext client
    assert not _served(tls_server, ca_cert=pki.other_ca)  # the server's certificate is not from this CA
    assert not _served(tls_server, tls=True)  # the system roots do not know the test CA


def test_mtls_requires_a_client_certificate_from_the_client_ca(mtls_server, pki):
    assert not _served(mtls_server, ca_cert=pki.ca)  # no client certificate
    assert not _served(
        mtls_server, ca_cert=pki.ca, client_cert=pki.rogue_client.cert, client_key=pki.rogue_client.key
    )  # a certificate from another CA
    assert not _served(mtls_server)  # plaintext
    assert _served(mtls_server, ca_cert=pki.ca, client_cert=pki.client.cert, client_key=pki.client.key)


def test_cli_reaches_an_mtls_server(mtls_server, pki, monkeypatch, capsys):
    from license_server.cli import license_main

    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    tls = ["--server", _target(mtls_server), "--ca-cert", str(pki.ca)]
    assert (
        license_main(
            ["list", *tls, "--client-cert", str(pki.client.cert), "--client-key", str(pki.client.key), "--json"]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out) == []
    assert license_main(["list", *tls]) == 1  # refused in the handshake: UNAVAILABLE
    assert "UNAVAILABLE" in capsys.readouterr().err
    assert license_main(["list", *tls, "--client-cert", str(pki.client.cert)]) == 2  # half a key pair
    assert "client_key" in capsys.readouterr().err


def test_key_files_are_private(pki):
    for identity in (pki.server, pki.client, pki.rogue_client):
        assert identity.key.stat().st_mode & 0o777 == 0o600


def test_half_a_tls_setup_is_refused(tmp_path, pki, capsys):
    """A client CA without a server certificate used to start a plaintext server silently."""
    with pytest.raises(ValueError, match="tls_client_ca"):
        ServerConfig(data_dir=tmp_path, tls_client_ca=pki.ca)
    with pytest.raises(ValueError, match="tls_key"):
        ServerConfig(data_dir=tmp_path, tls_cert=pki.server.cert)
    from license_server.cli import server_main

    assert server_main(["--data-dir", str(tmp_path / "d"), "--tls-client-ca", str(pki.ca)]) == 2
    assert "--tls-client-ca" in capsys.readouterr().err
