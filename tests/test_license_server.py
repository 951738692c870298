"""The license server over real gRPC on loopback: SQLite and PostgreSQL stores, concurrency,
restarts, kill -9 during issuance, bad input (page tokens, files that are not checkpoints),
health/reflection/metrics (the free-slot gauge), pre-generation, CLI, prompt client reconnects.

Servers run as separate processes (``python -m license_server serve``) and are always stopped in
teardown. PostgreSQL tests use 127.0.0.1:5432, database ``test`` (user root, else postgres), each
in a fresh schema dropped afterwards (tests/postgres.py); they are skipped with a message when no server answers.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

grpc = pytest.importorskip("grpc", reason="needs the license-server extra: ./setup.sh --dev")
pytest.importorskip("sqlalchemy", reason="needs the license-server extra: ./setup.sh --dev")

from activeguard.credentials import licenses as lic  # noqa: E402
from activeguard.credentials.control import ControlConfig  # noqa: E402
from activeguard.credentials.fingerprints import authenticate  # noqa: E402
from activeguard.models.architectures import CHECKPOINT_FORMAT, model_id, save_model  # noqa: E402
from activeguard_proto.v1 import license_pb2  # noqa: E402
from handlers.server import free_port  # noqa: E402
from license_server.client import LicenseClient, to_signed  # noqa: E402
from license_server.config import ServerConfig  # noqa: E402
from license_server.process import in_process  # noqa: E402
from license_server.store import Store  # noqa: E402

pytestmark = pytest.mark.timeout(300)
from tests.postgres import fresh_schema  # noqa: E402
from tests.processes import TOKEN, ServerProcess  # noqa: E402


@pytest.fixture(scope="module")
def model_paths(lenet, tmp_path_factory) -> list[Path]:
    """The session LeNet-5 and functionally identical copies with distinct model ids (a tiny bias shift)."""
    out = tmp_path_factory.mktemp("models")
    paths = []
    for i in range(4):
        m = type(lenet)(**lenet.config)
        m.load_state_dict(lenet.state_dict())
        with torch.no_grad():
            m.fc3.bias += i * 1e-7
        path = out / f"lenet-{i}.pt"
        save_model(m, path)
        paths.append(path)
    return paths


@pytest.fixture
def pg_url():
    """A PostgreSQL URL confined to a fresh schema, dropped afterwards."""
    with fresh_schema() as url:
        yield url


def _sqlite_url(data_dir: Path) -> str:
    return f"sqlite:///{(data_dir / 'licenses.db').resolve()}"


def _issue_many(clients: list[LicenseClient], mid: str, n: int) -> tuple[list, list]:
    def one(i: int):
        try:
            return clients[i % len(clients)].issue(mid, f"user-{i}", 3600)
        except grpc.RpcError as exc:
            return exc

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        results = list(pool.map(one, range(n)))
    ok = [r for r in results if isinstance(r, license_pb2.License)]
    errors = [r for r in results if not isinstance(r, license_pb2.License)]
    return ok, errors


def _check_licenses(ok: list, lenet, keys: dict, mid: str) -> None:
    """Distinct FOs; every license verifies, its fingerprint authenticates its user; altered bytes fail."""
    config = ControlConfig()
    fos = {(m.fo.target_class, round(m.fo.confidence, 6)) for m in ok}
    assert len(fos) == len(ok)
    for m in ok:
        payload = lic.verify_license(to_signed(m), keys, model_id=mid)
        assert (payload.fo_class, payload.fo_confidence) == (m.fo.target_class, m.fo.confidence)
        authorized, user = authenticate(lenet, payload.fingerprint_tensor(), config)
        assert bool(authorized[0]) and int(user[0]) == payload.user_index
        fo = config.fo_of_user(payload.user_index)
        assert (fo.target, fo.confidence) == (payload.fo_class, payload.fo_confidence)
    signed = to_signed(ok[0])
    tampered = bytearray(signed.payload)
    tampered[len(tampered) // 2] ^= 0x04
    with pytest.raises(lic.LicenseError):
        lic.verify_license(lic.SignedLicense(bytes(tampered), signed.signature, signed.key_id), keys)


def _concurrent_50(server: ServerProcess, url: str, model_path: Path, lenet) -> None:
    with server.client() as c:
        reg = c.register_model(model_path=str(model_path), fo_scheme="paper")
        mid = reg.profile.model_id
        assert reg.capacity == 30 and reg.created
        ok, errors = _issue_many([c], mid, 50)
        keys = c.verification_keys()
        listed = c.list(model_id=mid, page_size=7)  # paged: 5 pages
    assert len(ok) == 30, [e.details() for e in errors][:3]
    assert len(errors) == 20
    assert all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "30" in e.details() for e in errors)
    _check_licenses(ok, lenet, keys, mid)
    assert {m.license_id for m in listed} == {m.license_id for m in ok}
    store = Store(url)
    try:
        assert store.count_licenses(mid) == 30
    finally:
        store.close()


def test_sqlite_50_concurrent_issues_for_30_slots(servers, tmp_path, model_paths, lenet):
    server = servers(tmp_path / "ls")
    _concurrent_50(server, _sqlite_url(tmp_path / "ls"), model_paths[0], lenet)


def test_postgres_50_concurrent_issues_for_30_slots(servers, tmp_path, model_paths, lenet, pg_url):
    server = servers(tmp_path / "ls", pg_url)
    _concurrent_50(server, pg_url, model_paths[0], lenet)


def test_postgres_two_servers_never_share_an_fo(servers, tmp_path, model_paths, lenet, pg_url):
    a = servers(tmp_path / "a", pg_url)
    b = servers(tmp_path / "b", pg_url)
    with a.client() as ca, b.client() as cb:
        mid = ca.register_model(model_path=str(model_paths[1]), fo_scheme="paper").profile.model_id
        assert not cb.register_model(model_path=str(model_paths[1]), fo_scheme="paper").created  # one shared registry
        ok, errors = _issue_many([ca, cb], mid, 40)
        keys = {**ca.verification_keys(), **cb.verification_keys()}
    assert len(ok) == 30 and len(errors) == 10
    assert all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in errors)
    assert {m.key_id for m in ok} == {a.key_id, b.key_id}  # both servers issued
    _check_licenses(ok, lenet, keys, mid)
    store = Store(pg_url)
    try:
        assert store.count_licenses(mid) == 30
        assert len(store.taken_slots(mid)) == 30
    finally:
        store.close()


def test_postgres_cursors_beyond_the_seq_column_match_nothing(pg_url):
    """A well-formed page token or revocation cursor past PostgreSQL's 32-bit ``seq`` used to be a store error."""
    store = Store(pg_url)
    try:
        for cursor in (2**31, 2**63 - 1):
            assert store.list_licenses(after_seq=cursor) == [] and store.list_revocations(since=cursor) == []
    finally:
        store.close()


