"""Suspect zoos for the black-box audits (IPGuard §5.1.2).

Positives are post-processed copies of the owner's model (the removal attacks of
:mod:`activeguard.attacks`), negatives are independently trained models.  Zoos are cached by
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

from activeguard.attacks import (
    filter_prune,
    fine_tune,
    fine_tune_last_layer,
    global_prune,
    prune_sweep,
    retrain_last_layer,
)
from activeguard.audit.cache import (
    _hash,
    _tensor_digest,
    cached,
    default_cache_dir,
)
from activeguard.models import predict, train
from activeguard.workloads import DEFAULT_WORKLOAD, Workload
from activeguard.workloads import get as get_workload


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
    part of the test data); quality is accuracy on the second half.  Positives: FTLL, FTAL, RTLL,
    RTAL, weight pruning p = 0.1, 0.2, … and filter pruning c = 1/16, 2/16, … until accuracy drops
    by more than 3 points, and surrogates retrained on the owner's output labels (soft labels, as in a
    distillation-style model extraction) with the owner's architecture and the workload's first other
    architecture.  Negatives: the owner's architecture with other seeds, the workload's other
    architectures and two random forests.  The workload's run size sets epochs, rows and seeds
    (MNIST LeNet-5: 5 LeNet-5 seeds, two MLPs; quick: independent models see a quarter of the data).
    """
    from activeguard.models import accuracy, model_id

    work = workload if isinstance(workload, Workload) else get_workload(workload)
    if cache_dir == "default":
        cache_dir = default_cache_dir()
    size = work.size(quick)
    epochs = size.zoo_epochs
    n_train = size.zoo_rows or len(split.x_train)
    archs = {"owner": work.owner_arch.describe(), "others": [a.describe() for a in work.other_archs]}
    config = {"quick": quick, "seed": seed, "size": asdict(size), "archs": archs, "n_train": n_train, "v": 3}
    key = "zoo-cls-" + _hash(config, model_id(owner), _tensor_digest(split.x_train, split.x_test))

    def build() -> list[ZooMember]:
        from sklearn.ensemble import RandomForestClassifier
        from tqdm.auto import tqdm

        half = len(split.x_test) // 2
        xa, ya = split.x_test[:half], split.y_test[:half]
        xe, ye = split.x_test[half:], split.y_test[half:]
        acc = lambda m: accuracy(m, xe, ye)
        xt, yt = split.x_train[:n_train], split.y_train[:n_train]
        # the surrogate's training labels: the owner's output distribution (a distillation-style extraction)
        owner_labels = torch.softmax(predict(owner, xt), 1)
        fit = dict(num_classes=split.num_classes)
        same = [seed + 1 + i for i in range(size.same_arch_models)]
        members: list[ZooMember] = []
        steps = ["ft", "prune", "surrogate", *(f"same {s}" for s in same), "other", "rf"]
        bar = tqdm(steps, desc="suspect zoo", disable=not progress, leave=False)
        for step in bar:
            if step == "ft":
                for kind, make in {
                    "FTLL": lambda: fine_tune_last_layer(owner, xa, ya, epochs=epochs, seed=seed),
                    "FTAL": lambda: fine_tune(owner, xa, ya, epochs=epochs, lr=0.01, seed=seed),
                    "RTLL": lambda: retrain_last_layer(owner, xa, ya, all_layers=False, epochs=2 * epochs, seed=seed),
                    "RTAL": lambda: retrain_last_layer(owner, xa, ya, all_layers=True, epochs=2 * epochs, seed=seed),
                }.items():
                    m = make()
                    members.append(ZooMember(kind, kind, True, m, acc(m)))
            elif step == "prune":
                for rate, m, q in prune_sweep(owner, acc, global_prune, [round(0.1 * i, 1) for i in range(1, 10)]):
                    members.append(ZooMember(f"WP p={rate}", "WP", True, m, q))
                for rate, m, q in prune_sweep(owner, acc, filter_prune, [i / 16 for i in range(1, 16)]):
                    members.append(ZooMember(f"FP c={round(rate * 16)}/16", "FP", True, m, q))
            elif step == "surrogate":
                for i, arch in enumerate((work.owner_arch, *work.other_archs[:1])):
                    s = seed + 50 + i
                    m = arch.fit(xt, owner_labels, epochs=arch.epochs_factor * epochs, seed=s, **fit)
                    members.append(ZooMember(f"surrogate {arch.title}", "surrogate", True, m, acc(m)))
            elif step.startswith("same "):
                s = int(step.split()[1])
                m = work.owner_arch.fit(xt, yt, epochs=work.owner_arch.epochs_factor * epochs, seed=s, **fit)
                members.append(ZooMember(f"{work.owner_arch.name} seed {s}", "same-arch", False, m, acc(m)))
            elif step == "other":
                for i, arch in enumerate(work.other_archs):
                    m = arch.fit(xt, yt, epochs=arch.epochs_factor * epochs, seed=seed + 11 + i, **fit)
                    members.append(ZooMember(arch.name, "other-arch", False, m, acc(m)))
            elif step == "rf":
                for s in (seed + 21, seed + 22):
                    rf = RandomForestClassifier(n_estimators=100, random_state=s, n_jobs=1)
                    rf.fit(torch.flatten(xt, 1).numpy(), yt.numpy())
                    q = float((rf.predict(torch.flatten(xe, 1).numpy()) == ye.numpy()).mean())
                    members.append(ZooMember(f"random forest {s}", "random-forest", False, rf, q))
        return members

    return cached(key, build, cache_dir)


