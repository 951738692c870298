"""Answer journals into the license store: the server's ``--answer-journal`` poller and ``license ingest``.

Each pass reads every journal file of the directories from its stored offset (whole lines only: a
torn last line waits for the next pass, or stays at the end of a dead worker's file), stores the
answer records (:class:`~activeguard.watermark.record_store.RecordStore`, each once), applies usage
and alerts with the offset (:class:`~license_server.journal_ledger.JournalLedger`, exactly once),
revokes the license of every suspend alert not yet acted on, and prunes answer records past the
retention. Any number of servers may poll the same directories over one database.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from activeguard.watermark.journal import MAX_LINE_BYTES, journal_files, read_entries
from activeguard.watermark.record_store import RecordStore, RecordStoreError
from activeguard.watermark.traffic import ALERT, USAGE, AlertEntry, UsageEntry
from license_server.journal_ledger import JournalLedger
from license_server.logs import log_event
from license_server.store import LicenseRecord, Store, StoreError

READ_BYTES = 4 * MAX_LINE_BYTES  # one read of a journal's backlog: whole lines up to 64 MiB
DAY = 86400.0
SUSPEND_REASON = "suspended: the extraction monitor raised a {reason} alert"


@dataclass
class IngestReport:
    """What one pass did (counts only: journals hold users' inputs, reports never do)."""

    files: int = 0
    bytes: int = 0
    answers: int = 0  # records new to the store
    usage: int = 0
    alerts: int = 0
    skipped: int = 0  # entries of no known kind, or malformed usage and alert entries
    suspended: list[str] = field(default_factory=list)  # licenses revoked by this pass
    pruned: int = 0
    errors: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


class JournalIngester:
    """One database, any number of journal directories; :meth:`poll` is one pass."""

    def __init__(
        self,
        store: Store,
        directories: Sequence[str | Path],
        *,
        retention_days: float = 30.0,
        records: RecordStore | None = None,
        on_revoked: Callable[[LicenseRecord], None] | None = None,
    ):
        """``retention_days`` 0 keeps answer records for ever; ``on_revoked`` is told of each license a
        suspend alert revoked (the server counts and logs it)."""
        self.store = store
        self.directories = [Path(d) for d in directories]
        self.retention = retention_days * DAY
        self.records = records or RecordStore(store.engine)
        self.ledger = JournalLedger(store)
        self.on_revoked = on_revoked

    def poll(self) -> IngestReport:
        report = IngestReport()
        for directory in self.directories:
            for path in journal_files(directory):
                try:
                    self._ingest(path, report)
                except (OSError, StoreError, RecordStoreError) as exc:
                    report.errors += 1
                    detail = getattr(exc, "detail", "")
                    log_event(
                        logging.WARNING,
                        "journal not ingested; retried next pass",
                        journal=str(path),
                        error=str(exc),
                        detail=detail,
                    )
        self._guard(report, "suspending licenses", self._suspend)
        self._guard(report, "pruning answer records", self._prune)
        return report

    def _guard(self, report: IngestReport, what: str, step: Callable[[IngestReport], None]) -> None:
        """Run one step of the pass; a database failure is logged and the next pass tries again."""
        try:
            step(report)
        except (StoreError, RecordStoreError) as exc:
            report.errors += 1
            log_event(
                logging.WARNING, f"{what} failed; retried next pass", error=str(exc), detail=getattr(exc, "detail", "")
            )

    def _ingest(self, path: Path, report: IngestReport) -> None:
        """Every complete line of ``path`` past its stored offset, a chunk of at most :data:`READ_BYTES` at a time."""
        start = self.ledger.offset(path.name)
        size = path.stat().st_size
        if size < start:
            log_event(logging.WARNING, "journal is shorter than what was ingested; left alone", journal=str(path))
            return
        read_any = False
        while start < size:
            entries, end = read_entries(path, start, READ_BYTES)
            if end == start:
                break  # a torn or unfinished last line: the next pass reads it whole
            report.answers += self.records.ingest(entries, not_before=self._cutoff())
            usage, alerts, skipped = _traffic(entries)
            if not self.ledger.apply(path.name, start, end, usage, alerts):
                break  # another reader applied these lines first: its count stands
            read_any = True
            report.bytes += end - start
            report.usage += len(usage)
            report.alerts += len(alerts)
            report.skipped += skipped
            start = end
        report.files += int(read_any)

    def _suspend(self, report: IngestReport) -> None:
        """Revoke, through the store's revoke (the signed revocation list reads it), every license a
        pending suspend alert names; each alert is acted on once, whichever server gets there first."""
        for alert in self.ledger.pending_suspensions():
            row, new = self.store.revoke(alert.license_id, SUSPEND_REASON.format(reason=alert.reason))
            if row is None:
                action = "no such license in this database"
            elif new:
                action = "revoked"
                report.suspended.append(row.license_id)
                if self.on_revoked is not None:
                    self.on_revoked(row)
            else:
                action = "already revoked"
            self.ledger.mark_acted(alert.alert_key, action)
            log_event(logging.WARNING, "suspend alert acted on", license_id=alert.license_id, action=action)

    def _prune(self, report: IngestReport) -> None:
        if self.retention > 0:
            report.pruned += self.records.prune(self._cutoff())

    def _cutoff(self) -> float:
        """Answers before this are past retention (0: keep every one)."""
        return time.time() - self.retention if self.retention > 0 else 0.0


def _traffic(entries: list[dict[str, Any]]) -> tuple[list[UsageEntry], list[AlertEntry], int]:
    """The well-formed usage and alert entries, and how many entries were neither (nor answers)."""
    usage: list[UsageEntry] = []
    alerts: list[AlertEntry] = []
    skipped = 0
    for entry in entries:
        kind = entry.get("kind")
        try:
            if kind == USAGE:
                usage.append(UsageEntry.from_entry(entry))
            elif kind == ALERT:
                alerts.append(AlertEntry.from_entry(entry))
            elif kind != "answer":
                skipped += 1
        except ValueError:
            skipped += 1
    return usage, alerts, skipped


class IngestLoop:
    """:meth:`JournalIngester.poll` every ``period`` seconds on a daemon thread, until :meth:`stop`."""

    def __init__(self, ingester: JournalIngester, period: float, on_report: Callable[[IngestReport], None]):
        self.ingester, self.period, self.on_report = ingester, period, on_report
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="journal-ingest", daemon=True)

    def start(self) -> IngestLoop:
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            try:
                self.on_report(self.ingester.poll())
            except Exception as exc:  # noqa: BLE001 - the poller must outlive any one bad pass
                log_event(logging.ERROR, "journal ingestion pass failed", error=f"{type(exc).__name__}: {exc}")
            if self._stop.wait(self.period):
                return

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