def test_restart_keeps_licenses_and_revocations(servers, tmp_path, model_paths, lenet):
    data = tmp_path / "ls"
    first = servers(data)
    with first.client() as c:
        mid = c.register_model(model_path=str(model_paths[2]), fo_scheme="paper").profile.model_id
        issued = [c.issue(mid, f"u{i}", 3600) for i in range(3)]
        revoked = c.revoke(issued[1].license_id, "leaked")
        assert revoked.state == license_pb2.LICENSE_STATE_REVOKED and revoked.revoke_reason == "leaked"
        assert c.revoke(issued[1].license_id, "again").revoke_reason == "leaked"  # idempotent
    first.stop()
    second = servers(data)
    assert second.key_id == first.key_id
    with second.client() as c:
        listed = {m.license_id: m for m in c.list(model_id=mid)}
        assert set(listed) == {m.license_id for m in issued}
        assert listed[issued[1].license_id].state == license_pb2.LICENSE_STATE_REVOKED
        revs = c.revocations()
        assert [r.license_id for r in revs.revocations] == [issued[1].license_id]
        assert not c.revocations(since=revs.cursor).revocations
        keys = c.verification_keys()
        revoked_ids = {r.license_id for r in revs.revocations}
        lic.verify_license(to_signed(issued[0]), keys, model_id=mid, revoked=revoked_ids)
        with pytest.raises(lic.RevokedLicense):
            lic.verify_license(to_signed(issued[1]), keys, model_id=mid, revoked=revoked_ids)
        fresh = c.issue(mid, "after-restart", 3600)
    fos = {(m.fo.target_class, m.fo.confidence) for m in [*issued, fresh]}
    assert len(fos) == 4  # the revoked license's FO is not reused


