"""Making a fingerprint with its null: every candidate fingerprint scored on the references and on the
owner's own copies, the one (and statistic) that separates them best kept, with its calibration.

Without references the method's first candidate is made and left uncalibrated: it can be scored,
but its verdict is never "copy" (:func:`activeguard.audit.calibration.judge`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from activeguard.audit import calibration as cal
from activeguard.audit.base import AuditMethod, Owner, Params
from activeguard.audit.references import Reference


class ReferenceScoreError(ValueError):
    """A reference model could not be scored (another input shape, an endpoint that failed)."""


@dataclass
class Made:
    """A fingerprint, the parameters it was made with, and its calibration (None: uncalibrated)."""

    fingerprint: Any
    params: Params
    calibration: cal.Calibration | None
    candidates: int = 1
    references: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    trials: list[dict[str, Any]] = field(default_factory=list)  # every candidate's nulls and copies, for the record


def make_fingerprint(
    method: AuditMethod,
    owner: Owner,
    params: Params,
    data: Any = None,
    references: list[Reference] | None = None,
    positives: list[Reference] | None = None,
    *,
    seed: int = 0,
    stage: Callable[[str], None] = lambda _msg: None,
) -> Made:
    """Fingerprint ``owner`` with ``method``; with ``references``, calibrate it (see the module docstring)."""
    start = time.perf_counter()
    references = references or []
    calibrating = bool(references)
    options = method.candidates(params, calibrating, has_data=data is not None)
    premise = method.premise(owner)
    if premise:
        stage(f"{method.label}'s premise does not hold: {premise}")
    tried = []
    for option in options if calibrating and not premise else options[:1]:
        fingerprint = method.generate(owner, option, data if method.uses_data(option) else None, seed=seed, stage=stage)
        tried.append((option, fingerprint))
    listed = [{"name": r.name, "description": r.description} for r in references]
    if not calibrating:
        option, fingerprint = tried[0]
        return Made(fingerprint, option, None, len(options), listed, time.perf_counter() - start)
    if premise:
        option, fingerprint = tried[0]
        calibration = cal.Calibration(next(iter(method.scales)), {}, premise=premise)
        return Made(fingerprint, option, calibration, len(options), listed, time.perf_counter() - start)
    measured = []
    for number, (option, fingerprint) in enumerate(tried, 1):
        label = f" (candidate {number}/{len(tried)}: {_describe(option)})" if len(tried) > 1 else ""
        stage(f"scoring {len(references)} references and {len(positives or [])} of the owner's own copies{label}…")
        null_scores = [_statistics(method, fingerprint, r, owner) for r in references]
        copies = {c.name: _statistics(method, fingerprint, c, owner) for c in positives or []}
        nulls = {
            name: cal.Null(
                scale,
                method.points(fingerprint),
                tuple(scores[name] for scores in null_scores),
                tuple(r.name for r in references),
            )
            for name, scale in method.scales.items()
            if all(name in scores for scores in null_scores)
        }
        measured.append((nulls, copies))
    trials = [
        {
            "params": _describe(option),
            "nulls": {name: null.summary() for name, null in nulls.items()},
            "copies": copies,
        }
        for (option, _), (nulls, copies) in zip(tried, measured)
    ]
    index, statistic, selections = cal.choose(measured)
    nulls, copies = measured[index]
    calibration = cal.Calibration(
        statistic,
        nulls,
        selections,
        positives=copies,
        note=f"{len(references)} references; the statistic and variant chosen among {selections} candidates",
    )
    option, fingerprint = tried[index]
    return Made(fingerprint, option, calibration, len(options), listed, time.perf_counter() - start, trials)


def _statistics(method: AuditMethod, fingerprint: Any, model: Reference, owner: Owner) -> dict[str, float]:
    try:
        return method.score(fingerprint, model.model, num_classes=owner.num_classes).statistics
    except (ValueError, RuntimeError, OSError) as exc:
        raise ReferenceScoreError(f"{model.name} ({model.description}) could not be scored: {exc}") from exc


def _describe(params: Params) -> str:
    return ", ".join(f"{k} {v}" for k, v in vars(params).items() if k != "points")
