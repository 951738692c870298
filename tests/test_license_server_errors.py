"""Database failures and the admin gate, end to end: the client sees a clean status, never SQLAlchemy.

An in-process server (SQLite in a temporary directory) has a table dropped under it; the next call
must end UNAVAILABLE with the store's own message and count a store error. The store itself must
raise only :class:`StoreError` (here: a PostgreSQL URL pointing at a closed port). The admin gate
(an interceptor) must refuse every admin method without a token, and leave public methods open.
"""

from __future__ import annotations

import secrets
import socket

import pytest

grpc = pytest.importorskip("grpc", reason="needs the license-server extra: ./setup.sh --dev")
sqlalchemy = pytest.importorskip("sqlalchemy", reason="needs the license-server extra: ./setup.sh --dev")

from activeguard_proto.v1 import license_pb2, license_pb2_grpc  # noqa: E402
from license_server.client import LicenseClient  # noqa: E402
from license_server.config import ServerConfig  # noqa: E402
from license_server.process import in_process  # noqa: E402
from license_server.servicer import ADMIN_METHODS  # noqa: E402
from license_server.store import Store, StoreError, StoreUnavailable  # noqa: E402

pytestmark = pytest.mark.timeout(120)
TOKEN = "agt_errors_" + secrets.token_urlsafe(24)
LEAKS = ("sqlalchemy", "sqlite", "operationalerror", "no such table", "traceback", "psycopg")


def _assert_clean_unavailable(err: grpc.RpcError) -> None:
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err
    details = err.details() or ""
    assert "license store is unavailable" in details and "retry" in details, details
    assert not any(word in details.lower() for word in LEAKS), details


@pytest.fixture
def server(tmp_path):
    config = ServerConfig(data_dir=tmp_path / "ls", port=0, metrics_port=None, max_workers=4)
    with in_process(config, TOKEN) as srv:
        yield srv


def test_dropped_table_reaches_the_client_as_unavailable(server):
    with server.store.engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE ag_revocations")
    with LicenseClient(f"127.0.0.1:{server.port}", TOKEN, timeout=30) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.revocations(since=0)
        _assert_clean_unavailable(info.value)
        assert client.verification_keys()  # other tables still answer: the server is up, only that call failed
    samples = server.metrics.registry.get_sample_value("activeguard_store_errors_total", {"op": "ListRevocations"})
    assert samples == 1.0


def test_removed_database_directory_reaches_the_client_as_unavailable(tmp_path):
    """The SQLite file's directory is removed: every new connection fails; the admin path says so cleanly."""
    db_dir = tmp_path / "db"
    db_dir.mkdir()
    config = ServerConfig(
        data_dir=tmp_path / "ls",
        database_url=f"sqlite:///{db_dir / 'licenses.db'}",
        port=0,
        metrics_port=None,
        max_workers=4,
    )
    with in_process(config, TOKEN) as srv, LicenseClient(f"127.0.0.1:{srv.port}", TOKEN, timeout=30) as client:
        srv.store.engine.dispose()  # drop pooled connections: the next call must open the (gone) file
        for f in db_dir.iterdir():
            f.unlink()
        db_dir.rmdir()
        with pytest.raises(grpc.RpcError) as info:
            client.get("0" * 32)
        _assert_clean_unavailable(info.value)


def test_store_raises_only_store_errors_for_an_unreachable_database():
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(StoreError) as info:
        Store(f"postgresql+psycopg://user:secret@127.0.0.1:{port}/none?connect_timeout=2")
    assert isinstance(info.value, StoreUnavailable)
    assert not isinstance(info.value, sqlalchemy.exc.SQLAlchemyError)
    assert "secret" not in str(info.value) and "sqlalchemy" not in str(info.value).lower()


@pytest.mark.parametrize("method", ADMIN_METHODS)
def test_every_admin_method_is_gated(server, method):
    """The interceptor refuses each admin method without a token (and counts it); public methods stay open."""
    requests = {
        "RegisterModel": license_pb2.RegisterModelRequest(),
        "IssueLicense": license_pb2.IssueLicenseRequest(),
        "GetLicense": license_pb2.GetLicenseRequest(),
        "ListLicenses": license_pb2.ListLicensesRequest(),
        "RevokeLicense": license_pb2.RevokeLicenseRequest(),
        "GetLicenseUsage": license_pb2.GetLicenseRequest(),
    }
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = license_pb2_grpc.LicenseServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            getattr(stub, method)(requests[method], timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "authorization" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            getattr(stub, method)(requests[method], timeout=10, metadata=(("authorization", "Bearer wrong"),))
        assert (info.value.code(), info.value.details()) == (grpc.StatusCode.UNAUTHENTICATED, "admin token rejected")
        assert stub.ListRevocations(license_pb2.ListRevocationsRequest(), timeout=10).cursor == 0
    assert server.metrics.registry.get_sample_value("activeguard_admin_auth_failures_total") == 2.0
