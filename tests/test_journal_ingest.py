"""The answer journals reach the database, and nothing is lost or counted twice (issue 33).

A real license-server process (``--answer-journal DIR``) ingests the journals of two "replicas":
two journal writers, the second killed mid-line and restarted (a new file, as a new worker process
gets). Every answer record is stored once (an answer both replicas journaled included), usage is
summed per license and reason, a line read while half-written is counted once it is whole, suspend
alerts from both replicas revoke their license once (the signed revocation list names it), answers
past the retention are pruned, and a restarted server does not read anything twice. Two ingesters
polling the same directory at once count each entry once. SQLite always; PostgreSQL in a fresh
schema when 127.0.0.1:5432 answers. ``license ingest`` does one pass without a server.

Licenses are stored as IssueLicense stores them, without generating fingerprints (that is
tests/test_license_server.py's subject): here only their ids and revocation matter.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("sqlalchemy", reason="needs the license-server extra: ./setup.sh --dev")

from activeguard.credentials.revocations import verify_revocations  # noqa: E402
from activeguard.watermark.answers import Mark  # noqa: E402
from activeguard.watermark.journal import AnswerRecord, JournalWriter  # noqa: E402
from activeguard.watermark.record_store import RecordStore, open_records  # noqa: E402
from activeguard.watermark.traffic import SUSPEND, AlertEntry, UsageEntry  # noqa: E402
from activeguard_proto.v1 import license_pb2  # noqa: E402
from license_server.cli import license_main  # noqa: E402
from license_server.ingestion import JournalIngester  # noqa: E402
from license_server.journal_ledger import JournalLedger  # noqa: E402
from license_server.process import LicenseServerProcess  # noqa: E402
from license_server.store import ModelRecord, Store  # noqa: E402
from tests.postgres import fresh_schema  # noqa: E402
from tests.processes import TOKEN  # noqa: E402

pytestmark = pytest.mark.timeout(120)

MODEL = "5e" * 32
ALICE, BOB = "lic-alice-0001", "lic-bob-0002"
DAY = 86400.0
POLL = "0.3"


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'licenses.db'}"
    else:
        with fresh_schema() as url:
            yield url


def _seed_licenses(url: str) -> None:
    """A model and two licenses, as RegisterModel and IssueLicense store them (fingerprints aside)."""
    now = int(time.time())
    store = Store(url)
    store.add_model(
        ModelRecord(MODEL, "journal-test", 10, (0.2, 0.3, 0.4), 0.01, (1, 28, 28), "float32", "unused.pt", now)
    )
    for i, (license_id, user) in enumerate(((ALICE, "alice"), (BOB, "bob"))):
        row = {"license_id": license_id, "model_id": MODEL, "user_name": user, "fo_class": i, "conf_index": 0}
        row |= {"fo_confidence": 0.2, "user_index": 3 * i, "payload": b"{}", "signature": b"-", "key_id": "test"}
        store.insert_license(row | {"issued_at": now, "expires_at": now + 3600})
    store.close()


def _answer(license_id: str, seed: int, age_days: float = 0.0) -> AnswerRecord:
    """A recorded answer: the input of ``seed`` (the same seed, the same record, whoever journals it)."""
    row = torch.rand(1, 28, 28, generator=torch.Generator().manual_seed(seed))
    record = AnswerRecord.of(MODEL, license_id, license_id[4:9], row, Mark(0, 3, 5, 1, 3, 0.05))
    return dataclasses.replace(record, at=time.time() - age_days * DAY)


def _usage(license_id: str, served: int, **refused: int) -> dict:
    return UsageEntry(MODEL, license_id, served, refused, time.time()).to_entry()


def _suspend(license_id: str) -> dict:
    return AlertEntry(MODEL, license_id, "prada", SUSPEND, time.time(), "min-distance shift 0.31").to_entry()


def _wait(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _server(tmp_path: Path, url: str, journals: Path) -> LicenseServerProcess:
    return LicenseServerProcess(
        tmp_path / "data",
        TOKEN,
        url,
        register_pool=0,
        extra_args=["--answer-journal", str(journals), "--journal-poll-s", POLL, "--answer-retention-days", "30"],
    )


def test_replicas_journals_reach_the_database_once(tmp_path, database, monkeypatch, capsys):
    _seed_licenses(database)
    journals = tmp_path / "journals"
    stale = [_answer(BOB, 600 + i, age_days=40) for i in range(3)]
    with RecordStore(database) as records:  # journaled before a retention was set: the server prunes them
        assert records.add(stale) == 3

    replica_a = JournalWriter(journals)
    alice = [_answer(ALICE, i) for i in range(40)]
    bob = [_answer(BOB, 100 + i) for i in range(20)]
    old = [_answer(ALICE, 500 + i, age_days=40) for i in range(5)]  # past retention: never kept
    replica_a.write([r.to_entry() for r in alice[:30] + old] + [_usage(ALICE, 40, expired=2), _usage(BOB, 5)])
    worker_b = JournalWriter(journals)  # alice's answers 20..29 reached both replicas
    worker_b.write([r.to_entry() for r in alice[20:] + bob[:10]] + [_usage(ALICE, 25, fingerprint=1)])
    with open(worker_b.path, "ab") as f:  # killed mid-write
        f.write(json.dumps(_usage(ALICE, 1000)).encode()[:30])
    worker_b.close()
    restarted_b = JournalWriter(journals)  # the worker again: a new process, a new file
    restarted_b.write([r.to_entry() for r in bob[10:]] + [_usage(BOB, 10, expired=1)])

    server = _server(tmp_path, database, journals)
    try:
        with server.client() as c:
            _wait(lambda: (c.usage(ALICE).served, c.usage(BOB).served) == (65, 15), "the first ingestion")
            alice_usage = c.usage(ALICE)
            assert {r.reason: r.rows for r in alice_usage.refused} == {"expired": 2, "fingerprint": 1}
            assert alice_usage.answer_records == 40 and c.usage(BOB).answer_records == 20
            assert time.time() - alice_usage.last_seen < 60

            line = json.dumps(_usage(BOB, 100)).encode() + b"\n"
            with open(restarted_b.path, "ab") as f:  # a line the server sees half-written
                f.write(line[:25])
                f.flush()
                time.sleep(4 * float(POLL))
                assert c.usage(BOB).served == 15
                f.write(line[25:])
            _wait(lambda: c.usage(BOB).served == 115, "the completed line")

            restarted_b.write([_suspend(BOB)])
            replica_a.write([_suspend(BOB)])  # both replicas flag bob: one revocation
            _wait(lambda: c.get(BOB).state == license_pb2.LICENSE_STATE_REVOKED, "the suspension")
            _wait(lambda: len(c.usage(BOB).alerts) == 2 and all(a.acted_at for a in c.usage(BOB).alerts), "alerts")
            assert sorted(a.action for a in c.usage(BOB).alerts) == ["already revoked", "revoked"]
            listed = verify_revocations(c.revocation_list(MODEL).text, c.verification_keys())
            assert set(listed.revoked) == {BOB}
            assert [r.license_id for r in c.revocations().revocations] == [BOB]
            assert c.get(ALICE).state == license_pb2.LICENSE_STATE_ACTIVE
    finally:
        server.stop()

    expected = {r.record_id: r for r in alice + bob}
    stored = {r.record_id: r for r in open_records(database, model_id=MODEL)}
    assert stored.keys() == expected.keys()  # each once; the stale and old ones gone
    assert all(stored[k].values == r.values and stored[k].label == r.label for k, r in expected.items())

    server = _server(tmp_path, database, journals)  # restarted: reads on from where it stopped
    try:
        replica_a.write([_usage(ALICE, 1)])
        with server.client() as c:
            _wait(lambda: c.usage(ALICE).served == 66, "the restarted server's ingestion")
        monkeypatch.setenv("ACTIVEGUARD_ADMIN_TOKEN", TOKEN)
        capsys.readouterr()
        assert license_main(["show", ALICE, "--server", server.target, "--json"]) == 0
        shown = json.loads(capsys.readouterr().out)["usage"]
        assert shown["served"] == 66 and shown["refused"] == {"expired": 2, "fingerprint": 1}
        assert shown["answer_records"] == 40 and shown["alerts"] == []
        assert license_main(["show", BOB, "--server", server.target]) == 0
        text = capsys.readouterr().out
        assert "115 rows served, 1 refused (expired 1)" in text and "policy suspend: revoked" in text
    finally:
        server.stop()
    assert sum(1 for _ in open_records(database, model_id=MODEL)) == 60


def test_two_ingesters_count_each_entry_once(tmp_path, database):
    """Two servers polling one directory over one database, while a worker writes."""
    journals = tmp_path / "journals"
    writer = JournalWriter(journals)
    stores = [Store(database) for _ in range(2)]
    ingesters = [JournalIngester(s, [journals]) for s in stores]
    stop = threading.Event()
    failures: list[BaseException] = []

    def poll(ingester: JournalIngester) -> None:
        try:
            while not stop.is_set():
                ingester.poll()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            failures.append(exc)

    threads = [threading.Thread(target=poll, args=(i,)) for i in ingesters]
    for t in threads:
        t.start()
    try:
        for i in range(60):
            writer.write([_usage(ALICE, 1, expired=1), _answer(ALICE, i).to_entry()])
            time.sleep(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    ingesters[0].poll()
    usage = JournalLedger(stores[0]).usage(ALICE)
    for s in stores:
        s.close()
    assert not failures
    assert (usage.served, usage.refused) == (60, {"expired": 60})
    assert sum(1 for _ in open_records(database)) == 60


def test_license_ingest_once_without_a_server(tmp_path, capsys):
    journals, url = tmp_path / "journals", f"sqlite:///{tmp_path / 'audit.db'}"
    writer = JournalWriter(journals)
    records = [_answer(ALICE, i) for i in range(10)] + [_answer(ALICE, 50, age_days=40)]
    writer.write([r.to_entry() for r in records] + [_usage(ALICE, 11), _suspend(ALICE), {"kind": "other"}])

    def ingest(*extra: str) -> dict:
        capsys.readouterr()
        assert license_main(["ingest", str(journals), "--db", url, "--json", *extra]) == 0
        return json.loads(capsys.readouterr().out)

    first = ingest("--answer-retention-days", "0")  # an air-gapped audit keeps everything
    assert (first["answers"], first["usage"], first["alerts"], first["skipped"]) == (11, 1, 1, 1)
    assert first["suspended"] == []  # no such license in this database: nothing to revoke
    again = ingest("--answer-retention-days", "0")
    assert (again["files"], again["answers"], again["usage"]) == (0, 0, 0)
    assert ingest()["pruned"] == 1  # the default 30 days
    from_db = {r.record_id for r in open_records(url)}
    assert from_db == {r.record_id for r in open_records(str(journals))} - {records[-1].record_id}
    assert license_main(["ingest", str(tmp_path / "missing"), "--db", url]) == 2


def test_a_schema_3_database_gains_the_journal_tables(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    Store(url).close()
    store = Store(url)
    with store.engine.begin() as conn:
        for table in ("ag_journal_offsets", "ag_license_usage", "ag_license_alerts"):
            conn.exec_driver_sql(f"DROP TABLE {table}")
        conn.exec_driver_sql("UPDATE ag_schema_version SET version = 3")
    store.close()
    store = Store(url)
    try:
        assert store.schema_version() == 4
        assert JournalLedger(store).usage(ALICE).served == 0
    finally:
        store.close()
