"""Answer records in a database, where the extraction audit reads them without the license server.

The license server ingests every worker's journal (:mod:`activeguard.watermark.journal`) into this
table (``--answer-journal``), or ``activeguard license ingest DIR --db URL`` does it once; the same
URL forms as the license server's store (``sqlite:///path``, ``postgresql+psycopg://...``). A record's
key is :attr:`AnswerRecord.record_id`, so a journal ingested twice, or the same answer journaled by
two replicas, is stored once. Inputs stay as the journal packs them (float32, zlib) in a BLOB.

:func:`open_records` is the audit's one entry point: a journal directory or a database URL in, the
:class:`AnswerRecord` objects out.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from activeguard.runtime.database import database_errors, describe, lock_schema, open_engine, redact_url, upsert
from activeguard.watermark.journal import AnswerRecord, answer_records, answers_in, pack_input, unpack_input

if TYPE_CHECKING:
    from sqlalchemy import Table
    from sqlalchemy.engine import Engine

logger = logging.getLogger(__name__)

TABLE = "ag_answer_records"
PAGE = 1000  # rows per read transaction: a slow audit never holds the database for long
BATCH = 500  # records per write transaction


class RecordStoreError(Exception):
    """The record store cannot be opened or used. The message is safe to show a client; ``detail`` (the
    database's own words) is for a log."""

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail


@functools.cache
def answer_table() -> Table:
    """The table (built on first use, so importing this module needs no SQLAlchemy)."""
    from sqlalchemy import Column, Float, Index, Integer, LargeBinary, MetaData, String, Table, Text

    return Table(
        TABLE,
        MetaData(),
        Column("record_id", String(64), primary_key=True),
        Column("model_id", String(64), nullable=False),
        Column("license_id", String(64), nullable=False),
        Column("user_name", String(256), nullable=False),
        Column("shape", Text, nullable=False),  # JSON list
        Column("input", LargeBinary, nullable=False),  # journal.pack_input: float32 little-endian, zlib
        Column("owner_label", Integer, nullable=False),
        Column("runner_up", Integer, nullable=False),
        Column("third", Integer, nullable=False),
        Column("label", Integer, nullable=False),
        Column("margin", Float, nullable=False),
        Column("at", Float, nullable=False, index=True),  # answer time: retention prunes by it
        # the audit reads one model (or license) in pages ordered by this key
        Index("ix_ag_answer_records_owner", "model_id", "license_id", "record_id"),
    )


class RecordStore:
    """The answer-record table of one database; raises only :class:`RecordStoreError`."""

    def __init__(self, database: str | Engine, *, create: bool = True):
        """``database``: a URL, or the engine of a store that shares the database (the license server's).
        ``create=False`` refuses a database without the table instead of creating it (a reader's mistake)."""
        try:
            from sqlalchemy.exc import SQLAlchemyError
        except ImportError:
            raise RecordStoreError(
                "a record store needs SQLAlchemy: pip install 'activeguard[license-server]'"
            ) from None
        self._owns_engine = isinstance(database, str)
        try:
            if isinstance(database, str):
                _check_exists(database, create)
                database = open_engine(database)
        except (SQLAlchemyError, ImportError, ValueError) as exc:  # a bad URL, a missing driver or file
            raise RecordStoreError(f"cannot open the record store: {describe(exc)}") from None
        self.engine = database
        self._errors = database_errors(database)
        try:
            self._prepare(create)
        except RecordStoreError:
            self.close()
            raise

    @contextmanager
    def _failing_as(self, op: str) -> Iterator[None]:
        try:
            yield
        except self._errors as exc:
            raise RecordStoreError(
                f"the record store is unavailable ({op} failed); retry later", describe(exc)
            ) from exc

    def _prepare(self, create: bool) -> None:
        from sqlalchemy import inspect

        with self._failing_as("preparing its table"):
            if not create:
                if not inspect(self.engine).has_table(TABLE):
                    url = redact_url(str(self.engine.url))
                    raise RecordStoreError(f"{url} holds no answer records (no table {TABLE})")
                return
            with self.engine.begin() as conn:
                lock_schema(conn)
                answer_table().metadata.create_all(conn, checkfirst=True)

    def close(self) -> None:
        if self._owns_engine:
            self.engine.dispose()

    def __enter__(self) -> RecordStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- writing -------------------------------------------------------------------------------

    def ingest(self, entries: Iterable[dict[str, Any]], *, not_before: float = 0.0) -> int:
        """Store the answer records among journal ``entries`` (other kinds and malformed ones are skipped;
        answers older than ``not_before`` too: retention would prune them); returns how many were new."""
        return self.add(r for r in answers_in(entries) if r.at >= not_before)

    def add(self, records: Iterable[AnswerRecord]) -> int:
        """Store ``records``, each once however often it comes; returns how many were new."""
        batch: dict[str, AnswerRecord] = {}
        new = 0
        for record in records:
            batch[record.record_id] = record
            if len(batch) >= BATCH:
                new += self._insert(batch)
                batch = {}
        return new + (self._insert(batch) if batch else 0)

    def _insert(self, batch: dict[str, AnswerRecord]) -> int:
        from sqlalchemy import select

        t = answer_table()
        with self._failing_as("storing answer records"), self.engine.begin() as conn:
            known = set(conn.scalars(select(t.c.record_id).where(t.c.record_id.in_(list(batch)))))
            rows = [_row(r) for key, r in batch.items() if key not in known]
            if rows:  # DO NOTHING: another ingester may store the same record between the two statements
                conn.execute(upsert(conn, t).on_conflict_do_nothing(index_elements=["record_id"]), rows)
        return len(rows)

    def prune(self, older_than: float) -> int:
        """Delete the records answered before ``older_than`` (unix seconds); returns how many."""
        from sqlalchemy import delete

        t = answer_table()
        with self._failing_as("pruning answer records"), self.engine.begin() as conn:
            return int(conn.execute(delete(t).where(t.c.at < older_than)).rowcount or 0)

    # -- reading -------------------------------------------------------------------------------

    def records(self, model_id: str | None = None, license_id: str | None = None) -> Iterator[AnswerRecord]:
        """The stored records (of one model and/or license), in pages of :data:`PAGE` short reads."""
        from sqlalchemy import literal, select, tuple_

        t = answer_table()
        key = (t.c.model_id, t.c.license_id, t.c.record_id)
        query = select(t).order_by(*key).limit(PAGE)
        if model_id is not None:
            query = query.where(t.c.model_id == model_id)
        if license_id is not None:
            query = query.where(t.c.license_id == license_id)
        after: tuple[str, str, str] | None = None
        while True:
            page = query if after is None else query.where(tuple_(*key) > tuple_(*map(literal, after)))
            with self._failing_as("reading answer records"), self.engine.connect() as conn:
                rows = conn.execute(page).all()
            yield from (_record(r) for r in rows)
            if len(rows) < PAGE:
                return
            after = (rows[-1].model_id, rows[-1].license_id, rows[-1].record_id)

    def count(self, model_id: str | None = None, license_id: str | None = None) -> int:
        from sqlalchemy import func, select

        t = answer_table()
        query = select(func.count()).select_from(t)
        if model_id is not None:
            query = query.where(t.c.model_id == model_id)
        if license_id is not None:
            query = query.where(t.c.license_id == license_id)
        with self._failing_as("counting answer records"), self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())


