"""The handler's Prometheus metrics, through TorchServe's metric store (``:8082/metrics``).

Recorded by the handler, not the guard, because only the handler sees each request's final answer
(an owner's postprocess may still turn an admitted request into an internal error).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes

from activeguard.guard.monitor import Flag
from activeguard.guard.outcomes import Outcome, Verdict
from activeguard.guard.revocation import RevocationState

REQUESTS_METRIC = "ActiveGuardRequests"
AUTH_LATENCY_METRIC = "ActiveGuardAuthLatencyMs"
REVOCATION_AGE_METRIC = "ActiveGuardRevocationListAgeSeconds"
ROWS_SERVED_METRIC = "ActiveGuardRowsServed"  # rows, by License
ROWS_REFUSED_METRIC = "ActiveGuardRowsRefused"  # rows, by License and Reason (licenses whose signature held)
EXTRACTION_ALERTS_METRIC = "ActiveGuardExtractionAlerts"  # flags of the extraction monitor, by License
EXTRACTION_STATISTIC_METRIC = "ActiveGuardExtractionStatistic"  # the license's last Shapiro-Wilk W (gauge)
NAMED_LICENSES = 50  # license ids a worker names in its metrics; the rest are "other"
OTHER_LICENSES = "other"
NEVER_FETCHED_AGE_S = 1e9  # a worker that never held a list reports this age (a gauge cannot say infinity)


def record_batch(metrics: Any, answers: list[Outcome], elapsed_ms: float, revocations: RevocationState) -> None:
    """Requests by reason, the batch's guard latency and the age of the revocation list it was judged
    by. One update per reason and batch: TorchServe's metric store costs ~40 µs a call."""
    for reason, count in Counter(outcome.reason for outcome in answers).items():
        metrics.add_counter(REQUESTS_METRIC, count, dimensions=[Dimension("Reason", reason)])
    metrics.add_time(AUTH_LATENCY_METRIC, elapsed_ms, unit="ms")
    if revocations.age_s is not None:
        age = min(revocations.age_s, NEVER_FETCHED_AGE_S)
        try:
            metrics.add_metric(REVOCATION_AGE_METRIC, age, unit="s", metric_type=MetricTypes.GAUGE)
        except TypeError:  # TorchServe's legacy MetricsStore (its MockContext's) knows no metric types
            metrics.add_metric(REVOCATION_AGE_METRIC, age, unit="s")


class LicenseLabels:
    """The License label of a license id: the first :data:`NAMED_LICENSES` distinct ids a worker meets
    are named, every later one is ``other``, so a deployment with many licenses keeps its series bounded
    (each worker names its own first ones; ``sum by (License)`` still adds them up)."""

    def __init__(self, named: int = NAMED_LICENSES):
        self.named = named
        self._known: set[str] = set()

    def __call__(self, license_id: str) -> str:
        if license_id in self._known:
            return license_id
        if len(self._known) < self.named:
            self._known.add(license_id)
            return license_id
        return OTHER_LICENSES


def record_licenses(
    metrics: Any,
    verdicts: list[Verdict],
    answers: list[Outcome],
    flags: list[Flag],
    statistic: Callable[[str], float | None] | None,
    labels: LicenseLabels,
) -> None:
    """Rows served and refused per license, the extraction monitor's flags and its statistic, for the
    licenses of one batch (one update per label and batch)."""
    served: Counter[str] = Counter()
    refused: Counter[tuple[str, str]] = Counter()
    for verdict, outcome in zip(verdicts, answers):
        if verdict.license_id is None:
            continue
        label = labels(verdict.license_id)
        if outcome.status == 200 and verdict.admitted:
            served[label] += verdict.rows
        else:
            refused[(label, outcome.reason)] += verdict.rows
    for label, rows in served.items():
        metrics.add_counter(ROWS_SERVED_METRIC, rows, dimensions=[Dimension("License", label)])
    for (label, reason), rows in refused.items():
        metrics.add_counter(
            ROWS_REFUSED_METRIC, rows, dimensions=[Dimension("License", label), Dimension("Reason", reason)]
        )
    for label, count in Counter(labels(flag.license_id) for flag in flags).items():
        metrics.add_counter(EXTRACTION_ALERTS_METRIC, count, dimensions=[Dimension("License", label)])
    if statistic is None:
        return
    for license_id in {v.license_id for v in verdicts if v.license_id is not None and v.admitted}:
        w = statistic(license_id)
        if w is not None:
            dimensions = [Dimension("License", labels(license_id))]
            try:
                metrics.add_metric(
                    EXTRACTION_STATISTIC_METRIC, w, unit="", dimensions=dimensions, metric_type=MetricTypes.GAUGE
                )
            except TypeError:  # TorchServe's legacy MetricsStore (its MockContext's) knows no metric types
                metrics.add_metric(EXTRACTION_STATISTIC_METRIC, w, unit="", dimensions=dimensions)
