"""Reference models, the null of every calibrated audit, and the tool's own copies of the owner.

**References** are independent of the owner's model but of its task. Two sources, combinable:

* trained here from the owner's data (``--data``): the owner's own architecture with fresh weights
  (:func:`activeguard.models.fresh.fresh_copy`, every model source), each on its own random 80% of
  the training rows, with its own seed and one of :data:`RECIPES` in turn (Adam or SGD, several
  learning rates and batch sizes), trained until its held-out accuracy reaches the owner's (a
  regressor: its held-out error) or :data:`MAX_EPOCHS`. The same architecture on the same data is
  the closest an honest competitor can come; the spread of recipes stands for the ways an owner
  and a competitor may train, which the tool cannot know;
* supplied by the owner (``--reference PATH``): any model file or endpoint, e.g. models of other
  architectures, or public models of the same task.

**Positive copies** are the owner's model after the tool's own removal attacks (global pruning,
int8 weights, a short fine-tune when there is data). They only choose among a method's statistics
(the one whose weakest copy stands furthest from the null); they never enter a bound.

Trained references are cached by content hash under ``ACTIVEGUARD_CACHE``, as state dicts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from activeguard.audit.base import Owner, Suspect
from activeguard.audit.cache import _hash, _tensor_digest, cached, default_cache_dir
from activeguard.models import attacks
from activeguard.models.architectures import accuracy, model_id, predict, train
from activeguard.models.fresh import FreshCopyError, fresh_copy
from activeguard.models.inputs import network_of

DEFAULT_REFERENCES = 8
SUBSET = 0.8  # of the training rows, drawn anew for each reference
MAX_EPOCHS = 30
PATIENCE = 3  # epochs without gain after which a reference that cannot reach the owner stops
CACHE_FORMAT = "references/1"


@dataclass(frozen=True)
class Recipe:
    optimizer: str
    lr: float
    batch_size: int

    def describe(self) -> str:
        return f"{self.optimizer} lr {self.lr:g} batch {self.batch_size}"


RECIPES = (
    Recipe("adam", 1e-3, 64),
    Recipe("sgd", 0.01, 32),
    Recipe("adam", 5e-4, 128),
    Recipe("sgd", 0.03, 64),
)


@dataclass
class Reference:
    """A model scored for the null (or a positive copy), and how it came about."""

    name: str
    model: Suspect
    description: str


class ReferenceError(ValueError):
    """References cannot be made as asked (the message says why and what to give instead)."""


def _quality(task: str) -> Callable[[nn.Module, torch.Tensor, torch.Tensor], float]:
    """Held-out quality, larger is better: accuracy for a classifier, minus the mean squared error else."""
    if task == "classification":
        return accuracy
    return lambda m, x, y: -float(((predict(m, x).reshape(len(y), -1) - y.reshape(len(y), -1)) ** 2).mean())


def _targets(task: str, y: torch.Tensor) -> tuple[torch.Tensor, str]:
    if task == "classification":
        return y.long(), "cross_entropy"
    if task == "regression":
        return y.float().reshape(len(y), -1), "mse"
    raise ReferenceError(
        f"references cannot be trained for a {task} model here (training one needs its own method, e.g. a "
        "WGAN for a generator): give reference models with --reference"
    )


def trained_references(
    owner: Owner,
    data: Any,
    count: int = DEFAULT_REFERENCES,
    *,
    seed: int = 0,
    max_epochs: int = MAX_EPOCHS,
    cache_dir: Any = "default",
    progress: Callable[[str], None] = lambda _msg: None,
) -> list[Reference]:
    """``count`` references of the owner's architecture trained on ``data`` (a Split), cached."""
    if count < 1:
        return []
    task = owner.task
    y_train, loss = _targets(task, data.y_train)
    y_test, _ = _targets(task, data.y_test)
    quality = _quality(task)
    target = quality(owner.model, data.x_test, y_test)
    margin = 0.005 if task == "classification" else 0.05 * abs(target)
    try:
        fresh_copy(owner.model, seed)  # fails early, before any training, where no copy can be made
    except FreshCopyError as exc:
        raise ReferenceError(f"{exc}: give reference models with --reference instead") from None

    def build() -> list[dict[str, Any]]:
        states = []
        for a in range(count):
            recipe = RECIPES[a % len(RECIPES)]
            progress(f"training reference {a + 1}/{count} ({recipe.describe()}) on {data.name}…")
            rows = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(seed + 7919 * (a + 1)))
            rows = rows[: max(1, int(math.ceil(SUBSET * len(rows))))]
            model = fresh_copy(owner.model, seed + 1000 + a)
            epochs, seen = [0], []

            def reached(m: nn.Module, epochs: list[int] = epochs, seen: list[float] = seen) -> bool:
                """The owner's held-out quality reached, or no gain over the last PATIENCE epochs."""
                epochs[0] += 1
                seen.append(quality(m, data.x_test, y_test))
                stalled = len(seen) > PATIENCE and max(seen[-PATIENCE:]) <= max(seen[:-PATIENCE]) + margin / 2
                return seen[-1] >= target - margin or stalled

            train(
                model,
                data.x_train[rows],
                y_train[rows],
                loss=loss,
                epochs=max_epochs,
                lr=recipe.lr,
                batch_size=recipe.batch_size,
                optimizer=recipe.optimizer,
                seed=seed + 31 * (a + 1),
                stop_when=reached,
            )
            states.append(
                {
                    "state": {k: v.detach().clone() for k, v in network_of(model).state_dict().items()},
                    "recipe": recipe.describe(),
                    "epochs": epochs[0],
                    "quality": quality(model, data.x_test, y_test),
                }
            )
        return states

    key = _hash(
        CACHE_FORMAT,
        model_id(network_of(owner.model)),
        _tensor_digest(data.x_train, data.y_train, data.x_test, data.y_test).hex(),
        count,
        seed,
        max_epochs,
        task,
    )
    states = cached(f"references-{key}", build, default_cache_dir() if cache_dir == "default" else cache_dir)
    references = []
    what = "accuracy" if task == "classification" else "held-out error"
    for a, entry in enumerate(states):
        model = fresh_copy(owner.model, seed + 1000 + a)
        network_of(model).load_state_dict(entry["state"])
        shown = f"{entry['quality']:.1%}" if task == "classification" else f"{-entry['quality']:.4g}"
        references.append(
            Reference(
                f"trained reference {a + 1}",
                model.eval(),
                f"owner's architecture, fresh weights, {SUBSET:.0%} of {data.name}, {entry['recipe']}, "
                f"{entry['epochs']} epochs, {what} {shown}",
            )
        )
    return references


def positive_copies(owner: Owner, data: Any = None, *, seed: int = 0) -> list[Reference]:
    """The owner's model after the tool's own removal attacks (never part of a null)."""
    model = owner.model
    copies = [
        Reference("pruned 50%", attacks.global_prune(model, 0.5).eval(), "global magnitude pruning, 50%"),
        Reference("int8 weights", attacks.quantize_int8(model).eval(), "every weight rounded to int8"),
    ]
    if data is not None and owner.task in ("classification", "regression"):
        y, loss = _targets(owner.task, data.y_train)
        rows = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(seed))[
            : len(data.x_train) // 2
        ]
        tuned = attacks.fine_tune(model, data.x_train[rows], y[rows], epochs=5, lr=0.01, seed=seed, loss=loss)
        copies.append(Reference("fine-tuned", tuned.eval(), "all layers, 5 epochs of SGD at lr 0.01 on half the data"))
    return copies
