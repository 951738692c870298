"""Rows served and refused per license, summed in the worker and journalled every few seconds.

The license server sums the journal's ``usage`` entries per license (``license show``). A worker
keeps one running count per license and writes one :class:`~activeguard.watermark.traffic.UsageEntry`
per license at most every :data:`USAGE_INTERVAL_S` seconds, at the end of a batch (with that
batch's answer records, in the same write), so the journal grows by one line per active license
and interval rather than one per request. A worker that dies loses at most that interval's counts.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from activeguard.watermark.traffic import UsageEntry

USAGE_INTERVAL_S = 5.0


class UsageLedger:
    """Rows per license since the last journal write."""

    def __init__(self, model_id: str, interval_s: float = USAGE_INTERVAL_S, clock=time.monotonic):
        self.model_id, self.interval_s, self._clock = model_id, interval_s, clock
        self._served: Counter[str] = Counter()
        self._refused: dict[str, Counter[str]] = {}
        self._last = clock()

    def count(self, license_id: str, reason: str, rows: int, admitted: bool) -> None:
        if admitted:
            self._served[license_id] += rows
        else:
            self._served.setdefault(license_id, 0)
            self._refused.setdefault(license_id, Counter())[reason] += rows

    def due(self, force: bool = False) -> list[dict[str, Any]]:
        """The usage entries to write now (every license counted since the last ones), or none while the
        interval has not passed."""
        if not self._served or not (force or self._clock() - self._last >= self.interval_s):
            return []
        at = time.time()
        entries = [
            UsageEntry(self.model_id, license_id, served, dict(self._refused.get(license_id, {})), at).to_entry()
            for license_id, served in self._served.items()
        ]
        self._served, self._refused, self._last = Counter(), {}, self._clock()
        return entries
