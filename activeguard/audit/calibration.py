"""Calibrated verdicts: every fingerprint carries its own null, and a verdict is a chance bound.

A fixed threshold is a statement about one zoo of models, not about the owner's task: tuned on MNIST
LeNet-5s, the old thresholds accused every independent model of a 1-D convolutional family. So a
fingerprint is scored, when it is made, on **reference models** that are independent of the owner's
but of the same task (its own architecture trained afresh on the owner's data by
:mod:`activeguard.audit.references`, and any models the owner supplies). Their scores are the
**null**: what an independent model scores. A suspect's score is judged against that null.

The bound (the derivation is in ``docs/audits.md``, "Calibrated verdicts"):

* scores are mapped to a scale where independent models' scores are roughly normal: a rate r of N
  points (IPGuard's matching rate, CEM's CAEAcc, TAFA's distance and bending scores) by its logit,
  with r clipped to [1/2N, 1 − 1/2N]; a chance probability p (TAFA's bend and slope tests) is
  reported as −log10 p and mapped by ln(1 − log10 p). The logarithm matters: on a 31-input regressor's
  slope test, 8 references reached −log10 p of at most 2.5 while an independent twin reached 8.3;
  normal on −log10 p, that twin would have been accused, on its logarithm it is not;
* with m reference scores of mean μ and spread s, a new independent model's transformed score is,
  under normality, distributed as μ + s·√(1 + 1/m)·T with T Student-t on m − 1 degrees of freedom
  (the prediction interval for one more draw). The bound is P(T ≥ t) at the suspect's t: exact for
  normal scores, and heavier-tailed than the normal when m is small;
* s is never below what the scale itself must vary by: a rate's binomial spread at the null's mean,
  √(1/(N·p̄·(1 − p̄))) on the logit scale, and 0.26 (the spread of ln(1 − log10 U) for a uniform
  chance U) for a chance probability. A null of identical references cannot make an accusation easy;
* where the statistic was chosen among several by the references (IPGuard's variant and margin,
  TAFA's statistic), the bound is multiplied by the number of candidates (Bonferroni);
* where the method computes its own chance probability (TAFA), the bound is never below it: the
  references can only make that chance larger, never smaller.

A verdict is **copy** only when the bound is at most α (1e-3 per method by default; ``audit all``
divides α by the number of methods) and the suspect scores above every reference; **not a copy**
when it scores within or below the references' range; **inconclusive** otherwise: above every
reference but not significant, fewer than :data:`MIN_REFERENCES` references, no calibration at all,
or a method whose premise does not hold for the owner's model. A global threshold never accuses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

COPY, NOT_A_COPY, INCONCLUSIVE = "copy", "not a copy", "inconclusive"
VERDICTS = (COPY, NOT_A_COPY, INCONCLUSIVE)
DEFAULT_ALPHA = 1e-3
MIN_REFERENCES = 4
SCALES = ("rate", "chance")
_CHANCE_FLOOR = 0.26  # the spread of ln(1 − log10 U) for a uniform chance U
_CHANCE_CAP = 300.0  # −log10 of the smallest chance a method reports


@dataclass(frozen=True)
class Bound:
    """The chance that an independent model scores at least this high, and how it was reached."""

    value: float  # the bound used for the verdict
    parametric: float  # the Student-t prediction bound (before the selection factor)
    empirical: float  # (1 + #references scoring at least as high) / (m + 1): needs no model of the null
    t: float
    dof: int
    selections: int = 1

    def summary(self) -> dict[str, Any]:
        return {
            "chance_bound": float(f"{self.value:.3g}"),
            "parametric": float(f"{self.parametric:.3g}"),
            "empirical_rank": round(self.empirical, 4),
            "t": round(self.t, 3),
            "degrees_of_freedom": self.dof,
            "selections": self.selections,
        }


@dataclass(frozen=True)
class Null:
    """One statistic's scores on the reference models."""

    scale: str  # "rate" or "chance"
    points: int  # fingerprint points behind a rate (its sampling spread)
    scores: tuple[float, ...]
    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise ValueError(f"a null's scale is one of {', '.join(SCALES)}, not {self.scale!r}")
        if self.points < 1:
            raise ValueError(f"a null needs the number of fingerprint points, got {self.points}")
        if not all(isinstance(s, (int, float)) and math.isfinite(s) for s in self.scores):
            raise ValueError("a null's scores must be finite numbers")

    def transform(self, score: float) -> float:
        if self.scale == "chance":
            return math.log1p(min(max(float(score), 0.0), _CHANCE_CAP))
        clip = 0.5 / self.points
        r = min(max(float(score), clip), 1.0 - clip)
        return math.log(r / (1.0 - r))

    def floor(self) -> float:
        """The least spread the transformed score must have, whatever the references say."""
        if self.scale == "chance":
            return _CHANCE_FLOOR
        clip = 0.5 / self.points
        mean = min(max(sum(self.scores) / max(len(self.scores), 1), clip), 1.0 - clip)
        return 1.0 / math.sqrt(self.points * mean * (1.0 - mean))

    def bound(self, score: float, selections: int = 1) -> Bound:
        """The chance bound for ``score`` (see the module docstring). On the chance scale the score is the
        method's own −log10 chance probability, and the bound is never below that chance."""
        from scipy.stats import t as student

        m = len(self.scores)
        if m < 2:
            raise ValueError("a chance bound needs at least two reference scores")
        z = [self.transform(s) for s in self.scores]
        mean = sum(z) / m
        spread = math.sqrt(sum((v - mean) ** 2 for v in z) / (m - 1))
        spread = max(spread, self.floor())
        t = (self.transform(score) - mean) / (spread * math.sqrt(1.0 + 1.0 / m))
        parametric = float(student.sf(t, m - 1))
        empirical = (1 + sum(s >= score for s in self.scores)) / (m + 1)
        value = min(1.0, parametric * max(1, selections))
        if self.scale == "chance":
            value = max(value, 10.0 ** -min(max(float(score), 0.0), _CHANCE_CAP))
        return Bound(value, parametric, empirical, t, m - 1, max(1, selections))

    def summary(self) -> dict[str, Any]:
        m = len(self.scores)
        mean = sum(self.scores) / m if m else float("nan")
        sd = math.sqrt(sum((s - mean) ** 2 for s in self.scores) / (m - 1)) if m > 1 else float("nan")
        return {
            "size": m,
            "largest": round(max(self.scores), 4) if m else None,
            "mean": round(mean, 4),
            "spread": round(sd, 4),
            "scale": self.scale,
            "references": list(self.names),
        }

    def to_plain(self) -> dict[str, Any]:
        return {"scale": self.scale, "points": self.points, "scores": list(self.scores), "names": list(self.names)}

    @classmethod
    def from_plain(cls, data: Any) -> Null:
        data = _mapping(data, "a null")
        scores, names = data.get("scores"), data.get("names", ())
        if not isinstance(scores, (list, tuple)) or not isinstance(names, (list, tuple)):
            raise ValueError("a null's scores and names must be lists")
        return cls(
            str(data.get("scale")),
            _integer(data.get("points"), "points"),
            tuple(_number(s) for s in scores),
            tuple(str(n) for n in names),
        )


