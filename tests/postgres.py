"""The tests' PostgreSQL: 127.0.0.1:5432, database ``test`` (user root, else postgres), one fresh
schema per use, dropped afterwards; tests skip with a message when no server answers."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

HOST, PORT, DATABASE = "127.0.0.1", 5432, "test"


def base_url() -> str | None:
    """A SQLAlchemy URL for the first user that connects, or None."""
    try:
        import psycopg
    except ImportError:
        return None
    for user in ("root", "postgres"):
        try:
            with psycopg.connect(host=HOST, port=PORT, dbname=DATABASE, user=user, connect_timeout=3):
                return f"postgresql+psycopg://{user}@{HOST}:{PORT}/{DATABASE}"
        except Exception:  # noqa: BLE001
            continue
    return None


@contextmanager
def fresh_schema() -> Iterator[str]:
    """A PostgreSQL URL confined to a new schema (``search_path``), dropped on exit even after a failure."""
    base = base_url()
    if base is None:
        pytest.skip(f"PostgreSQL not reachable at {HOST}:{PORT} (database {DATABASE!r}, user root or postgres)")
    import psycopg

    schema = f"ag_test_{uuid.uuid4().hex[:12]}"
    user = base.split("//")[1].split("@")[0]

    def run(sql: str) -> None:
        with psycopg.connect(host=HOST, port=PORT, dbname=DATABASE, user=user, autocommit=True) as conn:
            conn.execute(sql)

    run(f'CREATE SCHEMA "{schema}"')
    try:
        yield f"{base}?options=-csearch_path%3D{schema}"
    finally:
        run(f'DROP SCHEMA "{schema}" CASCADE')
