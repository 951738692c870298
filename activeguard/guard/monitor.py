"""Extraction monitoring per license: PRADA's test (Juuti et al., EuroS&P 2019) on each license's queries.

Natural queries land at distances from a client's earlier queries that are spread roughly normally;
an extraction attack that grows its queries from a few seeds (JBDA-style synthetic steps) or sweeps a
pool does not. For each license and each class the model predicts, a growing set ``G_c`` of that
license's earlier queries is kept. A new query ``x`` of class ``c`` gets ``d = min ||x - g||₂`` over
``G_c`` (flattened input); ``d`` joins the license's distance list ``D``, and ``x`` joins ``G_c`` when
``d > mean(D) - std(D)`` (PRADA's rule: a query close to one already kept adds nothing). Once ``D``
holds :attr:`MonitorSettings.min_queries` distances, Shapiro–Wilk runs on them (the last
:attr:`MonitorSettings.window`; PRADA tests all of ``D``), and ``W < delta`` flags the license. After a flag ``D`` starts
over, so a license is flagged again only after another ``min_queries`` queries.

What a flag does is the owner's policy (:data:`POLICIES`): ``alert`` (counted; an
:class:`~activeguard.watermark.traffic.AlertEntry` in the journal), ``throttle`` (the license's rows
are refused as ``extraction_throttled`` for ``cooldown_s``) or ``suspend`` (an alert with the suspend
policy, so the license server revokes the license through the signed revocation list; meanwhile this
worker refuses it as ``extraction_suspended``).

Memory is bounded: queries are kept as a sketch of :attr:`MonitorSettings.sketch_dim` float32 values
(a count sketch of the flattened input when it is longer; squared distances are preserved in
expectation), at most ``max_per_class`` per class (the oldest dropped), for at most ``max_licenses``
licenses (the least recently seen forgotten). The state lives in the worker's memory only: a
restarted worker, or another replica, starts each license afresh and rebuilds it from new traffic
(``min_queries`` queries before the test can run again). A local suspension is also forgotten on
restart; by then the license server's revocation holds.
"""

from __future__ import annotations

import math
import threading
import time
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import stats

OFF, ALERT, THROTTLE, SUSPEND = "off", "alert", "throttle", "suspend"
POLICIES = (OFF, ALERT, THROTTLE, SUSPEND)

# Chosen by measurement on the bundled MNIST LeNet-5 (benchmarks/bench_extraction_costs.py and
# `activeguard evaluate extraction`): see docs/results.md.
DEFAULT_DELTA = 0.95
DEFAULT_MIN_QUERIES = 200
DEFAULT_WINDOW = 5000
DEFAULT_MAX_PER_CLASS = 200
DEFAULT_MAX_LICENSES = 64
DEFAULT_COOLDOWN_S = 600.0
DEFAULT_SKETCH_DIM = 256
CHECK_EVERY = 10  # new distances between two Shapiro–Wilk tests of one license (or 2% of D, if more)
MAX_WINDOW = 5000  # scipy's Shapiro–Wilk is exact up to 5,000 values
SKETCH_SEED = 0x5AD4
DENSE_SKETCH_BYTES = 8 * 1024 * 1024
MAX_SUSPENDED = 65536  # license ids a worker remembers as suspended (by then the revocation list holds them)


@dataclass(frozen=True)
class MonitorSettings:
    policy: str = OFF
    delta: float = DEFAULT_DELTA
    min_queries: int = DEFAULT_MIN_QUERIES
    window: int = DEFAULT_WINDOW
    max_per_class: int = DEFAULT_MAX_PER_CLASS
    max_licenses: int = DEFAULT_MAX_LICENSES
    cooldown_s: float = DEFAULT_COOLDOWN_S
    sketch_dim: int = DEFAULT_SKETCH_DIM

    def validated(self) -> MonitorSettings:
        if self.policy not in POLICIES:
            raise ValueError(f"extraction monitor policy must be one of {', '.join(POLICIES)}")
        if not (0 < self.delta < 1):
            raise ValueError("extraction monitor delta (Shapiro-Wilk W threshold) must be in (0, 1)")
        if not 3 <= self.min_queries <= self.window <= MAX_WINDOW:
            raise ValueError(f"extraction monitor needs 3 <= min_queries <= window <= {MAX_WINDOW}")
        if not (self.max_per_class >= 1 and self.max_licenses >= 1 and self.sketch_dim >= 8):
            raise ValueError("extraction monitor max_per_class, max_licenses >= 1 and sketch_dim >= 8")
        if not (self.cooldown_s > 0 and math.isfinite(self.cooldown_s)):
            raise ValueError("extraction monitor cooldown_s must be positive")
        return self

    def bytes_bound(self, num_classes: int) -> int:
        """The most the stored queries and distances of every tracked license take (float32)."""
        per_license = num_classes * self.max_per_class * (self.sketch_dim + 1) * 4 + 2 * self.window * 4
        return self.max_licenses * per_license