def test_kill_during_issuance_leaves_whole_licenses_only(servers, tmp_path, model_paths, lenet):
    data = tmp_path / "ls"
    server = servers(data)
    with server.client() as c:
        mid = c.register_model(model_path=str(model_paths[3])).profile.model_id  # the ranked space
        for i in range(3):
            c.issue(mid, f"before-{i}", 3600)
    clients = [LicenseClient(server.target, TOKEN, timeout=60) for _ in range(4)]
    with concurrent.futures.ThreadPoolExecutor(30) as pool:
        # 30 more at once: they share one batched optimization (over a second for ranked FOs), so at
        # the kill three are issued and the rest are being generated or wait.
        futures = [pool.submit(clients[i % 4].issue, mid, f"k{i}", 3600) for i in range(30)]
        time.sleep(0.6)
        server.kill()
        outcomes = [f.exception() is None for f in futures]
    for c in clients:
        c.close()
    key = lic.load_signing_key(data / "signing_key.pem")
    store = Store(_sqlite_url(data))
    try:
        rows = store.list_licenses(model_id=mid, limit=100)
        assert len(rows) >= sum(outcomes)  # every acknowledged license is durable
        assert 3 <= len(rows) < 33, "the kill came too late to interrupt an issuance"
        for r in rows:  # each row is a whole, valid license whose columns match the signed payload
            payload = lic.verify_license(
                lic.SignedLicense(bytes(r.payload), bytes(r.signature), r.key_id), key.public_key(), model_id=mid
            )
            assert (payload.fo_class, payload.fo_confidence, payload.user) == (r.fo_class, r.fo_confidence, r.user_name)
        assert len(store.taken_slots(mid)) == len(rows)  # no slot held without its license
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
    finally:
        store.close()
    again = servers(data)  # the server comes back on the same store and keeps allocating cleanly
    with again.client() as c:
        more = c.issue(mid, "after-crash", 3600)
    assert more.fo.user_index not in {r.user_index for r in rows}


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory, model_paths):
    s = ServerProcess(tmp_path_factory.mktemp("shared"))
    try:
        yield s
    finally:
        s.stop()


def _code(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code(), info.value.details()


def test_bad_input_is_refused_and_writes_nothing(shared_server, model_paths):
    with shared_server.client() as c:
        mid = c.register_model(model_path=str(model_paths[0]), fo_scheme="paper").profile.model_id
        before = len(c.list())
        cases = {
            "unknown model": (lambda: c.issue("0" * 64, "alice", 60), grpc.StatusCode.NOT_FOUND),
            "empty user": (lambda: c.issue(mid, "", 60), grpc.StatusCode.INVALID_ARGUMENT),
            "10 kB user": (lambda: c.issue(mid, "x" * 10_000, 60), grpc.StatusCode.INVALID_ARGUMENT),
            "control chars": (lambda: c.issue(mid, "a\nb", 60), grpc.StatusCode.INVALID_ARGUMENT),
            "negative validity": (lambda: c.issue(mid, "alice", -5), grpc.StatusCode.INVALID_ARGUMENT),
            "unknown license": (lambda: c.revoke("nope"), grpc.StatusCode.NOT_FOUND),
            "bad page token": (
                lambda: c.stub.ListLicenses(license_pb2.ListLicensesRequest(page_token="x"), metadata=c._metadata),
                grpc.StatusCode.INVALID_ARGUMENT,
            ),
            # an echoed 200 kB id used to exceed gRPC's header limit: RESOURCE_EXHAUSTED instead of a refusal
            "200 kB license id": (lambda: c.get("x" * 200_000), grpc.StatusCode.INVALID_ARGUMENT),
            "200 kB model id": (lambda: c.issue("0" * 200_000, "alice", 60), grpc.StatusCode.INVALID_ARGUMENT),
            "NUL in a filter": (lambda: c.list(user="a\x00b"), grpc.StatusCode.INVALID_ARGUMENT),
        }
        for name, (fn, want) in cases.items():
            code, details = _code(fn)
            assert code == want and details, name
        for token in ("wrong-token", None):
            with shared_server.client(token) as bad:
                for fn in (lambda: bad.issue(mid, "mallory", 60), lambda: bad.list(), lambda: bad.revoke("x")):
                    code, details = _code(fn)
                    assert code == grpc.StatusCode.UNAUTHENTICATED and details
                    assert TOKEN not in details
                assert bad.verification_keys()  # verification RPCs stay open
                bad.revocations()
        assert len(c.list()) == before
    assert TOKEN not in shared_server.log_text()


def test_health_reflection_and_metrics(shared_server, model_paths):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(shared_server.target) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "activeguard.v1.LicenseService"):
            assert (
                health.Check(health_pb2.HealthCheckRequest(service=service)).status
                == health_pb2.HealthCheckResponse.SERVING
            )
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        reply = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in reply.list_services_response.service}
        assert {"activeguard.v1.LicenseService", "grpc.health.v1.Health"} <= names
    with shared_server.client() as c:
        mid = c.register_model(model_path=str(model_paths[1]), fo_scheme="paper").profile.model_id
        c.issue(mid, "metrics-user", 60)
    text = urllib.request.urlopen(f"http://127.0.0.1:{shared_server.metrics_port}/metrics", timeout=10).read().decode()
    for name in (
        "activeguard_licenses_issued_total",
        "activeguard_license_issue_seconds_bucket",
        "activeguard_license_revocations_total",
        "activeguard_store_errors_total",
    ):
        assert name in text


