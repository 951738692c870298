"""What the answer journal keeps: database bytes per 1,000 queries, natural and extraction-like.

The bundled MNIST LeNet-5 owner (the workload's cached owner) is served in this process with the
answer watermark on (the default band, as ``activeguard evaluate extraction``). Three licenses query it:

* ``natural``: the owner's own MNIST digits, as a benign client sends them;
* ``knockoff``: Knockoff-style queries (scikit-learn's digits, reframed and augmented);
* ``jbda``: the JBDA-style attack itself (seeds grown by Jacobian augmentation, surrogates trained).

Each license's answer records are stored in a database of its own through the record store (the
code ``license ingest`` and the license server use), and the database's own account is reported:
SQLite pages in use after VACUUM (table, primary key and indexes), and, with ``--postgres URL``,
``pg_total_relation_size`` of the table in a fresh schema; each less the empty table's size. Usage:

    .venv/bin/python -m benchmarks.bench_answer_records [--queries 5000] [--postgres URL] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from activeguard.experiments import extraction_attacks as attacks
from activeguard.experiments.served import ServedModel
from activeguard.models import sources
from activeguard.models.workloads import DEFAULT_WORKLOAD, get
from activeguard.watermark.answers import DEFAULT_MARGIN, create_secret_file
from activeguard.watermark.journal import answer_records
from activeguard.watermark.record_store import RecordStore, answer_table
from benchmarks.common import write_result

ROOT = Path(__file__).resolve().parent.parent


def _queries(served: ServedModel, split: Any, n: int, seed: int) -> dict[str, Callable[[str], int]]:
    """Per scenario, a function that sends its queries under a session and returns how many it sent."""

    def natural(session: str) -> int:
        x = torch.cat([split.x_test, split.x_train])[:n]
        served.answer(x, session)
        return len(x)

    def knockoff(session: str) -> int:
        x = attacks.related_digits(n, split.input_shape[-1], seed)
        served.answer(x, session)
        return len(x)

    def jbda(session: str) -> int:
        seeds = attacks.related_digits(max(1, n // 16), split.input_shape[-1], seed + 1)
        return attacks.jbda(lambda x: served.answer(x, session).argmax(1), seeds, rounds=4, epochs=5, seed=seed)[1]

    return {"natural": natural, "knockoff": knockoff, "jbda": jbda}


def _sqlite_bytes(path: Path) -> int:
    """Bytes of the pages the database uses, after VACUUM (what the data costs, not free pages)."""
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("VACUUM")
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        return pages * conn.execute("PRAGMA page_size").fetchone()[0]


def _sqlite_cost(records: list, work: Path, name: str) -> int:
    empty, full = work / f"{name}-empty.db", work / f"{name}.db"
    for path, rows in ((empty, []), (full, records)):
        with RecordStore(f"sqlite:///{path}") as store:
            store.add(rows)
    return _sqlite_bytes(full) - _sqlite_bytes(empty)


def _postgres_cost(records: list, url: str) -> int:
    """The table's total size (heap, TOAST, indexes) in a fresh schema, less the empty table's."""
    from sqlalchemy import text

    from activeguard.runtime.database import open_engine

    schema = f"ag_bench_{uuid.uuid4().hex[:12]}"
    engine = open_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    scoped = engine.execution_options(schema_translate_map={None: schema})
    size = text(f"SELECT pg_total_relation_size('\"{schema}\".{answer_table().name}')")
    try:
        store = RecordStore(scoped)
        with scoped.connect() as conn:
            before = conn.execute(size).scalar_one()
        store.add(records)
        with scoped.connect() as conn:
            conn.execute(text(f'ANALYZE "{schema}".{answer_table().name}'))
            return int(conn.execute(size).scalar_one() - before)
    finally:
        with engine.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()


def _journal_bytes(records: list) -> int:
    return sum(len(json.dumps(r.to_entry(), separators=(",", ":"))) + 1 for r in records)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--queries", type=int, default=5000, help="queries per scenario (jbda: about this many)")
    p.add_argument(
        "--postgres", default=None, metavar="URL", help="also measure PostgreSQL (a schema is made and dropped)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "answer_records.json"))
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    work = get(DEFAULT_WORKLOAD)
    size = work.size(True)
    split = work.data(args.seed, size)
    loaded = sources.load(work.owner(args.seed, size, split=split).paths["checkpoint"])
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        create_secret_file(tmp_path / "key.agkey")
        served = ServedModel(
            loaded,
            answer_watermark_margin=DEFAULT_MARGIN,
            answer_key_file=str(tmp_path / "key.agkey"),
            answer_journal_dir=str(tmp_path / "journal"),
        )
        scenarios: dict[str, dict[str, Any]] = {}
        for name, send in _queries(served, split, args.queries, args.seed).items():
            started = time.perf_counter()
            scenarios[name] = {"queries": send(served.session(name, license_id=f"license-{name}"))}
            scenarios[name]["seconds"] = round(time.perf_counter() - started, 1)
        everything = list(answer_records(tmp_path / "journal"))
        for name, cell in scenarios.items():
            records = [r for r in everything if r.license_id == f"license-{name}"]
            per_1000 = 1000 / cell["queries"]
            cell |= {"records": len(records), "records_per_1000_queries": round(len(records) * per_1000, 1)}
            cell["journal_bytes_per_1000_queries"] = round(_journal_bytes(records) * per_1000)
            sqlite = _sqlite_cost(records, tmp_path, name)
            cell |= {"sqlite_bytes_per_1000_queries": round(sqlite * per_1000)}
            cell["sqlite_bytes_per_record"] = round(sqlite / max(1, len(records)))
            if args.postgres:
                postgres = _postgres_cost(records, args.postgres)
                cell["postgres_bytes_per_1000_queries"] = round(postgres * per_1000)
                cell["postgres_bytes_per_record"] = round(postgres / max(1, len(records)))
    result = {
        "benchmark": "answer_records",
        "model": f"{DEFAULT_WORKLOAD} owner {loaded.model_id[:16]}",
        "input_shape": list(split.input_shape),
        "margin_nats": DEFAULT_MARGIN,
        "scenarios": scenarios,
    }
    write_result(result, Path(args.out))
    return result


if __name__ == "__main__":
    main()
