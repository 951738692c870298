"""The revoked license ids a worker knows of: a signed list, kept fresh within a bound, or no list at all.

The license server signs its revocation list (:mod:`activeguard.credentials.revocations`); a worker
gets it from the server itself or from a file (the gateway rewrites one on every sync, and
``activeguard license revocations --out`` exports one for deployments that cannot reach the server).
Every list is checked before use: the signature against the license keys the archive trusts, and
the version against the list held (a smaller version is an older list: taking it would un-revoke).
A list that fails either check is refused and the held one kept. A file is looked at (one stat) on
every batch; the server is asked every ``refresh_s`` seconds from a background thread.

Staleness is the held list's age since the license server issued it. Past ``max_age_s`` the
profile's policy decides: ``refuse`` (the default: fail closed, every licensed or session request is
refused with ``revocation_list_stale`` until a fresh list arrives) or ``serve`` (keep serving on the
last list). A worker that has never held a list is stale.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from activeguard.credentials.revocations import RevocationList, RevocationListError, verify_revocations

logger = logging.getLogger(__name__)

STALE_POLICIES = ("refuse", "serve")
Fetch = Callable[[], "str | None"]  # the list's signed text, or None when nothing changed since the last call


@dataclass(frozen=True)
class RevocationState:
    """What one batch is judged against."""

    revoked: frozenset[str]
    age_s: float | None  # seconds since the held list was issued; None: no revocation source at all
    stale: bool  # past the maximum age (or never fetched) under the ``refuse`` policy: refuse credentials
    version: int = -1


NO_SOURCE = RevocationState(frozenset(), None, False)


class NoRevocations:
    """A deployment with no revocation source: nothing is ever revoked here (the gateway may still be)."""

    def current(self) -> RevocationState:
        return NO_SOURCE

    def start(self) -> None:
        pass


class FileSource:
    """A signed list in a file; read again only when the file changes."""

    cheap = True  # a stat per batch: checked on every batch, no thread needed

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._seen: int | None = None
        self.name = f"file {self.path}"

    def __call__(self) -> str | None:
        try:
            mtime = os.stat(self.path).st_mtime_ns
        except FileNotFoundError:
            return None
        if mtime == self._seen:
            return None
        text = self.path.read_text(encoding="utf-8", errors="replace")
        self._seen = mtime
        return text


class SignedRevocations:
    """A verified revocation list, refreshed from ``fetch`` at most every ``refresh_s`` seconds."""

    def __init__(
        self,
        fetch: Fetch,
        keys: Mapping[str, Ed25519PublicKey],
        *,
        refresh_s: float = 5.0,
        max_age_s: float = 300.0,
        policy: str = "refuse",
        source: str = "",
        clock: Callable[[], float] = time.time,
    ):
        if policy not in STALE_POLICIES:
            raise ValueError(f"revocation stale policy must be one of {', '.join(STALE_POLICIES)}, got {policy!r}")
        if refresh_s <= 0 or max_age_s <= 0:
            raise ValueError("revocation refresh and maximum age must be positive")
        self.fetch, self.keys = fetch, keys
        self.refresh_s, self.max_age_s, self.policy = refresh_s, max_age_s, policy
        self.source = source or getattr(fetch, "name", "revocation source")
        self.clock = clock
        self.cheap = bool(getattr(fetch, "cheap", False))  # a file: look on every batch (a change costs a read)
        self.held: RevocationList | None = None
        self.refused = 0  # lists refused (forged, tampered, rolled back): a counter for metrics and tests
        self._due = 0.0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def refresh(self) -> bool:
        """Fetch once; True when a newer list was taken. Never raises: a failed fetch keeps the held list."""
        try:
            text = self.fetch()
        except Exception as exc:  # the server unreachable, a file unreadable: keep what we hold
            logger.warning("revocation list from %s not refreshed: %s", self.source, _line(exc))
            return False
        if text is None:
            return False
        try:
            listed = verify_revocations(text, self.keys)
        except RevocationListError as exc:
            self.refused += 1
            logger.warning("revocation list from %s refused: %s", self.source, exc)
            return False
        with self._lock:
            held = self.held
            if held is not None and listed.version < held.version:
                self.refused += 1
                logger.warning(
                    "revocation list from %s refused: version %d is older than the held %d (rolled back?)",
                    self.source,
                    listed.version,
                    held.version,
                )
                return False
            if held is not None and (listed.version, listed.issued_at) <= (held.version, held.issued_at):
                return False
            self.held = listed
        return True

    def current(self) -> RevocationState:
        """The list to judge a batch by; refreshed here when no background thread keeps it fresh."""
        now = self.clock()
        if self._thread is None and (self.cheap or now >= self._due):
            self._due = now + self.refresh_s
            self.refresh()
        held = self.held
        if held is None:
            return RevocationState(frozenset(), float("inf"), self.policy == "refuse")
        age = held.age(now)
        return RevocationState(held.revoked, age, self.policy == "refuse" and age > self.max_age_s, held.version)

    def start(self) -> None:
        """Refresh on a background thread (a serving worker), so no request waits for a fetch."""
        if self._thread is not None or self.cheap:
            return
        self.refresh()
        self._thread = threading.Thread(target=self._run, name="revocation-refresh", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.refresh_s):
            self.refresh()


def _line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def revocation_source(
    profile, keys: Mapping[str, Ed25519PublicKey], fetch: Fetch | None = None
) -> NoRevocations | SignedRevocations:
    """The profile's revocation list: from its file, from its server through ``fetch``, or none."""
    if profile.revocation_file:
        fetch, source = FileSource(profile.revocation_file), f"file {profile.revocation_file}"
    elif profile.revocation_server:
        if fetch is None:
            raise ValueError("a profile with a revocation server needs a fetch for it (the handler's gRPC client)")
        source = f"license server {profile.revocation_server}"
    else:
        return NoRevocations()
    return SignedRevocations(
        fetch,
        keys,
        refresh_s=profile.revocation_refresh_s,
        max_age_s=profile.revocation_max_age_s,
        policy=profile.revocation_stale_policy,
        source=source,
    )
