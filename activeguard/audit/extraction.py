"""Which licensed user extracted a suspect model: the answer watermark's audit.

Each license's answers in the watermark's band (:mod:`activeguard.watermark.answers`,
:mod:`activeguard.watermark.journal`) are replayed to the suspect. In every group (a pair of classes
and the model's third-ranked class) the license's answers leaned to the class its key prefers. Per
group the suspect's lean is measured against the model's own:

* a suspect that answers scores: per record, ``(ln p_s(pref) − ln p_s(other)) − (ln p(pref) − ln
  p(other))`` (clipped to ±10 nats), and the group's evidence ``v`` is their sum over √(records);
* a suspect that answers labels only: ``up`` counts records where the model said the other class
  and the suspect says the preferred one, ``down`` the reverse, and ``v = ln((up + 1) / (down + 1))``.

A model that never learnt from this license's answers cannot know which class its key prefers in any
group: each preference is an independent fair coin given everything the suspect is (one bit of an
HMAC), and flipping it turns ``v`` into ``−v``. So under the null "this suspect did not learn from
this license", the sum of the ``v`` is distributed as a sum of ``±|v|`` with independent fair signs,
and P(that sum ≥ the observed one) is an exact chance bound, computed exactly on a grid of 0.001
(made conservative by the grid's largest rounding error). It needs no reference models, and the
suspect's own leanings (its confusions between two classes) are its own baseline: they enter both
signs alike.

Bounds are multiplied by the number of licenses that could be named at all (Tarone's correction of
Bonferroni: a license with too few groups to ever reach ``alpha`` costs nothing), and a license is
named only at a bound ≤ ``alpha`` (1e-6 by default). With the owner's key, every record is checked
first: a record whose label the key does not give (a tampered or foreign journal) is dropped and
counted.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from activeguard.audit.base import Suspect, as_probabilities, suspect_outputs
from activeguard.watermark.answers import AnswerWatermark, group_of
from activeguard.watermark.journal import AnswerRecord

DEFAULT_ALPHA = 1e-6
QUERY_BATCH = 256
GRID = 1e-3  # nats: the exact sign-flip distribution is computed on this grid
SCORE_CLIP = 10.0  # nats: one record's lean counts at most this much
PROBABILITY_FLOOR = 1e-6


@dataclass
class LicenseEvidence:
    """One license's records against the suspect."""

    license_id: str
    user: str
    records: int
    groups: int  # groups where the suspect leans at all (v ≠ 0)
    agreeing: int  # ... of which it leans the license's way
    statistic: float  # the sum of the groups' evidence
    bound: float  # P(a statistic this high by chance), times the licenses that could be named
    named: bool = False


@dataclass
class ExtractionAudit:
    """The audit's answer: every license's evidence, and who is named."""

    alpha: float
    licenses: list[LicenseEvidence]
    rejected_records: int = 0  # records the owner's key does not vouch for
    named: list[LicenseEvidence] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        if self.named:
            return "extracted by " + ", ".join(f"{e.user} ({e.license_id})" for e in self.named)
        return "attributed to no license"

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "alpha": self.alpha,
            "named": [e.license_id for e in self.named],
            "rejected_records": self.rejected_records,
            "licenses": [asdict(e) for e in self.licenses],
        }


def sign_flip_bound(values: list[float], observed: float) -> float:
    """P(Σ ε_g |v_g| ≥ observed) for independent fair signs ε_g: exact on a grid of :data:`GRID`, rounded
    so that the bound is never below the true probability."""
    steps = [round(abs(v) / GRID) for v in values if v != 0]
    if not steps:
        return 1.0
    slack = len(steps) * GRID / 2  # the largest difference rounding can make to any signed sum
    total = sum(steps)
    dist = np.zeros(2 * total + 1)
    dist[total] = 1.0
    for step in steps:
        if step == 0:
            continue
        shifted = np.zeros_like(dist)
        shifted[: len(dist) - step] += 0.5 * dist[step:]
        shifted[step:] += 0.5 * dist[: len(dist) - step]
        dist = shifted
    threshold = math.ceil((observed - slack) / GRID - 1e-9) + total
    return float(min(1.0, dist[max(0, threshold) :].sum()))


def vouched(records: Iterable[AnswerRecord], watermark: AnswerWatermark) -> tuple[list[AnswerRecord], int]:
    """The records the owner's key gives exactly as recorded, and how many it does not."""
    kept, rejected = [], 0
    for r in records:
        group = group_of(r.owner_label, r.runner_up, r.third)
        if r.label in (r.owner_label, r.runner_up) and watermark.preferred(r.license_id, group) == r.label:
            kept.append(r)
        else:
            rejected += 1
    return kept, rejected


