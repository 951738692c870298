"""Removal attacks a pirate applies to a stolen model (ActiveGuard §3.5, IPGuard §5.1.2).

Every function returns a new model and leaves its input untouched, so one source model can
spawn a whole zoo of suspects.  They live in the core because the core evaluation (watermark
robustness) and the audits (suspect zoo) both attack models; neither should import the other.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from activeguard.models import train

MAX_ACCURACY_DROP = 0.03  # IPGuard §5.1.2: stop pruning when accuracy drops by more than 3 points


def fine_tune(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int = 10,
    lr: float = 0.01,
    seed: int = 0,
    loss: str = "cross_entropy",
    progress: bool = False,
) -> nn.Module:
    """Fine-tune all layers (SGD, momentum 0.9) on the attacker's data, without any regularizer."""
    return train(
        copy.deepcopy(model),
        x,
        y,
        loss=loss,
        epochs=epochs,
        lr=lr,
        seed=seed,
        optimizer="sgd",
        progress=progress,
        desc="fine-tuning",
    )


def _zero_smallest(tensor: torch.Tensor, rate: float) -> None:
    k = int(round(rate * tensor.numel()))
    if k == 0:
        return
    threshold = tensor.abs().flatten().kthvalue(k).values
    tensor[tensor.abs() <= threshold] = 0.0


def _check_rate(rate: float) -> None:
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"pruning rate must be in [0, 1), got {rate}")


@torch.no_grad()
def prune_layer(model: nn.Module, parameter: str, rate: float) -> nn.Module:
    """The paper's pruning attack: zero the ``rate`` fraction of smallest-|w| weights of one parameter."""
    _check_rate(rate)
    pruned = copy.deepcopy(model)
    params = dict(pruned.named_parameters())
    if parameter not in params:
        raise ValueError(f"model has no parameter {parameter!r}; it has {', '.join(params)}")
    _zero_smallest(params[parameter].data, rate)
    return pruned


@torch.no_grad()
def global_prune(model: nn.Module, rate: float) -> nn.Module:
    """Zero the ``rate`` fraction of smallest-|w| weights across all weight matrices and kernels."""
    _check_rate(rate)
    pruned = copy.deepcopy(model)
    weights = [p for name, p in pruned.named_parameters() if name.endswith("weight") and p.ndim > 1]
    k = int(round(rate * sum(w.numel() for w in weights)))
    if k == 0:
        return pruned
    threshold = torch.cat([w.abs().flatten() for w in weights]).kthvalue(k).values
    for w in weights:
        w[w.abs() <= threshold] = 0.0
    return pruned


def _last_linear(model: nn.Module) -> tuple[nn.Module, str]:
    last = None
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                last = (parent, name)
    if last is None:
        raise ValueError(f"{type(model).__name__} has no linear layer")
    return last


def _train_subset(model: nn.Module, trainable: list[nn.Parameter], x, y, **kwargs) -> nn.Module:
    keep = {id(p) for p in trainable}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(id(p) in keep)
    try:
        train(model, x, y, **kwargs)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return model.eval()


def fine_tune_last_layer(
    model: nn.Module, x, y, *, epochs: int = 5, lr: float = 0.01, seed: int = 0, loss: str = "cross_entropy"
) -> nn.Module:
    """FTLL: fine-tune only the last layer."""
    copy_ = copy.deepcopy(model)
    parent, name = _last_linear(copy_)
    return _train_subset(
        copy_,
        list(getattr(parent, name).parameters()),
        x,
        y,
        epochs=epochs,
        lr=lr,
        seed=seed,
        loss=loss,
        optimizer="sgd",
    )


def retrain_last_layer(
    model: nn.Module,
    x,
    y,
    *,
    all_layers: bool,
    epochs: int = 5,
    lr: float = 0.01,
    seed: int = 0,
    loss: str = "cross_entropy",
) -> nn.Module:
    """RTLL (``all_layers=False``) / RTAL (``True``): re-initialize the last layer, then retrain."""
    copy_ = copy.deepcopy(model)
    parent, name = _last_linear(copy_)
    old = getattr(parent, name)
    torch.manual_seed(seed)
    setattr(parent, name, nn.Linear(old.in_features, old.out_features))
    trainable = list(copy_.parameters()) if all_layers else list(getattr(parent, name).parameters())
    return _train_subset(copy_, trainable, x, y, epochs=epochs, lr=lr, seed=seed, loss=loss, optimizer="sgd")


@torch.no_grad()
def filter_prune(model: nn.Module, fraction: float) -> nn.Module:
    """Zero the ``fraction`` of each conv layer's filters with the smallest L1 norm (and their biases)."""
    _check_rate(fraction)
    pruned = copy.deepcopy(model)
    for conv in (m for m in pruned.modules() if isinstance(m, nn.Conv2d)):
        n = int(round(fraction * conv.out_channels))
        if n == 0:
            continue
        order = conv.weight.abs().flatten(1).sum(1).argsort()[:n]
        conv.weight[order] = 0.0
        if conv.bias is not None:
            conv.bias[order] = 0.0
    return pruned


def prune_sweep(
    model: nn.Module,
    quality: Callable[[nn.Module], float],
    prune: Callable[[nn.Module, float], nn.Module],
    rates: list[float],
    max_drop: float = MAX_ACCURACY_DROP,
) -> list[tuple[float, nn.Module, float]]:
    """Prune at increasing rates; stop (excluding it) at the first whose quality drops by > ``max_drop``."""
    base = quality(model)
    kept = []
    for rate in rates:
        pruned = prune(model, rate)
        q = quality(pruned)
        if base - q > max_drop:
            break
        kept.append((rate, pruned, q))
    return kept
