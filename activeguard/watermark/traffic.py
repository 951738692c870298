"""The journal's account of a license's traffic: ``usage`` and ``alert`` entries.

A worker writes them to its journal (:class:`~activeguard.watermark.journal.JournalWriter`) beside
the answer records; the license server sums them per license (``license show``) and acts on an alert
whose policy is :data:`SUSPEND` by revoking the license. They carry counts and reasons only, never
a user's input.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from activeguard.watermark import fields

USAGE, ALERT = "usage", "alert"
NOTIFY, SUSPEND = "notify", "suspend"  # an alert's policies: tell the admin, or revoke the license too
POLICIES = (NOTIFY, SUSPEND)
MAX_DETAIL = 512


@dataclass(frozen=True)
class UsageEntry:
    """Rows one worker served and refused for one license since its last usage entry."""

    model_id: str
    license_id: str
    served: int
    refused: dict[str, int] = field(default_factory=dict)  # reason -> rows
    at: float = 0.0

    def to_entry(self) -> dict[str, Any]:
        return {
            "kind": USAGE,
            "model_id": self.model_id,
            "license_id": self.license_id,
            "served": self.served,
            "refused": dict(self.refused),
            "at": self.at,
        }

    @classmethod
    def from_entry(cls, entry: dict[str, Any]) -> UsageEntry:
        """ValueError unless ``entry`` is a well-formed usage entry."""
        return cls(
            fields.text(entry, "model_id"),
            fields.text(entry, "license_id"),
            fields.integer(entry, "served"),
            fields.counts(entry, "refused"),
            fields.number(entry, "at", 0.0),
        )


@dataclass(frozen=True)
class AlertEntry:
    """The extraction monitor flagged a license; :data:`SUSPEND` asks the license server to revoke it."""

    model_id: str
    license_id: str
    reason: str  # what was seen, e.g. "prada"
    policy: str = NOTIFY
    at: float = 0.0
    detail: str = ""  # a short account (statistics), never an input

    def to_entry(self) -> dict[str, Any]:
        return {
            "kind": ALERT,
            "model_id": self.model_id,
            "license_id": self.license_id,
            "reason": self.reason,
            "policy": self.policy,
            "at": self.at,
            "detail": self.detail,
        }

    @classmethod
    def from_entry(cls, entry: dict[str, Any]) -> AlertEntry:
        """ValueError unless ``entry`` is a well-formed alert entry."""
        policy = fields.text(entry, "policy", required=False) or NOTIFY
        if policy not in POLICIES:
            raise ValueError(f"policy is not one of {POLICIES}")
        return cls(
            fields.text(entry, "model_id"),
            fields.text(entry, "license_id"),
            fields.text(entry, "reason"),
            policy,
            fields.number(entry, "at", 0.0),
            fields.text(entry, "detail", MAX_DETAIL, required=False),
        )

    def key(self, journal: str) -> str:
        """One alert of one journal is one key, however often the journal is read."""
        canonical = json.dumps(self.to_entry(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(f"{journal}\n{canonical}".encode()).hexdigest()