@dataclass(frozen=True)
class Flag:
    """A license whose queries failed the test: what was seen, and what the policy does."""

    license_id: str
    statistic: float  # Shapiro–Wilk W
    queries: int  # queries of the license this worker had seen when it was flagged
    policy: str

    @property
    def detail(self) -> str:
        return f"prada shapiro-wilk W={self.statistic:.4f} after {self.queries} queries"


class _ClassSet:
    """One class's kept queries: a ring of at most ``cap`` sketches and their squared norms."""

    __slots__ = ("rows", "norms", "count", "head")

    def __init__(self, dim: int, cap: int):
        size = min(cap, 16)
        self.rows = torch.empty((size, dim), dtype=torch.float32)
        self.norms = torch.empty(size, dtype=torch.float32)
        self.count = 0
        self.head = 0  # next slot to overwrite once full

    def add(self, x: torch.Tensor, norm: torch.Tensor, cap: int) -> None:
        if self.count < cap:
            if self.count == len(self.rows):
                grown = min(cap, 2 * len(self.rows))
                self.rows = torch.cat([self.rows, torch.empty((grown - len(self.rows), self.rows.shape[1]))])
                self.norms = torch.cat([self.norms, torch.empty(grown - len(self.norms))])
            self.rows[self.count], self.norms[self.count] = x, norm
            self.count += 1
        else:
            self.rows[self.head], self.norms[self.head] = x, norm
            self.head = (self.head + 1) % cap

    @property
    def nbytes(self) -> int:
        return (self.rows.numel() + self.norms.numel()) * 4


@dataclass
class _License:
    sets: dict[int, _ClassSet] = field(default_factory=dict)
    distances: array = field(default_factory=lambda: array("f"))  # D since the last flag (the last `window`)
    n: int = 0  # distances since the last flag (Welford's running mean and M2 for the threshold)
    mean: float = 0.0
    m2: float = 0.0
    since_test: int = 0
    queries: int = 0
    statistic: float | None = None  # the last Shapiro–Wilk W
    blocked_until: float = 0.0