def as_callable(member_model: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """A suspect as a function inputs -> outputs (torch modules) or labels (scikit-learn)."""
    if isinstance(member_model, nn.Module):
        member_model.eval()
        return lambda x: predict(member_model, x)
    return lambda x: torch.as_tensor(member_model.predict(torch.flatten(x, 1).numpy()))


def _mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.nn.functional.mse_loss(predict(model, x).reshape(y.shape), y))


def regressor_zoo(
    owner: nn.Module, split, *, quick: bool = False, seed: int = 0, cache_dir: str | Path | None = "default"
) -> list[ZooMember]:
    """Suspects for the diabetes MLP regressor; quality = R² on the second half of the test set.

    Positives: FTLL, FTAL, RTLL, RTAL on the attacker's half of the test set, weight pruning until R²
    drops by > 0.03.  Negatives: five other seeds and two other MLP architectures.
    """
    from activeguard.models import MLPRegressor, model_id

    if cache_dir == "default":
        cache_dir = default_cache_dir()
    epochs = 60 if quick else 200
    key = "zoo-reg-" + _hash({"quick": quick, "seed": seed, "v": 1}, model_id(owner), _tensor_digest(split.x_train))

    def build() -> list[ZooMember]:
        half = len(split.x_test) // 2
        xa, ya = split.x_test[:half], split.y_test[:half]
        xe, ye = split.x_test[half:], split.y_test[half:]
        var = float(ye.var(unbiased=False))
        r2 = lambda m: 1 - _mse(m, xe, ye) / var
        kw = dict(loss="mse", seed=seed)
        members = [
            ZooMember("FTLL", "FTLL", True, fine_tune_last_layer(owner, xa, ya, epochs=20, lr=0.005, **kw), 0.0),
            ZooMember("FTAL", "FTAL", True, fine_tune(owner, xa, ya, epochs=20, lr=0.005, **kw), 0.0),
            ZooMember(
                "RTLL",
                "RTLL",
                True,
                retrain_last_layer(owner, xa, ya, all_layers=False, epochs=40, lr=0.005, **kw),
                0.0,
            ),
            ZooMember(
                "RTAL", "RTAL", True, retrain_last_layer(owner, xa, ya, all_layers=True, epochs=40, lr=0.005, **kw), 0.0
            ),
        ]
        for rate, m, _ in prune_sweep(owner, r2, global_prune, [round(0.1 * i, 1) for i in range(1, 10)]):
            members.append(ZooMember(f"WP p={rate}", "WP", True, m, 0.0))

        def independent(s: int, *hidden: tuple[int, ...]) -> nn.Module:
            torch.manual_seed(s)
            model = MLPRegressor(split.input_shape[0], *hidden)
            return train(model, split.x_train, split.y_train, loss="mse", epochs=epochs, batch_size=32, seed=s)

        for s in range(seed + 1, seed + 6):
            members.append(ZooMember(f"MLP (64, 64) seed {s}", "same-arch", False, independent(s), 0.0))
        for s, hidden in ((seed + 11, (128,)), (seed + 12, (32, 32, 32))):
            members.append(ZooMember(f"MLP {hidden}", "other-arch", False, independent(s, hidden), 0.0))
        for member in members:
            member.quality = r2(member.model)
        return members

    return cached(key, build, cache_dir)


