"""The license server's Prometheus metrics, in a registry of its own (several servers may share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """Every counter, histogram and gauge the server exports at /metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.issued = Counter("activeguard_licenses_issued_total", "Licenses issued", ["model"], registry=r)
        self.issue_failures = Counter(
            "activeguard_license_issue_failures_total", "IssueLicense calls refused or failed", ["code"], registry=r
        )
        self.issue_latency = Histogram(
            "activeguard_license_issue_seconds",
            "IssueLicense latency",
            ["path"],
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.generation = Histogram(
            "activeguard_fingerprint_generation_seconds",
            "Fingerprint generation (one batch)",
            registry=r,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )
        self.revocations = Counter("activeguard_license_revocations_total", "Licenses revoked", registry=r)
        self.store_errors = Counter("activeguard_store_errors_total", "Database errors", ["op"], registry=r)
        self.slot_conflicts = Counter(
            "activeguard_slot_conflicts_total", "Slots lost to a concurrent issuer (retried)", registry=r
        )
        self.auth_failures = Counter("activeguard_admin_auth_failures_total", "Admin calls refused", registry=r)
        self.free_slots = Gauge(
            "activeguard_free_slots",
            "Slots still free to issue per model (not issued, not natural)",
            ["model"],
            registry=r,
        )
        self.pregenerated = Gauge(
            "activeguard_pregenerated_fingerprints", "Ready fingerprints in the pool per model", ["model"], registry=r
        )
        self.pregeneration_target = Gauge(
            "activeguard_pregeneration_target", "Pool size pre-generation is filling towards", ["model"], registry=r
        )
        self.generated = Counter(
            "activeguard_fingerprints_generated_total",
            "Fingerprints generated and re-checked, by path (pregenerated or on_demand)",
            ["path"],
            registry=r,
        )
        self.revocation_version = Gauge(
            "activeguard_revocation_list_version",
            "Version (last revocation sequence number) of the newest signed revocation list served",
            registry=r,
        )
        self.journal_entries = Counter(
            "activeguard_journal_entries_ingested_total",
            "Answer-journal entries stored, by kind (answer: records new to the store; usage; alert)",
            ["kind"],
            registry=r,
        )
        self.journal_errors = Counter(
            "activeguard_journal_ingest_errors_total",
            "Journal files or ingestion steps a pass could not complete (the next pass retries)",
            registry=r,
        )
        self.answer_records_pruned = Counter(
            "activeguard_answer_records_pruned_total", "Answer records deleted past the retention", registry=r
        )
        self.suspensions = Counter(
            "activeguard_license_suspensions_total", "Licenses revoked for an extraction alert", registry=r
        )
        self.on_demand_batch = Histogram(
            "activeguard_on_demand_batch_size",
            "IssueLicense requests served by one on-demand optimization",
            registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64),
        )