class ExtractionMonitor:
    """PRADA per license for one worker; :meth:`observe` once per admitted request's rows."""

    def __init__(self, settings: MonitorSettings, input_size: int, clock=time.monotonic):
        self.settings = settings.validated()
        self.input_size = int(input_size)
        self.dim = min(self.input_size, settings.sketch_dim)
        self._sketch = _count_sketch(self.input_size, self.dim) if self.input_size > self.dim else None
        self._licenses: OrderedDict[str, _License] = OrderedDict()
        self._suspended: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self._clock = clock
        self.flags = 0

    # -- the policy's side -------------------------------------------------------------------------------

    def refusal(self, license_id: str) -> str | None:
        """``"suspend"`` or ``"throttle"`` when this license's rows are refused now, else None."""
        if license_id in self._suspended:
            return SUSPEND
        state = self._licenses.get(license_id)
        if state is not None and state.blocked_until > self._clock():
            return THROTTLE
        return None

    def statistic(self, license_id: str) -> float | None:
        state = self._licenses.get(license_id)
        return None if state is None else state.statistic

    # -- the test ----------------------------------------------------------------------------------------

    def observe(self, license_id: str, rows: torch.Tensor | np.ndarray, classes: Any) -> Flag | None:
        """Account ``rows`` (n × anything, float) that the model answered with ``classes`` (n,) for
        ``license_id``; a :class:`Flag` when the license's queries now fail the test."""
        x = torch.as_tensor(rows).detach().to("cpu", torch.float32).reshape(len(rows), -1)
        if len(x) == 0:
            return None
        if x.shape[1] != self.input_size:
            raise ValueError(f"rows of {x.shape[1]} values, the monitor expects {self.input_size}")
        with torch.no_grad():
            sketches = self._sketch_rows(x).contiguous()
            norms = (sketches * sketches).sum(1)
        labels = [int(c) for c in torch.as_tensor(classes).reshape(-1).tolist()]
        if len(labels) != len(x):
            raise ValueError(f"{len(labels)} classes for {len(x)} rows")
        with self._lock, torch.no_grad():
            state = self._state(license_id)
            if len(set(labels)) == 1:
                self._class_rows(state, labels[0], sketches, norms)
            else:
                index = torch.tensor(labels)
                for c in sorted(set(labels)):
                    mask = index == c
                    self._class_rows(state, c, sketches[mask], norms[mask])
            state.queries += len(x)
            return self._test(license_id, state)

    def _sketch_rows(self, x: np.ndarray) -> np.ndarray:
        if self._sketch is None:
            return x
        if self._sketch.is_sparse:
            return torch.sparse.mm(self._sketch, x.T).T  # the transposed sketch: dim × size
        return x @ self._sketch

    def _state(self, license_id: str) -> _License:
        state = self._licenses.get(license_id)
        if state is None:
            state = self._licenses[license_id] = _License()
            while len(self._licenses) > self.settings.max_licenses:
                self._licenses.popitem(last=False)
        else:
            self._licenses.move_to_end(license_id)
        return state

    def _class_rows(self, state: _License, c: int, x: np.ndarray, norms: np.ndarray) -> None:
        """PRADA's step for each of ``x`` (rows of one class, in order)."""
        cap = self.settings.max_per_class
        kept = state.sets.get(c)
        if kept is None:
            kept = state.sets[c] = _ClassSet(self.dim, cap)
        # squared distances to what was kept before this batch, and among this batch's rows, in one go each
        n = len(x)
        nearest = (
            (kept.norms[: kept.count, None] + norms[None, :] - 2.0 * (kept.rows[: kept.count] @ x.T)).amin(0).tolist()
            if kept.count
            else [math.inf] * n
        )
        among = (norms[:, None] + norms[None, :] - 2.0 * (x @ x.T)).tolist() if n > 1 else None
        added: list[int] = []
        for j in range(n):
            best = nearest[j]
            if added and among is not None:
                row = among[j]
                best = min(best, min(row[a] for a in added))
            if best == math.inf:  # the first query of its class: nothing to measure against
                kept.add(x[j], norms[j], cap)
                added.append(j)
                continue
            d = math.sqrt(max(best, 0.0))
            self._distance(state, d)
            if d > state.mean - math.sqrt(state.m2 / state.n):  # PRADA: mean(D) - std(D), d already in D
                kept.add(x[j], norms[j], cap)
                added.append(j)

    def _distance(self, state: _License, d: float) -> None:
        state.n += 1
        delta = d - state.mean
        state.mean += delta / state.n
        state.m2 += delta * (d - state.mean)
        state.distances.append(d)
        if len(state.distances) > 2 * self.settings.window:
            del state.distances[: -self.settings.window]
        state.since_test += 1

    def _test(self, license_id: str, state: _License) -> Flag | None:
        s = self.settings
        if state.n < s.min_queries or state.since_test < max(CHECK_EVERY, state.n // 50):
            return None
        state.since_test = 0
        window = np.frombuffer(state.distances, dtype=np.float32)[-s.window :].astype(np.float64)
        if np.ptp(window) <= 1e-12:
            w = 0.0  # every query at the same distance: as far from natural as it gets
        else:
            w = float(stats.shapiro(window).statistic)
        state.statistic = w
        if not w < s.delta:
            return None
        self.flags += 1
        del state.distances[:]
        state.n, state.mean, state.m2 = 0, 0.0, 0.0
        if s.policy == THROTTLE:
            state.blocked_until = self._clock() + s.cooldown_s
        elif s.policy == SUSPEND:
            self._suspended[license_id] = None
            while len(self._suspended) > MAX_SUSPENDED:
                self._suspended.popitem(last=False)
        return Flag(license_id, w, state.queries, s.policy)

    # -- what is held ------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._licenses)

    @property
    def nbytes(self) -> int:
        """The stored queries' bytes now."""
        kept = sum(k.nbytes for state in self._licenses.values() for k in state.sets.values())
        return kept + sum(4 * len(state.distances) for state in self._licenses.values())


def _count_sketch(size: int, dim: int) -> torch.Tensor:
    """A ``size`` × ``dim`` count sketch: each input value adds to one of ``dim`` buckets with a random sign
    (dense where that takes at most :data:`DENSE_SKETCH_BYTES`: a BLAS product is faster than scipy's)."""
    rng = np.random.default_rng(SKETCH_SEED)
    buckets = rng.integers(0, dim, size)
    signs = rng.choice(np.array([-1.0, 1.0], np.float32), size)
    if size * dim * 4 <= DENSE_SKETCH_BYTES:
        dense = np.zeros((size, dim), np.float32)
        dense[np.arange(size), buckets] = signs
        return torch.from_numpy(dense)
    index = torch.from_numpy(np.stack([buckets, np.arange(size)]))
    return torch.sparse_coo_tensor(index, torch.from_numpy(signs), (dim, size)).coalesce()
