"""``activeguard evaluate families``: calibrated verdicts on model families the audits were not built on.

For every family of :mod:`activeguard.experiments.families`: train the owner, independent models of
its architecture (other seeds, other samples of the data, every third with SGD instead of Adam) and
of another architecture, and the owner's copies (fine-tuned on the attacker's data, pruned 30% and
50%, int8 weights). Then audit as a user does: references trained by the tool from the owner's data,
every black-box method fingerprinted with its null, every suspect judged by each method and by the
combined rule of ``audit all`` (a copy when any method's chance bound is at most α divided by the
number of methods). The figure that matters: independent models accused (goal 0) and copies flagged.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from activeguard.audit import base, calibration
from activeguard.audit.cache import _hash, cached, default_cache_dir
from activeguard.audit.fingerprinting import make_fingerprint
from activeguard.audit.references import positive_copies, trained_references
from activeguard.experiments.families import FAMILIES, Family
from activeguard.models import attacks
from activeguard.models.data import Split
from activeguard.models.inputs import network_of

ZOO_VERSION = 1


@dataclass(frozen=True)
class FamilySize:
    """How much each family's run does (``quick``: the tests' size)."""

    same_architecture: int = 8  # independent models of the owner's architecture
    other_architecture: int = 2
    references: int = 8
    points: int = 300  # IPGuard (CEM: 100)
    tafa_points: int = 300
    cem_steps: int = 300
    rows_fraction: float = 1.0  # of the family's training rows
    epochs_fraction: float = 1.0

    @classmethod
    def named(cls, quick: bool) -> FamilySize:
        if quick:
            return cls(3, 1, 8, 100, 100, 100, 0.5, 0.5)
        return cls()


@dataclass
class Suspect:
    name: str
    kind: str  # "copy" or "independent"
    model: torch.nn.Module
    accuracy: float


def _scaled(family: Family, size: FamilySize) -> Family:
    from dataclasses import replace

    return replace(
        family,
        rows=max(200, int(family.rows * size.rows_fraction)),
        epochs=max(1, int(round(family.epochs * size.epochs_fraction))),
    )


def _zoo(family: Family, split: Split, seed: int, size: FamilySize, cache_dir) -> tuple[Any, Any, list[Suspect]]:
    """(owner, owner's rows, suspects), the trained weights cached by content."""
    pool = len(split.x_train)
    rows = min(family.rows, pool)

    def draw(s: int) -> torch.Tensor:
        return torch.randperm(pool, generator=torch.Generator().manual_seed(s))[:rows]

    owner_rows = draw(seed)
    attack_x, attack_y = split.x_test[: len(split.x_test) // 2], split.y_test[: len(split.y_test) // 2]
    plan = [("owner", "owner", family.architecture, seed, "adam")]
    for a in range(size.same_architecture):
        optimizer = "sgd" if a % 3 == 2 else "adam"
        plan.append(
            (
                f"same architecture, seed {seed + 101 + a} ({optimizer})",
                "independent",
                family.architecture,
                seed + 101 + a,
                optimizer,
            )
        )
    for a in range(size.other_architecture):
        plan.append((f"other architecture, seed {seed + 201 + a}", "independent", family.other, seed + 201 + a, "adam"))

    def build() -> dict[str, Any]:
        states = {}
        for name, _, make, s, optimizer in plan:
            torch.manual_seed(s)
            model = family.fit(make(), split, owner_rows if name == "owner" else draw(s), s, optimizer)
            states[name] = model.state_dict()
        return states

    key = _hash("family-zoo", ZOO_VERSION, family.name, family.rows, family.epochs, seed, asdict(size))
    states = cached(f"family-{family.name}-{key}", build, cache_dir)
    models = {}
    for name, _, make, _, _ in plan:
        model = make()
        model.load_state_dict(states[name])
        models[name] = model.eval()
    owner = models.pop("owner")
    suspects = [Suspect(name, "independent", m, family.quality(m, split)) for name, m in models.items()]
    copies = {
        "fine-tuned (5 epochs, SGD lr 0.01, attacker's data)": attacks.fine_tune(
            owner, attack_x, attack_y, epochs=5, lr=0.01, seed=seed + 7
        ),
        "fine-tuned lightly (3 epochs, SGD lr 0.001)": attacks.fine_tune(
            owner, attack_x, attack_y, epochs=3, lr=0.001, seed=seed + 8
        ),
        "pruned 30%": attacks.global_prune(owner, 0.3),
        "pruned 50%": attacks.global_prune(owner, 0.5),
        "int8 weights": attacks.quantize_int8(owner),
    }
    suspects += [Suspect(name, "copy", m.eval(), family.quality(m, split)) for name, m in copies.items()]
    return owner, owner_rows, suspects


def evaluate_family(
    family: Family,
    *,
    quick: bool = False,
    seed: int = 0,
    cache_dir: Any = "default",
    progress=lambda _msg: None,
    alpha: float = calibration.DEFAULT_ALPHA,
) -> dict[str, Any]:
    """One family's audit: every suspect's verdict by every method and combined (module docstring)."""
    size = FamilySize.named(quick)
    family = _scaled(family, size)
    cache = default_cache_dir() if cache_dir == "default" else cache_dir
    split = family.data(seed)
    start = time.perf_counter()
    progress(
        f"{family.name}: training the owner and {size.same_architecture + size.other_architecture} independent models…"
    )
    owner, owner_rows, suspects = _zoo(family, split, seed, size, cache)
    owner_data = Split(
        f"{family.name} owner's data",
        "classification",
        split.x_train[owner_rows],
        split.y_train[owner_rows],
        split.x_test,
        split.y_test,
    )
    shape = tuple(split.x_train.shape[1:])
    audit_owner = base.Owner(owner, shape, int(split.y_train.max()) + 1, "classification")
    progress(f"{family.name}: training {size.references} references…")
    references = trained_references(audit_owner, owner_data, size.references, seed=seed, cache_dir=cache)
    positives = positive_copies(audit_owner, owner_data, seed=seed)
    methods = base.methods()
    per_method = alpha / len(methods)
    made = {}
    for name, method in methods.items():
        progress(f"{family.name}: {method.label} fingerprint with its null…")
        params = method.params_type(points=size.tafa_points if name == "tafa" else size.points)
        if name == "cem":
            params = method.params_type(points=min(size.points, 100), steps=size.cem_steps)
        made[name] = make_fingerprint(method, audit_owner, params, owner_data, references, positives, seed=seed)
    rows = []
    for suspect in suspects:
        verdicts = {}
        for name, method in methods.items():
            fp = made[name]
            score = method.score(fp.fingerprint, suspect.model, num_classes=audit_owner.num_classes)
            j = calibration.judge(score.statistics, fp.calibration, per_method)
            verdicts[name] = {
                "verdict": j.verdict,
                "statistic": j.statistic,
                "score": round(float(j.score), 4),
                "chance_bound": None if j.bound is None else float(f"{j.bound.value:.3g}"),
            }
        found = {v["verdict"] for v in verdicts.values()}
        combined = "copy" if "copy" in found else ("not a copy" if found == {"not a copy"} else "inconclusive")
        rows.append(
            {
                "suspect": suspect.name,
                "kind": suspect.kind,
                "accuracy": round(suspect.accuracy, 4),
                "methods": verdicts,
                "combined": combined,
            }
        )
    independents = [r for r in rows if r["kind"] == "independent"]
    copies = [r for r in rows if r["kind"] == "copy"]
    return {
        "family": family.name,
        "title": family.title,
        "owner_accuracy": round(family.quality(owner, split), 4),
        "parameters": sum(p.numel() for p in network_of(owner).parameters()),
        "size": asdict(size),
        "alpha": alpha,
        "alpha_per_method": per_method,
        "calibration": {
            name: {
                "statistic": m.calibration.statistic if m.calibration else None,
                "selections": m.calibration.selections if m.calibration else None,
                "premise": (m.calibration.premise or None) if m.calibration else None,
                "params": {k: v for k, v in vars(m.params).items() if k != "points"},
            }
            for name, m in made.items()
        },
        "references": [r.description for r in references],
        "suspects": rows,
        "independents": len(independents),
        "independents_accused": sum(r["combined"] == "copy" for r in independents),
        "independents_accused_by_any_method": sum(
            any(v["verdict"] == "copy" for v in r["methods"].values()) for r in independents
        ),
        "copies": len(copies),
        "copies_flagged": sum(r["combined"] == "copy" for r in copies),
        "seconds": round(time.perf_counter() - start, 1),
    }


def run_family_evaluation(
    out_dir: str | Path,
    quick: bool = False,
    seed: int = 0,
    progress: bool = False,
    families: tuple[str, ...] | None = None,
    cache_dir: Any = "default",
    **_: Any,
) -> dict[str, Any]:
    """Every family (or ``families``), written to ``families.json`` and ``families.md`` in ``out_dir``."""
    names = list(FAMILIES) if families is None else list(families)
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown families {', '.join(unknown)}; known: {', '.join(FAMILIES)}")
    say = print if progress else (lambda _msg: None)
    report = family_summary(
        [evaluate_family(FAMILIES[n], quick=quick, seed=seed, progress=say) for n in names], quick, seed
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "families.json").write_text(json.dumps(report, indent=2))
    (out / "families.md").write_text(family_markdown(report))
    return report


def family_summary(results: list[dict[str, Any]], quick: bool, seed: int) -> dict[str, Any]:
    """The families' results and their totals."""
    return {
        "quick": quick,
        "seed": seed,
        "families": results,
        "independents": sum(r["independents"] for r in results),
        "independents_accused": sum(r["independents_accused"] for r in results),
        "independents_accused_by_any_method": sum(r["independents_accused_by_any_method"] for r in results),
        "copies": sum(r["copies"] for r in results),
        "copies_flagged": sum(r["copies_flagged"] for r in results),
    }


def family_markdown(report: dict[str, Any]) -> str:
    """The families table: one line per family, then each family's suspects with every method's verdict."""
    lines = [
        "# Calibrated audits on model families the audits were not built on",
        "",
        f"{report['independents']} independent models over {len(report['families'])} families: "
        f"**{report['independents_accused']} accused** by the combined verdict "
        f"({report['independents_accused_by_any_method']} by any single method); "
        f"{report['copies_flagged']} of {report['copies']} copies flagged.",
        "",
        "| family | owner accuracy | calibrated statistic (IPGuard / CEM / TAFA) | independents accused | copies flagged |",
        "|---|---|---|---|---|",
    ]
    for f in report["families"]:
        chosen = " / ".join(
            (c["statistic"] or "–") + (" (premise fails)" if c["premise"] else "") for c in f["calibration"].values()
        )
        lines.append(
            f"| {f['title']} | {f['owner_accuracy']:.1%} | {chosen} | {f['independents_accused']}/{f['independents']} "
            f"| {f['copies_flagged']}/{f['copies']} |"
        )
    for f in report["families"]:
        labels = list(f["calibration"])
        lines += [
            "",
            f"## {f['title']}",
            "",
            "| suspect | kind | accuracy | " + " | ".join(labels) + " | combined |",
            "|---|---|---|" + "---|" * len(labels) + "---|",
        ]
        for r in f["suspects"]:
            cells = []
            for name in labels:
                v = r["methods"][name]
                bound = f", bound {v['chance_bound']:.2g}" if v["chance_bound"] is not None else ""
                cells.append(f"{v['verdict']} ({v['score']:.3g}{bound})")
            lines.append(
                f"| {r['suspect']} | {r['kind']} | {r['accuracy']:.1%} | "
                + " | ".join(cells)
                + f" | **{r['combined']}** |"
            )
    return "\n".join(lines) + "\n"