def _issued_by_path(server) -> dict[str, float]:
    """IssueLicense calls so far by how the fingerprint was found (pregenerated, generated)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("activeguard_license_issue_seconds_count{"):
            path = line.split('path="', 1)[1].split('"', 1)[0]
            counts[path] = counts.get(path, 0.0) + float(line.split()[-1])
    return counts


def test_pregeneration_makes_issuance_fast(shared_server, model_paths):
    """Licenses of a pre-generated model come from its pool, not a search (how fast each path is, is
    measured by benchmarks/bench_license_server.py, not asserted here)."""
    with shared_server.client() as c:
        pre = c.register_model(model_path=str(model_paths[2]), pregenerate=True, fo_scheme="paper")
        assert pre.pregenerated == 30
        before = _issued_by_path(shared_server)
        for i in range(10):
            c.issue(pre.profile.model_id, f"lat-{i}", 60)
        after = _issued_by_path(shared_server)
    assert after.get("pregenerated", 0) - before.get("pregenerated", 0) == 10
    assert after.get("generated", 0) == before.get("generated", 0)


def test_cli_issue_list_show_revoke_verify(shared_server, model_paths, tmp_path, monkeypatch, capsys):
    from license_server.cli import license_main

    monkeypatch.setenv("ACTIVEGUARD_ADMIN_TOKEN", TOKEN)
    monkeypatch.setenv("ACTIVEGUARD_LICENSE_SERVER", shared_server.target)
    mid = model_id(torch.load(model_paths[0], weights_only=True)["state_dict"])

    def run(*argv: str) -> tuple[int, str]:
        capsys.readouterr()
        rc = license_main(list(argv))
        return rc, capsys.readouterr().out

    assert run("register", "--model", str(model_paths[0]), "--fo-scheme", "paper")[0] == 0
    out = tmp_path / "carol.aglicense"
    rc, text = run("issue", "--model-id", mid, "--user", "carol", "--validity-days", "1", "--out", str(out), "--json")
    assert rc == 0 and out.exists() and oct(out.stat().st_mode & 0o777) == "0o600"
    lid = json.loads(text)["license_id"]
    assert run("verify", str(out), "--model-id", mid)[0] == 0
    rc, text = run("show", lid, "--json")
    assert rc == 0 and json.loads(text)["user"] == "carol"
    rc, text = run("list", "--user", "carol", "--json")
    assert rc == 0 and [d["license_id"] for d in json.loads(text)] == [lid]
    assert run("revoke", lid, "--reason", "test")[0] == 0
    rc, text = run("verify", str(out), "--json")
    assert rc == 1 and json.loads(text)["reason"] == "revoked"
    assert run("issue", "--model-id", mid, "--user", "")[0] == 2
    assert TOKEN not in text


def test_generated_code_is_current():
    from activeguard_proto import codegen

    assert codegen.stale() == [], "run: python -m activeguard_proto.codegen"


def test_activeguard_cli_has_license_commands(tmp_path):
    """``activeguard license-server`` / ``activeguard license ...`` come from the entry-point plugin."""
    from activeguard.cli.app import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"license-server", "license"} <= set(sub.choices)
    # --export-public-key creates the signing key the server will use and hands out its public half
    from license_server.cli import server_main

    pem = tmp_path / "license-server.pub.pem"
    assert server_main(["--data-dir", str(tmp_path / "d"), "--export-public-key", str(pem)]) == 0
    assert oct((tmp_path / "d" / "signing_key.pem").stat().st_mode & 0o777) == "0o600"
    exported = lic.key_id(lic.load_public_key(pem))
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "activeguard"),
            "license-server",
            "--data-dir",
            str(tmp_path / "d"),
            "--port",
            "0",
            "--metrics-port",
            "-1",
            "--ready-file",
            str(ready),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "ACTIVEGUARD_ADMIN_TOKEN": TOKEN},
    )
    try:
        deadline = time.monotonic() + 90
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        port = json.loads(ready.read_text())["port"]
        with LicenseClient(f"127.0.0.1:{port}", None, timeout=30) as c:
            assert list(c.verification_keys()) == [exported]  # the server signs with the exported key
    finally:
        proc.terminate()
        proc.wait(20)
    assert proc.returncode == 0


def _local_config(data_dir: Path, port: int = 0) -> ServerConfig:
    """An in-process server's config: loopback, no metrics endpoint (the registry is read directly)."""
    return ServerConfig(data_dir=data_dir, port=port, metrics_port=None, max_workers=4)


