"""The revoked license ids a worker knows of: a plain file, re-read only when it changes."""

from __future__ import annotations

import os
from pathlib import Path


class RevocationFile:
    """License ids, one per line, from ``path`` (None: nothing is ever revoked here).

    The gateway rewrites this file on every sync; a worker looks at its mtime once per batch and
    re-reads it only when it changed, so an update needs no restart. A missing file keeps the last
    list read.
    """

    def __init__(self, path: str | None):
        self.path = path
        self._revoked: frozenset[str] = frozenset()
        self._mtime: int | None = None

    def current(self) -> frozenset[str]:
        if not self.path:
            return self._revoked
        try:
            mtime = os.stat(self.path).st_mtime_ns
        except FileNotFoundError:
            return self._revoked
        if mtime != self._mtime:
            lines = Path(self.path).read_text().split()
            self._revoked = frozenset(line.strip() for line in lines if line.strip())
            self._mtime = mtime
        return self._revoked