def audit_extraction(
    records: Iterable[AnswerRecord],
    suspect: Suspect,
    num_classes: int,
    *,
    alpha: float = DEFAULT_ALPHA,
    watermark: AnswerWatermark | None = None,
    progress: Any = None,
) -> ExtractionAudit:
    """Replay each license's records to ``suspect`` and name the licenses whose tilt it reproduces.

    ``watermark``: the owner's, to check the records first. ``progress``: called with the number of
    records answered after each batch (a progress bar's ``update``)."""
    records = _unique(records)
    rejected = 0
    if watermark is not None:
        records, rejected = vouched(records, watermark)
    by_license: dict[str, list[AnswerRecord]] = defaultdict(list)
    for r in records:
        by_license[r.license_id].append(r)
    evidence, values = [], []
    for license_id, rows in sorted(by_license.items()):
        outputs = _outputs(suspect, rows, num_classes, progress)
        probabilities = as_probabilities(outputs)
        if probabilities is not None:
            group_values = _score_evidence(rows, probabilities)
        else:
            group_values = _label_evidence(rows, outputs.long().tolist())
        values.append(group_values)
        observed = sum(group_values)
        agreeing = sum(v > 0 for v in group_values)
        nonzero = sum(v != 0 for v in group_values)
        evidence.append(LicenseEvidence(license_id, rows[0].user, len(rows), nonzero, agreeing, observed, 1.0))
    testable = _testable(evidence, alpha)
    for e, group_values in zip(evidence, values):
        e.bound = min(1.0, sign_flip_bound(group_values, e.statistic) * testable)
        e.named = e.bound <= alpha
    named = sorted((e for e in evidence if e.named), key=lambda e: e.bound)
    return ExtractionAudit(alpha, evidence, rejected, named)


def _unique(records: Iterable[AnswerRecord]) -> list[AnswerRecord]:
    """One record per license and input (a client that asked twice got the same answer twice)."""
    seen: dict[tuple[str, str], AnswerRecord] = {}
    for r in records:
        seen.setdefault((r.license_id, r.input_sha256), r)
    return list(seen.values())


def _score_evidence(rows: list[AnswerRecord], probabilities: torch.Tensor) -> list[float]:
    """Per group, how much more the suspect favours the preferred class over the other than the model does:
    (ln p_s(pref) − ln p_s(other)) − (ln p(pref) − ln p(other)) per record, clipped to ±:data:`SCORE_CLIP`,
    averaged and weighted by √records (a z-score's weighting: a large group is surer, not n times surer;
    measured best of mean, sum and √n on Knockoff and JBDA surrogates together). Swapping the preference
    negates every term, as the null needs."""
    logp = probabilities.clamp_min(PROBABILITY_FLOOR).log()
    groups: dict[tuple[int, int, int], list[float]] = defaultdict(list)
    preferred: dict[tuple[int, int, int], int] = {}
    for r, scores in zip(rows, logp):
        group = group_of(r.owner_label, r.runner_up, r.third)
        if preferred.setdefault(group, r.label) != r.label:
            continue  # records that disagree on the preference (no key to check them): not evidence
        other = r.runner_up if r.label == r.owner_label else r.owner_label
        model_lean = r.margin if r.label == r.owner_label else -r.margin
        lean = float(scores[r.label] - scores[other]) - model_lean
        groups[group].append(max(-SCORE_CLIP, min(SCORE_CLIP, lean)))
    return [sum(v) / math.sqrt(len(v)) for v in groups.values()]


def _label_evidence(rows: list[AnswerRecord], answers: list[int]) -> list[float]:
    """Per group, ln((up + 1) / (down + 1)): how far the suspect leans the license's way beyond the model
    (labels only)."""
    counts: dict[tuple[int, int, int], list[int]] = defaultdict(lambda: [0, 0])
    preferred: dict[tuple[int, int, int], int] = {}
    for r, s in zip(rows, answers):
        group = group_of(r.owner_label, r.runner_up, r.third)
        if preferred.setdefault(group, r.label) != r.label:
            continue  # records that disagree on the preference (no key to check them): not evidence
        tally = counts[group]  # a group with no lean either way still counts (v = 0)
        other = r.runner_up if r.label == r.owner_label else r.owner_label
        if r.owner_label == other and s == r.label:
            tally[0] += 1
        elif r.owner_label == r.label and s == other:
            tally[1] += 1
    return [math.log((up + 1) / (down + 1)) for up, down in counts.values()]


def _testable(evidence: list[LicenseEvidence], alpha: float) -> int:
    """Tarone's count: licenses whose smallest possible bound (every group leaning their way) could reach
    ``alpha`` after multiplying by the count itself."""
    count = len(evidence)
    while True:
        fits = sum(1 for e in evidence if 0.5**e.groups * max(count, 1) <= alpha)
        if fits >= count or fits == 0:
            return max(fits, 1)
        count = fits


def _outputs(suspect: Suspect, rows: list[AnswerRecord], num_classes: int, progress: Any) -> torch.Tensor:
    """The suspect's scores (n, classes) or labels (n,) for the records' inputs, in batches of one shape."""
    parts: dict[int, torch.Tensor] = {}
    by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        by_shape[r.shape].append(i)
    for indices in by_shape.values():
        for start in range(0, len(indices), QUERY_BATCH):
            chunk = indices[start : start + QUERY_BATCH]
            x = torch.stack([rows[i].tensor() for i in chunk])
            out = suspect_outputs(suspect, x, num_classes).cpu()
            parts.update(zip(chunk, out))
            if progress is not None:
                progress(len(chunk))
    ordered = [parts[i] for i in range(len(rows))]
    if len({p.ndim for p in ordered}) > 1:  # some batches gave scores, others labels: labels for all
        return torch.stack([p.argmax() if p.ndim else p for p in ordered])
    return torch.stack(ordered)