def test_free_slots_gauge_counts_unissued_slots(tmp_path, model_paths):
    """The gauge used to be set only while reserving, before the insert: one slot too many."""
    with (
        in_process(_local_config(tmp_path / "ls"), TOKEN) as server,
        LicenseClient(f"127.0.0.1:{server.port}", TOKEN, timeout=120) as c,
    ):
        mid = c.register_model(model_path=str(model_paths[0]), fo_scheme="paper").profile.model_id

        def free() -> float | None:
            return server.metrics.registry.get_sample_value("activeguard_free_slots", {"model": mid[:16]})

        assert free() == 30
        for issued in (1, 2):
            c.issue(mid, f"gauge-{issued}", 60)
            assert free() == 30 - issued == 30 - len(c.list(model_id=mid))


def test_page_token_must_be_one_the_server_returned(shared_server):
    """Only canonical decimal sequence numbers (what next_page_token holds) are accepted."""
    with shared_server.client() as c:

        def list_page(token: str) -> license_pb2.ListLicensesResponse:
            return c._admin("ListLicenses", license_pb2.ListLicensesRequest(page_token=token, page_size=1))

        for token in (
            "-1",
            "+1",
            " 1",
            "1 ",
            "01",
            "1_0",
            "0x1f",
            "1e3",
            "1.0",
            "\u0661",
            "x",
            str(2**63),
            "9" * 40,
            "-" * 10_000,
        ):
            code, details = _code(lambda token=token: list_page(token))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in details, token
            assert len(details) < 300, "a refusal must not echo a huge token back"
        for token in ("", "0", "5", str(2**63 - 1)):
            list_page(token)  # every token this server could have returned is accepted