def generator_zoo(
    owner: nn.Module,
    images: torch.Tensor,
    *,
    quick: bool = False,
    seed: int = 0,
    cache_dir: str | Path | None = "default",
) -> list[ZooMember]:
    """Suspects for the Fashion-MNIST generator; quality = −MSE to the owner's outputs on N(0, I) latents.

    Positives: fine-tuning all / the last layer on the owner's own samples G(z) for the attacker's
    latents z ~ N(0, 1.5²) (the pirate has only the generator), weight pruning p = 0.1, … while the
    relative output error stays ≤ 3 %, and Gaussian weight noise.  Negatives: generators trained with
    five other seeds and one with another hidden architecture.
    """
    from activeguard.models import FCGenerator, model_id, train_generator

    if cache_dir == "default":
        cache_dir = default_cache_dir()
    epochs = 2 if quick else 5
    latent = owner.config["latent_dim"]
    key = "zoo-gen-" + _hash({"quick": quick, "seed": seed, "v": 1}, model_id(owner), _tensor_digest(images))

    def build() -> list[ZooMember]:
        gen = torch.Generator().manual_seed(seed)
        z_eval = torch.randn(512, latent, generator=gen)
        ref = predict(owner, z_eval)
        scale = float(ref.pow(2).mean())
        quality = lambda m: -_mse(m, z_eval, ref) / scale
        z_att = 1.5 * torch.randn(2048, latent, generator=gen)
        target = predict(owner, z_att)
        members = [
            ZooMember(
                "FTAL", "FTAL", True, fine_tune(owner, z_att, target, epochs=3, lr=0.01, loss="mse", seed=seed), 0
            ),
            ZooMember(
                "FTLL",
                "FTLL",
                True,
                fine_tune_last_layer(owner, z_att, target, epochs=3, lr=0.01, loss="mse", seed=seed),
                0,
            ),
        ]
        for rate, m, _ in prune_sweep(
            owner, lambda m: 1 + quality(m), global_prune, [round(0.1 * i, 1) for i in range(1, 10)]
        ):
            members.append(ZooMember(f"WP p={rate}", "WP", True, m, 0))
        noisy = copy.deepcopy(owner)
        with torch.no_grad():
            torch.manual_seed(seed)
            for p in noisy.parameters():
                p.add_(0.01 * p.std() * torch.randn_like(p))
        members.append(ZooMember("weight noise 1%", "noise", True, noisy, 0))
        for s in range(seed + 1, seed + 6):
            members.append(
                ZooMember(
                    f"generator seed {s}",
                    "same-arch",
                    False,
                    train_generator(images, latent_dim=latent, epochs=epochs, seed=s),
                    0,
                )
            )
        torch.manual_seed(seed + 11)
        other = FCGenerator(latent, images[0].numel(), (256, 256))
        enc = nn.Sequential(nn.Linear(images[0].numel(), 256), nn.ReLU(), nn.Linear(256, latent))
        flat = torch.flatten(images, 1)
        train(nn.Sequential(enc, other), flat, flat, loss="mse", epochs=epochs, batch_size=128, seed=seed + 11)
        members.append(ZooMember("generator (256, 256)", "other-arch", False, other.eval(), 0))
        for member in members:
            member.quality = quality(member.model)
        return members

    return cached(key, build, cache_dir)
