"""Suspect zoos for the black-box audits (IPGuard §5.1.2).

Positives are post-processed copies of the owner's model (the removal attacks of
:mod:`activeguard.models.attacks`), negatives are independently trained models.  Zoos are cached by
content hash (:mod:`activeguard.audit.cache`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from activeguard.audit.cache import (
    _hash,
    _tensor_digest,
    cached,
    default_cache_dir,
)
from activeguard.models.architectures import predict
from activeguard.models.attacks import (
    filter_prune,
    fine_tune,
    fine_tune_last_layer,
    global_prune,
    permute_channels,
    prune_sweep,
    quantize_int8,
    rescale_channels,
    retrain_last_layer,
)
from activeguard.models.workloads import DEFAULT_WORKLOAD, Workload, WorkloadSize
from activeguard.models.workloads import get as get_workload

# Kinds of suspect, in the order of the robustness table: removal attacks (positives), then the negatives.
ATTACK_KINDS: dict[str, str] = {
    "FTLL": "fine-tune last layer",
    "FTAL": "fine-tune all layers",
    "RTLL": "retrain last layer",
    "RTAL": "retrain all layers",
    "WP": "weight pruning sweep (to -3 points)",
    "FP": "filter pruning sweep (to -3 points)",
    "int8": "int8 weights",
    "permute": "permute channels",
    "rescale": "rescale channels",
    "permute+rescale": "permute + rescale",
    "overwrite": "overwrite (attacker's watermark)",
    "surrogate": "distilled, same architecture",
    "surrogate-other": "distilled, other architecture",
}
NEGATIVE_KINDS: dict[str, str] = {
    "same-arch": "independent, other seeds",
    "other-split": "independent, other data split",
    "other-arch": "independent, other architectures",
    "other-owner": "distilled from another owner",
    "random-forest": "random forests",
}
SURROGATES = ("surrogate", "surrogate-other")  # model extractions (distillation) of the owner
PRUNING_RATES = [round(0.1 * i, 1) for i in range(1, 10)]  # weight-pruning sweeps, until quality drops 3 points


@dataclass
class ZooMember:
    """One suspect: ``model`` is a torch module or a fitted scikit-learn estimator."""

    name: str
    kind: str
    positive: bool
    model: Any
    quality: float  # test accuracy (classifiers) or negative test MSE (others)


def classifier_zoo(
    owner: nn.Module,
    split,
    *,
    quick: bool = False,
    seed: int = 0,
    cache_dir: str | Path | None = "default",
    progress: bool = False,
    workload: str | Workload = DEFAULT_WORKLOAD,
) -> list[ZooMember]:
    """The classifier suspect zoo for ``owner`` (the ``workload``'s architecture, trained on ``split``).

    The attacker's data is the first half of the test set (IPGuard lets the attacker fine-tune on
    part of the test data); quality is accuracy on the second half.

    Positives (derived from the owner): FTLL, FTAL, RTLL, RTAL; weight pruning p = 0.1, 0.2, … and
    filter pruning c = 1/16, 2/16, … until accuracy drops by more than 3 points; int8 weights; the
    function-preserving edits (permuted and positively rescaled channels, where the workload names a
    layer pair); a weight overwrite (the attacker embeds its own watermark); and surrogates distilled
    from the owner's soft labels into the owner's architecture and the workload's first other one.

    Negatives (never saw the owner): the owner's architecture with other seeds and on other splits of
    the training rows, every other architecture of the workload (other widths, MLPs, a ResNet), models
    distilled from a *different* owner (the first other-seed model) and two random forests.  The
    workload's run size sets epochs, rows and seeds (quick: independent models see 1,000 rows).
    """
    from activeguard.models.architectures import model_id

    work = workload if isinstance(workload, Workload) else get_workload(workload)
    if cache_dir == "default":
        cache_dir = default_cache_dir()
    size = work.size(quick)
    n_train = size.zoo_rows or len(split.x_train)
    archs = {"owner": work.owner_arch.describe(), "others": [a.describe() for a in work.other_archs]}
    config = {"quick": quick, "seed": seed, "size": asdict(size), "archs": archs, "n_train": n_train, "v": 6}
    config["pair"] = work.channel_pair
    key = "zoo-cls-" + _hash(config, model_id(owner), _tensor_digest(split.x_train, split.x_test))
    return cached(key, lambda: _ZooBuilder(owner, split, work, size, n_train, seed).build(progress), cache_dir)


class _ZooBuilder:
    """One step per family of suspects, so the progress bar names what is being trained."""

    def __init__(self, owner: nn.Module, split, work: Workload, size: WorkloadSize, n_train: int, seed: int):
        from activeguard.models.architectures import accuracy

        self.owner, self.work, self.seed = owner, work, seed
        self.epochs, self.same_arch_models = size.zoo_epochs, size.same_arch_models
        half = len(split.x_test) // 2
        self.xa, self.ya = split.x_test[:half], split.y_test[:half]
        xe, ye = split.x_test[half:], split.y_test[half:]
        self.xe, self.ye = xe, ye
        self.acc = lambda m: accuracy(m, xe, ye)
        self.xt, self.yt = split.x_train[:n_train], split.y_train[:n_train]
        self.num_classes = split.num_classes

    def member(self, name: str, kind: str, positive: bool, model: nn.Module) -> ZooMember:
        return ZooMember(name, kind, positive, model, self.acc(model))

    def fit(self, arch, y: torch.Tensor, seed: int, x: torch.Tensor | None = None) -> nn.Module:
        """``arch`` trained with the zoo's epoch budget on ``x`` (default: the zoo's rows) and ``y``
        (labels, or soft labels for a distillation)."""
        x = self.xt if x is None else x
        return arch.fit(x, y, epochs=arch.epochs_factor * self.epochs, seed=seed, num_classes=self.num_classes)

    def soft_labels(self, model: nn.Module) -> torch.Tensor:
        return torch.softmax(predict(model, self.xt), 1)

    def build(self, progress: bool) -> list[ZooMember]:
        from tqdm.auto import tqdm

        steps: dict[str, Callable[[], list[ZooMember]]] = {
            "fine-tuning": self.fine_tuning,
            "pruning": self.pruning,
            "weight edits": self.weight_edits,
            "distillation": self.distillation,
            "other seeds": self.other_seeds,
            "other splits": self.other_splits,
            "other architectures": self.other_architectures,
            "distilled from another owner": self.other_owner,
            "random forests": self.forests,
        }
        members: list[ZooMember] = []
        for name in tqdm(steps, desc="suspect zoo", disable=not progress, leave=False):
            members += steps[name]()
        return members

    def fine_tuning(self) -> list[ZooMember]:
        o, xa, ya, e, s = self.owner, self.xa, self.ya, self.epochs, self.seed
        return [
            self.member("FTLL", "FTLL", True, fine_tune_last_layer(o, xa, ya, epochs=e, seed=s)),
            self.member("FTAL", "FTAL", True, fine_tune(o, xa, ya, epochs=e, lr=0.01, seed=s)),
            self.member("RTLL", "RTLL", True, retrain_last_layer(o, xa, ya, all_layers=False, epochs=2 * e, seed=s)),
            self.member("RTAL", "RTAL", True, retrain_last_layer(o, xa, ya, all_layers=True, epochs=2 * e, seed=s)),
        ]

    def pruning(self) -> list[ZooMember]:
        members = []
        for rate, m, q in prune_sweep(self.owner, self.acc, global_prune, PRUNING_RATES):
            members.append(ZooMember(f"WP p={rate}", "WP", True, m, q))
        for rate, m, q in prune_sweep(self.owner, self.acc, filter_prune, [i / 16 for i in range(1, 16)]):
            members.append(ZooMember(f"FP c={round(rate * 16)}/16", "FP", True, m, q))
        return members

    def weight_edits(self) -> list[ZooMember]:
        """int8 weights, the function-preserving edits and an overwrite with the attacker's own watermark."""
        from activeguard.watermark import digits as watermark

        o, s = self.owner, self.seed
        members = [self.member("int8 weights", "int8", True, quantize_int8(o))]
        if self.work.channel_pair:
            producer, consumer = self.work.channel_pair
            permuted = permute_channels(o, producer, consumer, seed=s + 2)
            members += [
                self.member(f"permute {producer}", "permute", True, permuted),
                self.member(
                    f"rescale {producer}", "rescale", True, rescale_channels(o, producer, consumer, seed=s + 3)
                ),
                self.member(
                    f"permute + rescale {producer}",
                    "permute+rescale",
                    True,
                    rescale_channels(permuted, producer, consumer, seed=s + 3),
                ),
            ]
        key = watermark.generate_key(o, watermark.WM2, experiment_seed=s + 6)
        overwritten = watermark.embed(copy.deepcopy(o), key, self.xa, self.ya, epochs=self.epochs, lam=0.1, seed=s + 6)
        return [*members, self.member("overwrite (attacker's watermark)", "overwrite", True, overwritten)]

    def distillation(self) -> list[ZooMember]:
        """Surrogates: the owner's soft labels distilled into its architecture and the first other one."""
        soft = self.soft_labels(self.owner)
        return [
            self.member(f"surrogate {arch.name}", kind, True, self.fit(arch, soft, self.seed + 50 + i))
            for i, (arch, kind) in enumerate(zip((self.work.owner_arch, *self.work.other_archs[:1]), SURROGATES))
        ]

    def other_seeds(self) -> list[ZooMember]:
        arch = self.work.owner_arch
        seeds = [self.seed + 1 + i for i in range(self.same_arch_models)]
        return [self.member(f"{arch.name} seed {s}", "same-arch", False, self.fit(arch, self.yt, s)) for s in seeds]

    def other_splits(self) -> list[ZooMember]:
        """The owner's architecture on each half of the training rows, and on the training rows of the
        workload's split for another seed (other data, not just another initialization)."""
        arch, half = self.work.owner_arch, len(self.xt) // 2
        members = []
        for i, rows in enumerate((slice(None, half), slice(half, None))):
            name = f"{arch.name} on training rows {rows.start or 0}-{rows.stop or len(self.xt)}"
            model = self.fit(arch, self.yt[rows], self.seed + 31 + i, self.xt[rows])
            members.append(self.member(name, "other-split", False, model))
        other = self.work.loader(self.seed + 1)
        x, y = other.x_train[: len(self.xt)], other.y_train[: len(self.xt)]
        if torch.equal(x, self.xt):  # a fixed official split (Fashion-MNIST): the halves are all there is
            return members
        model = self.fit(arch, y, self.seed + 33, x)
        return [*members, self.member(f"{arch.name} on the split of seed {self.seed + 1}", "other-split", False, model)]

    def other_architectures(self) -> list[ZooMember]:
        return [
            self.member(arch.name, "other-arch", False, self.fit(arch, self.yt, self.seed + 11 + i))
            for i, arch in enumerate(self.work.other_archs)
        ]

    def other_owner(self) -> list[ZooMember]:
        """Distilled from an independent model (a different owner): extraction, but not of *this* owner."""
        arch = self.work.owner_arch
        other = self.fit(arch, self.yt, self.seed + 41)
        soft = self.soft_labels(other)
        return [
            self.member(f"distilled from another {arch.name}: {a.name}", "other-owner", False, self.fit(a, soft, s))
            for a, s in ((arch, self.seed + 42), (self.work.other_archs[0], self.seed + 43))
        ]

    def forests(self) -> list[ZooMember]:
        from sklearn.ensemble import RandomForestClassifier

        members = []
        for s in (self.seed + 21, self.seed + 22):
            rf = RandomForestClassifier(n_estimators=100, random_state=s, n_jobs=1)
            rf.fit(torch.flatten(self.xt, 1).numpy(), self.yt.numpy())
            q = float((rf.predict(torch.flatten(self.xe, 1).numpy()) == self.ye.numpy()).mean())
            members.append(ZooMember(f"random forest {s}", "random-forest", False, rf, q))
        return members


def as_callable(member_model: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """A suspect as a function inputs -> outputs (torch modules) or labels (scikit-learn)."""
    if isinstance(member_model, nn.Module):
        member_model.eval()
        return lambda x: predict(member_model, x)
    return lambda x: torch.as_tensor(member_model.predict(torch.flatten(x, 1).numpy()))
