"""What the answer journals say about licenses, in the license store: usage, alerts, and read offsets.

Exactly once: a journal's span of lines is applied in one transaction that also moves the journal's
stored offset from where the reader started to where it stopped, and only if the offset was still
where it started. A restarted server resumes from the offset; a second server (or ``license ingest``)
reading the same lines loses that compare-and-set and rolls back, so usage is never counted twice.
Alerts are keyed besides (:meth:`AlertEntry.key`), and answer records by their record id.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from sqlalchemy import case, select, update
from sqlalchemy.engine import Connection

from activeguard.runtime.database import upsert
from activeguard.watermark.traffic import SUSPEND, AlertEntry, UsageEntry
from license_server.store import Store, as_record, guarded, journal_offsets, license_alerts, license_usage

SERVED, REFUSED = "served", "refused"


@dataclass(frozen=True)
class AlertRecord:
    """One stored alert; a suspend alert's ``action`` says what revoking the license did."""

    alert_key: str
    license_id: str
    model_id: str
    reason: str
    policy: str
    detail: str
    at: float
    acted_at: int | None
    action: str | None


@dataclass(frozen=True)
class LicenseUsage:
    """One license's traffic as the journals report it (``license show``)."""

    license_id: str
    served: int = 0
    refused: dict[str, int] = field(default_factory=dict)  # reason -> rows
    last_seen: float | None = None
    alerts: list[AlertRecord] = field(default_factory=list)


class JournalLedger:
    """The schema-4 tables of a :class:`Store`; raises only :class:`~license_server.store.StoreError`."""

    def __init__(self, store: Store):
        self.store = store
        self._db_errors = store._db_errors

    @guarded("reading a journal offset")
    def offset(self, journal: str) -> int:
        """Bytes of ``journal`` (a file name) already applied; 0 for a journal never read."""
        with self.store.engine.connect() as conn:
            found = conn.execute(select(journal_offsets.c.offset).where(journal_offsets.c.journal == journal)).scalar()
        return int(found or 0)

    @guarded("recording journal usage and alerts")
    def apply(self, journal: str, start: int, end: int, usage: list[UsageEntry], alerts: list[AlertEntry]) -> bool:
        """Apply the entries of bytes [start, end) of ``journal``; False (nothing applied) when another
        reader already moved its offset past ``start``."""
        with self.store.write() as conn:
            if not _advance(conn, journal, start, end):
                return False
            for entry in usage:
                _count(conn, entry)
            for alert in alerts:
                conn.execute(
                    upsert(conn, license_alerts)
                    .values(
                        alert_key=alert.key(journal),
                        license_id=alert.license_id,
                        model_id=alert.model_id,
                        reason=alert.reason,
                        policy=alert.policy,
                        detail=alert.detail,
                        at=alert.at,
                    )
                    .on_conflict_do_nothing(index_elements=["alert_key"])
                )
        return True

    @guarded("reading pending suspensions")
    def pending_suspensions(self) -> list[AlertRecord]:
        """Suspend alerts whose license has not been revoked for them yet, oldest first."""
        t = license_alerts
        query = select(t).where(t.c.policy == SUSPEND, t.c.acted_at.is_(None)).order_by(t.c.at)
        with self.store.engine.connect() as conn:
            return [as_record(AlertRecord, r) for r in conn.execute(query)]

    @guarded("recording a suspension")
    def mark_acted(self, alert_key: str, action: str) -> None:
        with self.store.write() as conn:
            conn.execute(
                update(license_alerts)
                .where(license_alerts.c.alert_key == alert_key, license_alerts.c.acted_at.is_(None))
                .values(acted_at=int(time.time()), action=action)
            )

    @guarded("reading a license's usage")
    def usage(self, license_id: str) -> LicenseUsage:
        with self.store.engine.connect() as conn:
            rows = conn.execute(select(license_usage).where(license_usage.c.license_id == license_id)).all()
            alerts = conn.execute(
                select(license_alerts).where(license_alerts.c.license_id == license_id).order_by(license_alerts.c.at)
            ).all()
        return LicenseUsage(
            license_id,
            served=sum(r.rows for r in rows if r.outcome == SERVED),
            refused={r.reason: r.rows for r in rows if r.outcome == REFUSED},
            last_seen=max((r.last_seen for r in rows), default=None),
            alerts=[as_record(AlertRecord, r) for r in alerts],
        )


def _advance(conn: Connection, journal: str, start: int, end: int) -> bool:
    """Compare-and-set the journal's offset from ``start`` to ``end`` (the row locked until commit)."""
    t = journal_offsets
    now = int(time.time())
    if start == 0:  # a journal never read has no row yet; two first readers both insert, one keeps it
        conn.execute(
            upsert(conn, t)
            .values(journal=journal, offset=0, updated_at=now)
            .on_conflict_do_nothing(index_elements=["journal"])
        )
    moved = conn.execute(
        update(t).where(t.c.journal == journal, t.c.offset == start).values(offset=end, updated_at=now)
    )
    return moved.rowcount == 1


def _count(conn: Connection, entry: UsageEntry) -> None:
    """Add one usage entry's rows to its license's totals (served, and each refusal reason)."""
    t = license_usage
    counts = [(SERVED, "", entry.served), *((REFUSED, reason, n) for reason, n in entry.refused.items())]
    for outcome, reason, rows in counts:
        if rows <= 0:
            continue
        stmt = upsert(conn, t).values(
            license_id=entry.license_id,
            outcome=outcome,
            reason=reason,
            model_id=entry.model_id,
            rows=rows,
            last_seen=entry.at,
        )
        newer = stmt.excluded.last_seen > t.c.last_seen
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=["license_id", "outcome", "reason"],
                set_={
                    "rows": t.c.rows + stmt.excluded.rows,
                    "last_seen": case((newer, stmt.excluded.last_seen), else_=t.c.last_seen),
                },
            )
        )
