"""Scores and summary metrics shared by the audit methods (IPGuard §3.3 and §5.1.3, CEM ROC AUC).

Every audit method reduces a suspect to one score in [0, 1] where larger means "more like the
owner's model" (IPGuard: the matching rate).  Positive suspects are post-processed copies of the
owner's model, negative suspects are independent models.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ARUC_INTERVALS = 100  # IPGuard Eq. 7: r = 100


def _arr(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64).ravel()
    if a.size == 0:
        raise ValueError(f"{name} scores are empty")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} scores contain NaN or infinity")
    return a


def matching_rate(owner_labels, suspect_labels) -> float:
    """Fraction of fingerprints on which the suspect predicts the owner's label."""
    a = np.asarray(owner_labels).ravel()
    b = np.asarray(suspect_labels).ravel()
    if a.size == 0:
        raise ValueError("the fingerprint is empty: no labels to match")
    if a.shape != b.shape:
        raise ValueError(f"suspect returned {b.size} labels for {a.size} fingerprints")
    return float(np.mean(a == b))


def robustness(positive_scores, threshold: float) -> float:
    """R(τ): fraction of positive suspects verified, i.e. with score ≥ τ."""
    return float(np.mean(_arr(positive_scores, "positive") >= threshold))


def uniqueness(negative_scores, threshold: float) -> float:
    """U(τ): fraction of negative suspects not verified, i.e. with score < τ."""
    return float(np.mean(_arr(negative_scores, "negative") < threshold))


def robustness_uniqueness_curves(positive_scores, negative_scores, r: int = ARUC_INTERVALS):
    """(τ, R(τ), U(τ)) at the rightmost point τ = τ'/r, τ' = 1..r, of each interval of [0, 1]."""
    if r < 1:
        raise ValueError(f"r must be ≥ 1, got {r}")
    pos = _arr(positive_scores, "positive")
    neg = _arr(negative_scores, "negative")
    taus = np.arange(1, r + 1, dtype=np.float64) / r
    rob = np.array([np.mean(pos >= t) for t in taus])
    uni = np.array([np.mean(neg < t) for t in taus])
    return taus, rob, uni


def aruc(positive_scores, negative_scores, r: int = ARUC_INTERVALS) -> float:
    """IPGuard Eq. 7: ARUC = (1/r) Σ_{τ'=1..r} min{R(τ'/r), U(τ'/r)}."""
    _, rob, uni = robustness_uniqueness_curves(positive_scores, negative_scores, r)
    return float(np.mean(np.minimum(rob, uni)))


def roc_auc(positive_scores, negative_scores) -> float:
    """ROC AUC of the scores separating positives (label 1) from negatives (label 0)."""
    from sklearn.metrics import roc_auc_score

    pos = _arr(positive_scores, "positive")
    neg = _arr(negative_scores, "negative")
    y = np.concatenate([np.ones_like(pos), np.zeros_like(neg)])
    return float(roc_auc_score(y, np.concatenate([pos, neg])))


def gap(positive_scores, negative_scores) -> float:
    """Lowest positive score minus highest negative score (> 0 means a clean separation)."""
    return float(_arr(positive_scores, "positive").min() - _arr(negative_scores, "negative").max())


def summarize(positive_scores, negative_scores) -> dict[str, float]:
    pos = _arr(positive_scores, "positive")
    neg = _arr(negative_scores, "negative")
    return {
        "aruc": aruc(pos, neg),
        "roc_auc": roc_auc(pos, neg),
        "gap": gap(pos, neg),
        "positive_mean": float(pos.mean()),
        "negative_mean": float(neg.mean()),
    }