def _mapping(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a mapping, not {type(value).__name__}")
    return value


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"a score must be a finite number, not {value!r}")
    return float(value)


def _integer(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be an integer, not {value!r}")
    return value


@dataclass(frozen=True)
class Calibration:
    """What a fingerprint file stores about its null: the statistic chosen and every statistic's null."""

    statistic: str  # the statistic verdicts use
    nulls: dict[str, Null]  # every statistic the references were scored on
    selections: int = 1  # candidates (variants × statistics) the choice was made among
    positives: dict[str, dict[str, float]] = field(default_factory=dict)  # the tool's own copies, for the record
    premise: str = ""  # why the method's premise fails for the owner ('' when it holds)
    note: str = ""  # how the references came about, for people

    def __post_init__(self) -> None:
        if self.statistic not in self.nulls and not self.premise:
            raise ValueError(f"the calibration's statistic {self.statistic!r} has no null")
        if self.selections < 1:
            raise ValueError(f"selections must be at least 1, got {self.selections}")

    @property
    def null(self) -> Null | None:
        return self.nulls.get(self.statistic)

    def to_plain(self) -> dict[str, Any]:
        return {
            "statistic": self.statistic,
            "nulls": {name: null.to_plain() for name, null in self.nulls.items()},
            "selections": self.selections,
            "positives": {name: dict(scores) for name, scores in self.positives.items()},
            "premise": self.premise,
            "note": self.note,
        }

    @classmethod
    def from_plain(cls, data: Any) -> Calibration:
        data = _mapping(data, "the calibration")
        nulls = _mapping(data.get("nulls"), "the calibration's nulls")
        positives = _mapping(data.get("positives") or {}, "the calibration's positives")
        return cls(
            statistic=str(data.get("statistic")),
            nulls={str(k): Null.from_plain(v) for k, v in nulls.items()},
            selections=_integer(data.get("selections", 1), "selections"),
            positives={
                str(k): {str(s): _number(v) for s, v in _mapping(d, "a positive's scores").items()}
                for k, d in positives.items()
            },
            premise=str(data.get("premise") or ""),
            note=str(data.get("note") or ""),
        )


@dataclass(frozen=True)
class Judgement:
    """A method's verdict on one suspect."""

    verdict: str
    reason: str
    score: float  # the statistic the verdict used
    statistic: str
    alpha: float
    bound: Bound | None = None
    null: Null | None = None

    @property
    def copy(self) -> bool:
        return self.verdict == COPY

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "verdict": self.verdict,
            "reason": self.reason,
            "statistic": self.statistic,
            "score": self.score,
            "alpha": self.alpha,
            "calibrated": self.null is not None,
        }
        if self.null is not None:
            out["null"] = self.null.summary()
        if self.bound is not None:
            out.update(self.bound.summary())
        return out


