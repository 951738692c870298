"""Opening a SQL database as every ActiveGuard store does: SQLite (a file, WAL) or PostgreSQL, by URL.

One place for the settings that make several writers safe (the license store, the answer-record
store and the journal ingester may share one SQLite file): WAL, a busy timeout, and ``BEGIN
IMMEDIATE`` so that two connections never deadlock upgrading read locks. SQLAlchemy is imported
lazily: the library runs without it until a database is opened.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy import Table
    from sqlalchemy.engine import Connection, Engine

SCHEMA_LOCK = 7302446117  # PostgreSQL advisory lock id held while a store creates or migrates tables


def open_engine(url: str, *, echo: bool = False) -> Engine:
    """An engine for ``url`` (sqlite:///path or postgresql+psycopg://...); SQLite set up for several writers."""
    from sqlalchemy import create_engine

    engine = create_engine(url, echo=echo, pool_pre_ping=True, future=True)
    if engine.dialect.name == "sqlite":
        _sqlite_setup(engine)
    return engine


def _sqlite_setup(engine: Engine) -> None:
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record):  # noqa: ANN001
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (below)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn):  # noqa: ANN001
        # Take the write lock at BEGIN: no deadlock when two processes upgrade read locks.
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def database_errors(engine: Engine) -> tuple[type[BaseException], ...]:
    """SQLAlchemy's errors and the driver's own (some escape SQLAlchemy's wrapping)."""
    from sqlalchemy.exc import SQLAlchemyError

    dbapi = getattr(engine.dialect, "loaded_dbapi", None) or getattr(engine.dialect, "dbapi", None)
    driver_error = getattr(dbapi, "Error", None)
    return (SQLAlchemyError, driver_error) if isinstance(driver_error, type) else (SQLAlchemyError,)


def describe(exc: BaseException) -> str:
    """A one-line account of a database failure, for a log (never the statement's parameters)."""
    orig = getattr(exc, "orig", None) or exc
    return f"{type(orig).__name__}: {str(orig).splitlines()[0] if str(orig) else ''}"


def redact_url(url: str) -> str:
    """The database URL without its password (for logs)."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - never let a log line fail
        return "<unparseable database url>"


def lock_schema(conn: Connection) -> None:
    """Two processes starting on one empty PostgreSQL database must not race on CREATE TABLE."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy import text

        conn.execute(text(f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK})"))


def upsert(conn: Connection, table: Table) -> Any:
    """``INSERT`` with ``on_conflict_do_nothing``/``on_conflict_do_update``: the dialect's own construct."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif conn.dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:
        raise ValueError(f"{conn.dialect.name} is not supported: use SQLite or PostgreSQL")
    return insert(table)
