"""``activeguard evaluate control-layer``: can a client tell the control layer's answers from the model's?

ActiveGuard wants an unauthorized user to receive a dysfunctional model, not a visible refusal. This
measures it the way a prober would: the same inputs are sent through the guard with a valid
credential (a gateway session) and with none, and for every answer a client sees its top
probability, its entropy, its top-two margin, whether the same request asked again gets the same
top class, and whether a slightly perturbed copy of the input (uniform noise of ±``noise`` of the
input range) does, and how far that answer moved. A random forest is trained to tell licensed from
unlicensed answers on these features (5-fold cross-validation); its ROC AUC is the figure (0.5: no
better than a coin). The same is measured for the paper's policy (a uniformly random probability
vector per request) for comparison. Inputs are the owner's test data, or uniform noise in the input
box when there is none.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from activeguard.credentials.control import random_outputs
from activeguard.experiments.served import ServedModel, default_owner
from activeguard.models.sources import LoadedModel

FEATURES = ("top_probability", "entropy", "margin", "repeat_agreement", "perturbed_agreement", "perturbed_shift")


def _features(first: torch.Tensor, again: torch.Tensor, nearby: torch.Tensor) -> np.ndarray:
    top2 = first.topk(2, dim=1).values
    entropy = -(first.clamp_min(1e-12).log() * first).sum(1)
    return torch.stack(
        [
            top2[:, 0],
            entropy,
            top2[:, 0] - top2[:, 1],
            (first.argmax(1) == again.argmax(1)).float(),
            (first.argmax(1) == nearby.argmax(1)).float(),
            (first - nearby).abs().sum(1),
        ],
        1,
    ).numpy()


def two_sample_auc(licensed: np.ndarray, unlicensed: np.ndarray, seed: int = 0) -> float:
    """ROC AUC of a random forest telling the two samples apart (cross-validated predictions). Row i of
    both samples answers the same input: the two stay in the same fold, so the forest never judges an
    answer by its twin from the other sample (which would push the AUC below 0.5, not towards it)."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold, cross_val_predict

    x = np.concatenate([licensed, unlicensed])
    y = np.concatenate([np.ones(len(licensed)), np.zeros(len(unlicensed))])
    groups = np.concatenate([np.arange(len(licensed)), np.arange(len(unlicensed))])
    forest = RandomForestClassifier(n_estimators=200, min_samples_leaf=5, random_state=seed)
    scores = cross_val_predict(forest, x, y, cv=GroupKFold(5), groups=groups, method="predict_proba")[:, 1]
    return float(roc_auc_score(y, scores))


def measure(
    loaded: LoadedModel, x: torch.Tensor, *, noise: float = 0.01, seed: int = 0, y: torch.Tensor | None = None
) -> dict[str, Any]:
    """The two-sample AUC of the guard's ``random`` policy and of the paper's, on inputs ``x``."""
    served = ServedModel(loaded, control_secret=None if seed == 0 else f"{seed:064x}")
    token = served.session("evaluation")
    low, high = loaded.spec.bounds
    generator = torch.Generator().manual_seed(seed)
    nearby_x = (x + (torch.rand(x.shape, generator=generator) * 2 - 1) * noise * (high - low)).clamp(low, high)
    runs = {
        who: [served.probabilities(rows, session) for rows in (x, x, nearby_x)]
        for who, session in (("licensed", token), ("unlicensed", None))
    }
    feats = {who: _features(*answers) for who, answers in runs.items()}
    paper = [random_outputs(len(x), served.profile.num_classes, generator) for _ in range(3)]
    result: dict[str, Any] = {
        "two_sample_auc": two_sample_auc(feats["licensed"], feats["unlicensed"], seed),
        "paper_random_policy_auc": two_sample_auc(feats["licensed"], _features(*paper), seed),
        "queries": len(x),
        "noise": noise,
        "features": list(FEATURES),
        "mean_features": {
            who: {name: round(float(v), 4) for name, v in zip(FEATURES, f.mean(0))} for who, f in feats.items()
        },
    }
    if y is not None:
        result["accuracy"] = {
            who: round(float((answers[0].argmax(1) == y).float().mean()), 4) for who, answers in runs.items()
        }
    return result


def run_control_layer_evaluation(
    out_dir: str | Path,
    quick: bool = False,
    seed: int = 0,
    *,
    loaded: LoadedModel | None = None,
    data: Any = None,
    progress: bool = False,
    **_: Any,
) -> dict[str, Any]:
    """On ``loaded`` (default: the bundled MNIST LeNet-5 workload's owner) and ``data`` (its test rows),
    written to ``control_layer.json`` and ``control_layer.md``."""
    if loaded is None:
        data, loaded = default_owner(quick, seed, progress)
    n = 200 if quick else 1000
    if data is not None:
        x, y = data.x_test[:n], data.y_test[:n]
    else:
        x, y = loaded.spec.random_rows(n, torch.Generator().manual_seed(seed)), None
    result = measure(loaded, x, seed=seed, y=y)
    result["model"] = str(loaded.path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "control_layer.json").write_text(json.dumps(result, indent=2))
    (out / "control_layer.md").write_text(_markdown(result))
    return result


def _markdown(r: dict[str, Any]) -> str:
    lines = [
        "# Can a client tell the control layer from the model?",
        "",
        f"{r['queries']} inputs, each sent licensed and unlicensed, again, and perturbed by ±{r['noise']:g} of the range.",
        "",
        "| policy | two-sample ROC AUC (0.5: indistinguishable) |",
        "|---|---|",
        f"| ActiveGuard `random` (keyed class permutation of the model's own answer) | **{r['two_sample_auc']:.3f}** |",
        f"| the paper's random policy (a uniformly random probability vector) | {r['paper_random_policy_auc']:.3f} |",
        "",
        "| feature (mean) | licensed | unlicensed |",
        "|---|---|---|",
    ]
    for name in r["features"]:
        lines.append(f"| {name} | {r['mean_features']['licensed'][name]} | {r['mean_features']['unlicensed'][name]} |")
    if "accuracy" in r:
        lines += [
            "",
            f"Accuracy: licensed {r['accuracy']['licensed']:.1%}, unlicensed {r['accuracy']['unlicensed']:.1%}.",
        ]
    return "\n".join(lines) + "\n"