def judge(
    statistics: dict[str, float],
    calibration: Calibration | None,
    alpha: float = DEFAULT_ALPHA,
    default_statistic: str = "",
) -> Judgement:
    """The verdict on a suspect whose statistics are ``statistics`` (see the module docstring)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if calibration is None:
        name = default_statistic or next(iter(statistics))
        return Judgement(
            INCONCLUSIVE,
            "uncalibrated: the fingerprint carries no null (make it with --data or --reference), so no score "
            "can accuse",
            statistics[name],
            name,
            alpha,
        )
    name = calibration.statistic
    if calibration.premise or calibration.null is None:
        score = statistics.get(name, statistics.get(default_statistic, float("nan")))
        return Judgement(INCONCLUSIVE, f"premise fails: {calibration.premise}", score, name, alpha)
    null = calibration.null
    if name not in statistics:  # e.g. an endpoint that answers labels only: another statistic with a null
        name = next((n for n in calibration.nulls if n in statistics), "")
        if not name:
            raise ValueError(f"the suspect was not scored on any calibrated statistic ({', '.join(calibration.nulls)})")
        null = calibration.nulls[name]
    score = statistics[name]
    if len(null.scores) < MIN_REFERENCES:
        return Judgement(
            INCONCLUSIVE,
            f"too few references: {len(null.scores)} (at least {MIN_REFERENCES} give a bound)",
            score,
            name,
            alpha,
            null=null,
        )
    bound = null.bound(score, calibration.selections)
    largest = max(null.scores)
    if bound.value <= alpha and score > largest:
        reason = f"chance bound {bound.value:.2g} ≤ α {alpha:.2g}, above all {len(null.scores)} references"
        return Judgement(COPY, reason, score, name, alpha, bound, null)
    if score <= largest:
        reason = f"{score:.3g} is within the references' range (largest {largest:.3g})"
        return Judgement(NOT_A_COPY, reason, score, name, alpha, bound, null)
    reason = f"above every reference ({largest:.3g}) but the chance bound {bound.value:.2g} > α {alpha:.2g}"
    return Judgement(INCONCLUSIVE, reason, score, name, alpha, bound, null)


def choose(options: list[tuple[dict[str, Null], dict[str, dict[str, float]]]]) -> tuple[int, str, int]:
    """(option, statistic, selections): among the fingerprints tried (``options``: each one's nulls by
    statistic, and each positive copy's scores by statistic), the statistic whose weakest positive
    copy gets the smallest bound. ``selections`` counts every (option, statistic) compared: the
    Bonferroni factor the chosen bound carries. Without positives the first option's first statistic
    is kept, and the count is still every candidate's.
    """
    pairs = [(i, name) for i, (nulls, _) in enumerate(options) for name, null in nulls.items() if len(null.scores) >= 2]
    if not pairs:
        raise ValueError("no statistic has the two reference scores a bound needs")
    selections = len(pairs)

    def weakest(pair: tuple[int, str]) -> tuple[float, float]:
        i, name = pair
        null, positives = options[i][0][name], options[i][1]
        bounds = [null.bound(scores[name]) for scores in positives.values() if name in scores]
        if not bounds:
            return (1.0, 0.0)
        return (max(b.parametric for b in bounds), -min(b.t for b in bounds))

    index, statistic = min(pairs, key=weakest)
    return index, statistic, selections