def _not_checkpoints(where: Path) -> dict[str, tuple[Path, grpc.StatusCode, str]]:
    """name -> (path, expected code, words the refusal must contain) for files that are no classifier."""
    import numpy as np

    where.mkdir()
    (where / "notes.txt").write_text("this is not a model\n")
    (where / "empty.pt").write_bytes(b"")
    (where / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    (where / "a-directory").mkdir()
    torch.save({"weights": torch.zeros(3)}, where / "foreign.pt")
    torch.save({"format": CHECKPOINT_FORMAT}, where / "no-arch.pt")
    torch.save(
        {"format": CHECKPOINT_FORMAT, "arch": "mlp-regressor", "config": {}, "state_dict": {}}, where / "regressor.pt"
    )
    torch.save(
        {"format": CHECKPOINT_FORMAT, "arch": "lenet5", "config": {"bogus": 1}, "state_dict": {}},
        where / "bad-config.pt",
    )
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "arch": "lenet5",
            "config": {"num_classes": 10},
            "state_dict": {"fc3.bias": torch.zeros(7)},
        },
        where / "bad-weights.pt",
    )
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    return {
        "text": (where / "notes.txt", invalid, "torch.load"),
        "empty": (where / "empty.pt", invalid, "empty"),
        "random bytes": (where / "random.pt", invalid, "torch.load"),
        "directory": (where / "a-directory", invalid, "directory"),
        "foreign dict": (where / "foreign.pt", invalid, "not an ActiveGuard model checkpoint"),
        "no arch": (where / "no-arch.pt", invalid, "without 'arch'"),
        "regressor": (where / "regressor.pt", invalid, "classifier"),
        "bad config": (where / "bad-config.pt", invalid, "config"),
        "bad weights": (where / "bad-weights.pt", invalid, "missing: conv1.bias"),
        "missing": (where / "missing.pt", grpc.StatusCode.NOT_FOUND, "does not exist"),
    }


def test_register_refuses_files_that_are_not_checkpoints(shared_server, tmp_path):
    """Every refusal names the file and the problem; none leaks an internal error (e.g. IndexError)."""
    with shared_server.client() as c:
        for name, (path, want, words) in _not_checkpoints(tmp_path / "files").items():
            code, details = _code(lambda path=path: c.register_model(model_path=str(path), fo_scheme="paper"))
            assert (code, words in details, str(path) in details) == (want, True, True), (name, details)
            assert len(details) < 500, name
        code, details = _code(lambda: c.register_model(checkpoint=b"not a checkpoint"))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "uploaded checkpoint (16 bytes)" in details
        code, details = _code(lambda: c.register_model(model_path=str(tmp_path / ("a" * 1000))))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "File name too long" in details  # was INTERNAL
    assert not list((shared_server.data_dir / "models").glob("upload-*"))  # refused uploads leave nothing
    assert "internal error" not in shared_server.log_text()


class _StoppedServer:
    """Stands in for a stopped server on ``port``: it accepts each connection attempt and closes it at
    once, and counts the attempts, so the real server can come back right after a failed attempt
    (the worst moment under reconnect backoff; a refused connect could not be observed)."""

    def __init__(self, port: int):
        self.attempts = 0
        self._sock = socket.create_server(("127.0.0.1", port))
        self._sock.settimeout(0.05)
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            conn.close()
            self.attempts += 1

    def close(self) -> None:
        self._closing.set()
        self._thread.join()
        self._sock.close()


def _poll_until_served(client: LicenseClient, bound: float) -> float:
    """Seconds until ``client`` (polling like the gateway's revocation sync) is served again."""
    start = time.monotonic()
    while True:
        try:
            client.revocations()
            return time.monotonic() - start
        except grpc.RpcError:
            assert time.monotonic() - start < bound, f"the client was not served within {bound} s"
            time.sleep(0.05)


def test_client_reconnects_promptly_after_server_restart(tmp_path, capsys):
    """After a restart, revocation polls reach the server within about a second. With gRPC's default
    backoff (1 s x 1.6 per failed attempt) the 5th attempt waits ~4.1 s, and a longer outage ~26 s."""
    config = _local_config(tmp_path / "ls", port=free_port())
    with in_process(config, TOKEN):
        client = LicenseClient(f"127.0.0.1:{config.port}", None, timeout=1)
        client.revocations()
    try:
        assert _code(client.revocations)[0] == grpc.StatusCode.UNAVAILABLE  # stopped: calls fail fast
        down = _StoppedServer(config.port)
        try:
            deadline = time.monotonic() + 20
            while down.attempts < 4 and time.monotonic() < deadline:
                assert _code(client.revocations)[0] == grpc.StatusCode.UNAVAILABLE
                time.sleep(0.1)
            assert down.attempts >= 4, "the client stopped trying to reconnect"
        finally:
            down.close()
        with in_process(config, TOKEN):  # same port, same data dir
            delay = _poll_until_served(client, bound=15)
    finally:
        client.close()
    with capsys.disabled():
        print(f"\nlicense client served by the restarted server after {delay:.2f} s")
    assert delay <= 3.0
