"""The core end-to-end run behind ``activeguard evaluate core`` (no servers: the library alone).

On a workload (:mod:`activeguard.models.workloads`; default LeNet-5 on the bundled MNIST digits): train
(or load the cached) owner, embed the paper's watermark by fine-tuning, generate every user's
fingerprints, measure the control layer (Table 1, Figure 2, false acceptance), attack the watermark
(fine-tuning, the pruning sweep of Table 4), and write a report directory: report.json, report.md
and PNG plots. Every workload runs this same code.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from activeguard.credentials.control import ControlConfig
from activeguard.experiments.core_evaluation import (
    authentication_table,
    control_accuracy,
    false_acceptance,
    signed_capacity,
)
from activeguard.models import workloads
from activeguard.models.architectures import accuracy, save_model
from activeguard.models.attacks import fine_tune, prune_layer
from activeguard.models.data import Split
from activeguard.watermark import digits as wm

PRUNING_RATES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


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
    workload: str | workloads.Workload = workloads.DEFAULT_WORKLOAD,
    size: workloads.WorkloadSize | None = None,
    cache_dir: str | Path | None = "default",
) -> dict:
    """Run every core step on ``workload``, write the report directory and return the report dict.

    ``size`` overrides the workload's quick/full size (tests use a tinier one); ``cache_dir`` holds
    the trained owner (``None``: train it afresh and keep nothing).
    """
    work = workload if isinstance(workload, workloads.Workload) else workloads.get(workload)
    work.check_available()  # before the report directory exists
    size = size or work.size(quick)
    out_dir.mkdir(parents=True, exist_ok=True)
    split = work.data(seed, size)
    config = ControlConfig(num_classes=split.num_classes)
    report: dict = {
        "workload": work.name,
        "workload_title": work.title,
        "run_size": asdict(size),
        "dataset": work.dataset,
        "data_rows": {"train": len(split.x_train), "test": len(split.x_test)},
        "steps": {},
    }
    started = time.perf_counter()

    def step(key: str, title: str, fn: Callable[[], dict]) -> None:
        log(f"[{len(report['steps']) + 1}/5] {title} ...")
        t0 = time.perf_counter()
        result = fn()
        result["seconds"] = round(time.perf_counter() - t0, 2)
        report["steps"][key] = result

    state: dict = {}

    def train_step() -> dict:
        owner = work.owner(seed, size, cache_dir=cache_dir, progress=progress, split=split)
        state["base"] = owner.network
        conv = [p for p in owner.network.parameters() if p.dim() == 4]
        return {
            **owner.to_dict(),
            "test_accuracy": accuracy(owner.network, split.x_test, split.y_test),
            "architecture": work.owner_arch.title,
            "conv_layers": len(conv),
            "parameters": sum(p.numel() for p in owner.network.parameters()),
        }

    def embed_step() -> dict:
        layer = work.watermark_layer(state["base"])
        results: dict = {"layer": layer, "layer_shape": list(dict(state["base"].named_parameters())[layer].shape)}
        for name, digits in (("wm1", wm.WM1), ("wm2", wm.WM2)):
            key = wm.generate_key(state["base"], digits, layer=layer, experiment_seed=seed)  # reproducible figures
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
        state["model_id"] = save_model(marked, out_dir / "model.pt", {"watermarked": True, "workload": work.name})
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
        return {**table.to_dict(), "users": config.num_users}

    def control_step() -> dict:
        model = state["wm1"][0]
        return {
            **control_accuracy(model, config, split.x_test, split.y_test, seed=seed),
            "false_acceptance": false_acceptance(model, config, split.x_test, seed=seed),
            "signed_capacity": signed_capacity(model, split.num_classes, split.x_test, seed=seed + 99),
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
                "matched": tuned_check.matched,
                "test_accuracy": accuracy(tuned, split.x_test, split.y_test),
            },
            "pruning_wm1": pruning_sweep(*state["wm1"], split),
            "pruning_wm2": pruning_sweep(*state["wm2"], split),
        }

    step("train", f"train {work.owner_arch.title} on {work.data_title}", train_step)
    step("embed", "embed watermarks wm1 and wm2 by fine-tuning", embed_step)
    step("fingerprints", f"generate and authenticate {config.num_users} users' fingerprints", fingerprint_step)
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
    emb, fp, ctl, atk, trn = s["embed"], s["fingerprints"], s["control"], s["attacks"], s["train"]
    rows = report["data_rows"]
    lines = [
        "# ActiveGuard core report",
        "",
        f"Workload: {report['workload']} ({report['workload_title']}). "
        f"Data: {report['dataset']}; {rows['train']:,} training / {rows['test']:,} test rows. "
        f"Total time: {report['total_seconds']} s.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| owner model | {trn['architecture']}: {trn['conv_layers']} conv layers, {trn['parameters']:,} parameters |",
        f"| owner training time (per epoch) | {trn['train_seconds']} s ({trn['epoch_seconds']} s)"
        f"{', cached' if trn['cached'] else ''} |",
        f"| base test accuracy | {s['train']['test_accuracy']:.2%} |",
        f"| watermark layer | {emb['layer']} {tuple(emb['layer_shape'])} |",
        f"| watermarked (wm1) test accuracy | {emb['wm1']['test_accuracy']:.2%} |",
        f"| wm1 / wm2 extracted exactly | {emb['wm1']['verified']} / {emb['wm2']['verified']} |",
        f"| unmarked model verifies | {emb['unmarked_model']['verified']} "
        f"(matched {emb['unmarked_model']['matched']}, chance p={emb['unmarked_model']['chance_probability']:.2g}) |",
        f"| users' authentication success min / median | {fp['minimum']:.0%} / {fp['median']:.0%} |",
        f"| fingerprints admitted as another user | {fp['wrong_identity']} |",
        f"| time to generate {fp['users']} users' fingerprints ({fp['fingerprints']} in all) | "
        f"{fp['generation_seconds']:.1f} s |",
        f"| authorized / unauthorized accuracy | {ctl['authorized_accuracy']:.2%} / {ctl['unauthorized_accuracy']:.2%} |",
        f"| paper-mode false acceptance clean / noise | {ctl['false_acceptance']['clean']:.2%} / "
        f"{ctl['false_acceptance']['uniform_noise']:.2%} |",
        f"| signed mode ({ctl['signed_capacity']['scheme']} FO space): users issuable / capacity | "
        f"{ctl['signed_capacity']['issuable']} / {ctl['signed_capacity']['capacity']} |",
        f"| signed mode: largest per-license false acceptance clean / noise | "
        f"{ctl['signed_capacity']['max_false_acceptance_per_license']['clean']:.1e} / "
        f"{ctl['signed_capacity']['max_false_acceptance_per_license']['uniform_noise']:.1e} |",
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
    layer = report["steps"]["embed"]["layer"].removesuffix(".weight")
    acc_ax.set(xlabel=f"pruning rate of {layer} (%)", ylabel="test accuracy (%)", title="Accuracy under pruning")
    wm_ax.set(
        xlabel=f"pruning rate of {layer} (%)",
        ylabel="digits extracted",
        title="Watermark under pruning",
        ylim=(0, total + 1),
    )
    acc_ax.legend()
    wm_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