def _check_exists(url: str, create: bool) -> None:
    """A reader's SQLite URL must name an existing file (SQLite would create an empty one)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if not create and parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        if not Path(parsed.database).is_file():
            raise ValueError(f"no database file {parsed.database}")


def _row(r: AnswerRecord) -> dict[str, Any]:
    return {
        "record_id": r.record_id,
        "model_id": r.model_id,
        "license_id": r.license_id,
        "user_name": r.user,
        "shape": json.dumps(list(r.shape)),
        "input": pack_input(r.values),
        "owner_label": r.owner_label,
        "runner_up": r.runner_up,
        "third": r.third,
        "label": r.label,
        "margin": r.margin,
        "at": r.at,
    }


def _record(row: Any) -> AnswerRecord:
    shape = tuple(json.loads(row.shape))
    return AnswerRecord(
        row.model_id,
        row.license_id,
        row.user_name,
        shape,
        unpack_input(bytes(row.input), shape),
        row.owner_label,
        row.runner_up,
        row.third,
        row.label,
        row.margin,
        row.at,
    )


def open_records(source: str, model_id: str | None = None, license_id: str | None = None) -> Iterator[AnswerRecord]:
    """The answer records of ``source`` (of one model and/or license when given), each once.

    ``source`` is a journal directory (the workers' files, read in place) or a database URL (anything
    with ``://``: what the license server or ``license ingest`` stored). Raises at once, before any
    record is read, when it is neither (:class:`FileNotFoundError`, :class:`RecordStoreError`)."""
    if "://" not in source:
        if not Path(source).is_dir():
            raise FileNotFoundError(f"{source} is neither a journal directory nor a database URL")
        return answer_records(source, model_id, license_id)
    store = RecordStore(source, create=False)

    def read() -> Iterator[AnswerRecord]:
        with store:
            yield from store.records(model_id, license_id)

    return read()
