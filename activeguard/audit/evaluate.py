"""Paper-shaped evaluation of the black-box audits (IPGuard Tables 4, 5, 8; CEM ROC; TAFA ARUC per task).

``run_audit_evaluation(out_dir, quick, seed)`` builds (or loads from the content-hash cache) the
suspect zoos, runs IPGuard, CEM and the TAFA reconstruction, and writes ``audit.json`` and
``audit.md`` into ``out_dir``.  ARUC is computed, as in IPGuard, over the post-processing positives
(FTLL, FTAL, RTLL, RTAL, WP, FP) against all negatives; retrained surrogates are scored separately
in the CEM comparison (surrogates vs independently trained references), as in the CEM paper.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from activeguard.audit import conferrable, ipguard, metrics, tafa
from activeguard.audit.suspects import (
    ZooMember,
    as_callable,
    cached,
    classifier_zoo,
    default_cache_dir,
    generator_zoo,
    regressor_zoo,
)

POST_PROCESSING = {"FTLL", "FTAL", "RTLL", "RTAL", "WP", "FP", "noise"}


def _compose(outer, inner):
    return lambda x: outer(inner(x))


def _split_scores(zoo: list[ZooMember], scores: list[float]):
    pos = [s for z, s in zip(zoo, scores) if z.positive and z.kind in POST_PROCESSING]
    neg = [s for z, s in zip(zoo, scores) if not z.positive]
    return pos, neg


def _by_kind(zoo: list[ZooMember], scores: list[float]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for z, s in zip(zoo, scores):
        out.setdefault(z.kind, []).append(round(float(s), 4))
    return out


def _fmt_range(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.2f}" if abs(hi - lo) < 1e-9 else f"{lo:.2f}–{hi:.2f}"


def run_audit_evaluation(out_dir: str | Path, quick: bool = False, seed: int = 0, *,
                         cache_dir: str | Path | None = "default", progress: bool = False) -> dict[str, Any]:
    from activeguard.data import load_diabetes, load_fashion_mnist, load_mnist
    from activeguard.models import (
        model_id,
        train_generator,
        train_lenet5,
        train_regressor,
    )

    if cache_dir == "default":
        cache_dir = default_cache_dir()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    result: dict[str, Any] = {"quick": quick, "seed": seed}
    n_points = 50 if quick else 100

    # --- classifier: MNIST / LeNet-5 ---------------------------------------------------------
    mnist = load_mnist(seed=seed)
    lenet_epochs = 15
    owner = cached(f"owner-lenet5-{seed}-{lenet_epochs}", lambda: train_lenet5(mnist, epochs=lenet_epochs, seed=seed,
                                                                             progress=progress), cache_dir)
    zoo = classifier_zoo(owner, mnist, quick=quick, seed=seed, cache_dir=cache_dir, progress=progress)
    result["classifier_zoo"] = [{"name": z.name, "kind": z.kind, "positive": z.positive,
                                 "accuracy": round(z.quality, 4)} for z in zoo]
    suspects = [as_callable(z.model) for z in zoo]

    ks = [1.0, 3.0, 10.0] if quick else [1.0, 2.0, 3.0, 5.0, 10.0, 20.0]
    ip_rows: dict[str, Any] = {}
    best_fp: dict[str, ipguard.Fingerprint] = {}
    for method in ipguard.METHODS:
        per_k = []
        for k in ks:
            fp = ipguard.generate(owner, n_points, k=k, method=method, x_train=mnist.x_train, seed=seed)
            scores = [ipguard.verify(fp, s) for s in suspects]
            pos, neg = _split_scores(zoo, scores)
            per_k.append({"k": k, "aruc": metrics.aruc(pos, neg), "seconds": fp.seconds,
                          "matching_rates": _by_kind(zoo, scores), "fp": fp, "scores": scores})
        best = max(per_k, key=lambda r: r["aruc"])
        best_fp[method] = best.pop("fp")
        for r in per_k:
            r.pop("fp", None)
        ip_rows[method] = {"best_k": best["k"], "aruc": best["aruc"], "seconds": best["seconds"],
                           "matching_rates": best["matching_rates"], "scores": best["scores"],
                           "aruc_by_k": {str(r["k"]): r["aruc"] for r in per_k}}
    result["ipguard"] = ip_rows

    # batched vs per-point loop of the same algorithm (Table 8 analog + batching benchmark)
    n_bench = 20 if quick else 100
    kw = dict(k=ip_rows["TL"]["best_k"], method="TL", x_train=mnist.x_train, seed=seed)
    batched = ipguard.generate(owner, n_bench, **kw)
    loop = ipguard.generate_loop(owner, n_bench, **kw)
    result["ipguard_benchmark"] = {"points": n_bench, "batched_s": batched.seconds, "loop_s": loop.seconds,
                                   "speedup": loop.seconds / max(batched.seconds, 1e-9)}

    # CEM vs IPGuard on retrained surrogates vs independently trained references
    ens_slice = slice(0, 1000) if quick else slice(0, len(mnist.x_train))
    ens_key = f"cem-ensemble-{model_id(owner)[:16]}-{quick}-{seed}"
    surr, refs = cached(ens_key, lambda: conferrable.train_ensemble(
        owner, mnist.x_train[ens_slice], mnist.y_train[ens_slice], n_surrogates=2 if quick else 4,
        n_references=2 if quick else 4, epochs=3 if quick else 6, seed=seed + 100), cache_dir)
    cem_fp = conferrable.generate(owner, surr, refs, mnist.x_test[: 4 * n_points], n=n_points,
                                  steps=100 if quick else 300, seed=seed)
    cem_scores = [conferrable.caeacc(cem_fp, s) for s in suspects]
    surrogate_idx = [a for a, z in enumerate(zoo) if z.kind == "surrogate"]
    reference_idx = [a for a, z in enumerate(zoo) if z.kind in ("same-arch", "other-arch")]
    ip_tl = ip_rows["TL"]["scores"]
    best_ip = max(ip_rows, key=lambda m: ip_rows[m]["aruc"])
    ip_best_scores = ip_rows[best_ip]["scores"]
    pick = lambda sc, idx: [sc[a] for a in idx]
    cem_pos, cem_neg = _split_scores(zoo, cem_scores)
    result["cem"] = {
        "points": len(cem_fp.points), "passed_threshold": cem_fp.passed, "threshold": cem_fp.threshold,
        "mean_conferrability": float(cem_fp.conferrability.mean()), "seconds": cem_fp.seconds,
        "caeacc": _by_kind(zoo, cem_scores),
        "roc_auc_surrogates_vs_references": metrics.roc_auc(pick(cem_scores, surrogate_idx),
                                                             pick(cem_scores, reference_idx)),
        "ipguard_tl_roc_auc_surrogates_vs_references": metrics.roc_auc(pick(ip_tl, surrogate_idx),
                                                                        pick(ip_tl, reference_idx)),
        f"ipguard_{best_ip.lower()}_roc_auc_surrogates_vs_references": metrics.roc_auc(
            pick(ip_best_scores, surrogate_idx), pick(ip_best_scores, reference_idx)),
        "aruc_post_processing": metrics.aruc(cem_pos, cem_neg),
    }

    # --- TAFA reconstruction on three task kinds ------------------------------------------------
    tafa_rows: dict[str, Any] = {}

    def run_tafa(task: str, owner_model, zoo_t: list[ZooMember], fp_kwargs: dict, output=None) -> None:
        calls = [as_callable(z.model) for z in zoo_t]
        if output is not None:
            calls = [_compose(output, c) for c in calls]
        fp = tafa.generate(owner_model, n_points, output=output and (lambda x: output(owner_model(x))),
                           seed=seed, **fp_kwargs)
        row: dict[str, Any] = {"solver": fp.solver, "points": len(fp.points), "seconds": fp.seconds}
        for stat in tafa.STATISTICS:
            scores = [tafa.verify(fp, c, stat) for c in calls]
            pos, neg = _split_scores(zoo_t, scores)
            row[stat] = {"aruc": metrics.aruc(pos, neg), "roc_auc": metrics.roc_auc(pos, neg),
                         "gap": metrics.gap(pos, neg), "scores": _by_kind(zoo_t, scores)}
        tafa_rows[task] = row

    softmax = lambda z: torch.softmax(torch.as_tensor(z, dtype=torch.float32), 1)
    cls_zoo = [z for z in zoo if isinstance(z.model, torch.nn.Module)]  # forests have no scores to compare
    run_tafa("classification (MNIST LeNet-5)", owner, cls_zoo,
             {"input_shape": tuple(mnist.input_shape), "solver": "gradient", "bounds": (0.0, 1.0),
              "init": "uniform", "delta": 0.05}, output=softmax)
    diabetes = load_diabetes(seed=seed)
    reg = cached(f"owner-regressor-{seed}", lambda: train_regressor(diabetes, epochs=60, seed=seed), cache_dir)
    run_tafa("regression (diabetes MLP)", reg, regressor_zoo(reg, diabetes, quick=quick, seed=seed,
                                                             cache_dir=cache_dir),
             {"input_shape": tuple(diabetes.input_shape), "solver": "lp", "delta": 0.05})
    fashion = load_fashion_mnist(seed=seed, limit=2000 if quick else 6000)
    gen = cached(f"owner-generator-{seed}-{quick}", lambda: train_generator(fashion.x_train, epochs=3 if quick else 5,
                                                                           seed=seed), cache_dir)
    run_tafa("generative (Fashion-MNIST generator)", gen,
             generator_zoo(gen, fashion.x_train, quick=quick, seed=seed, cache_dir=cache_dir),
             {"input_shape": (gen.config["latent_dim"],), "solver": "lp", "delta": 0.05})
    mean_aruc = {st: float(np.mean([r[st]["aruc"] for r in tafa_rows.values()])) for st in tafa.STATISTICS}
    result["tafa"] = {"tasks": tafa_rows, "mean_aruc": mean_aruc,
                      "better_statistic": max(mean_aruc, key=mean_aruc.get),
                      "default_statistic": tafa.DEFAULT_STATISTIC}
    result["seconds"] = time.perf_counter() - t_start

    result["_cem_scores"] = cem_scores
    result["plots"] = _plots(result, zoo, out)
    result["cem"]["scores"] = result.pop("_cem_scores")
    (out / "audit.json").write_text(json.dumps(result, indent=2, default=float))
    (out / "audit.md").write_text(_markdown(result))
    return result


def _markdown(r: dict[str, Any]) -> str:
    lines = ["# Audit evaluation (IPGuard, CEM, TAFA reconstruction)", "",
             f"quick = {r['quick']}, seed = {r['seed']}, total {r['seconds']:.0f} s.", "",
             "ARUC (IPGuard Eq. 7, r = 100) over the post-processing positives (FTLL, FTAL, RTLL, RTAL, WP, FP) "
             "against all negatives (other seeds, other architectures, random forests).", "",
             "## Table 4 analog: best ARUC per method (MNIST, LeNet-5)", "",
             "| method | best k | ARUC | ARUC by k | generation time (s) |", "|---|---|---|---|---|"]
    for m, row in r["ipguard"].items():
        by_k = ", ".join(f"{k}: {v:.3f}" for k, v in row["aruc_by_k"].items())
        lines.append(f"| IPGuard-{m} | {row['best_k']} | {row['aruc']:.3f} | {by_k} | {row['seconds']:.2f} |")
    lines.append(f"| CEM (CAEAcc) | – | {r['cem']['aruc_post_processing']:.3f} | – | {r['cem']['seconds']:.2f} |")
    kinds = list(r["ipguard"]["TL"]["matching_rates"])
    lines += ["", "## Table 5 analog: matching rates per suspect type (range over instances)", "",
              "| suspect | " + " | ".join(f"IPGuard-{m}" for m in r["ipguard"]) + " | CEM CAEAcc |",
              "|---|" + "---|" * (len(r["ipguard"]) + 1)]
    for kind in kinds:
        cells = [_fmt_range(r["ipguard"][m]["matching_rates"][kind]) for m in r["ipguard"]]
        lines.append(f"| {kind} | " + " | ".join(cells) + f" | {_fmt_range(r['cem']['caeacc'][kind])} |")
    b = r["ipguard_benchmark"]
    lines += ["", "## Table 8 analog / batching benchmark", "",
              f"IPGuard-TL, {b['points']} points: one batched optimization {b['batched_s']:.2f} s, "
              f"per-point loop {b['loop_s']:.2f} s, speed-up {b['speedup']:.1f}×.", "",
              "## CEM vs IPGuard: retrained surrogates vs independently trained references (ROC AUC)", "",
              "| method | ROC AUC |", "|---|---|"]
    for key, value in r["cem"].items():
        if key.endswith("roc_auc_surrogates_vs_references"):
            name = key.replace("_roc_auc_surrogates_vs_references", "").replace("roc_auc_surrogates_vs_references", "cem")
            lines.append(f"| {name or 'CEM'} | {value:.3f} |")
    c = r["cem"]
    lines += ["", f"CEM: {c['points']} fingerprints, {c['passed_threshold']} reached conferrability ≥ "
              f"{c['threshold']} on the training ensemble (mean {c['mean_conferrability']:.2f}).", "",
              "## TAFA (reconstruction, not the published algorithm): ARUC per task and statistic", "",
              "| task | solver | distance ARUC | distance AUC | bending ARUC | bending AUC |", "|---|---|---|---|---|---|"]
    for task, row in r["tafa"]["tasks"].items():
        lines.append(f"| {task} | {row['solver']} | {row['distance']['aruc']:.3f} | {row['distance']['roc_auc']:.3f} "
                     f"| {row['bending']['aruc']:.3f} | {row['bending']['roc_auc']:.3f} |")
    t = r["tafa"]
    lines += ["", "Mean ARUC: " + ", ".join(f"{k} {v:.3f}" for k, v in t["mean_aruc"].items())
              + f"; better: {t['better_statistic']}; library default: {t['default_statistic']}.", ""]
    return "\n".join(lines)


def _plots(r: dict[str, Any], zoo: list[ZooMember], out: Path) -> list[str]:
    """Robustness-uniqueness curves, matching rates per suspect, ROC of surrogates vs references (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    files = []
    fig, axes = plt.subplots(1, len(r["ipguard"]), figsize=(4 * len(r["ipguard"]), 3.2), squeeze=False)
    for ax, (m, row) in zip(axes[0], r["ipguard"].items()):
        pos, neg = _split_scores(zoo, row["scores"])
        taus, rob, uni = metrics.robustness_uniqueness_curves(pos, neg)
        ax.plot(taus, rob, label="robustness")
        ax.plot(taus, uni, label="uniqueness")
        ax.fill_between(taus, np.minimum(rob, uni), alpha=0.2)
        ax.set_title(f"IPGuard-{m} (k={row['best_k']}) ARUC {row['aruc']:.2f}")
        ax.set_xlabel("matching-rate threshold")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(out / "robustness_uniqueness.png", dpi=100)
    plt.close(fig)
    files.append("robustness_uniqueness.png")

    fig, ax = plt.subplots(figsize=(10, 3.5))
    names = [z.name for z in zoo]
    for a, (m, row) in enumerate(r["ipguard"].items()):
        ax.bar(np.arange(len(zoo)) + a * 0.2, row["scores"], width=0.2, label=f"IPGuard-{m}")
    ax.set_xticks(np.arange(len(zoo)) + 0.3, names, rotation=70, fontsize=7)
    ax.set_ylabel("matching rate")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "matching_rates.png", dpi=100)
    plt.close(fig)
    files.append("matching_rates.png")

    idx = [a for a, z in enumerate(zoo) if z.kind in ("surrogate", "same-arch", "other-arch")]
    y = [1 if zoo[a].kind == "surrogate" else 0 for a in idx]
    fig, ax = plt.subplots(figsize=(4, 4))
    for name, scores in (("CEM", r["_cem_scores"]), ("IPGuard-TL", r["ipguard"]["TL"]["scores"])):
        fpr, tpr, _ = roc_curve(y, [scores[a] for a in idx])
        ax.plot(fpr, tpr, label=name)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("false positive rate (references)")
    ax.set_ylabel("true positive rate (surrogates)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "roc_surrogates.png", dpi=100)
    plt.close(fig)
    files.append("roc_surrogates.png")
    return files
