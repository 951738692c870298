"""The handler's Prometheus metrics, through TorchServe's metric store (``:8082/metrics``).

Recorded by the handler, not the guard, because only the handler sees each request's final answer
(an owner's postprocess may still turn an admitted request into an internal error).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes

from activeguard.guard.outcomes import Outcome
from activeguard.guard.revocation import RevocationState

REQUESTS_METRIC = "ActiveGuardRequests"
AUTH_LATENCY_METRIC = "ActiveGuardAuthLatencyMs"
REVOCATION_AGE_METRIC = "ActiveGuardRevocationListAgeSeconds"
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
