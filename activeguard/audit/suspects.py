"""Post-processing attacks a pirate applies to a stolen model (ActiveGuard §3.5, IPGuard §5.1.2).

Every function returns a new model and leaves its input untouched, so one source model can
spawn a whole zoo of suspects.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from activeguard.models import train


def fine_tune(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 10, lr: float = 0.01, seed: int = 0,
    loss: str = "cross_entropy", progress: bool = False,
) -> nn.Module:
    """Fine-tune all layers (SGD, momentum 0.9) on the attacker's data, without any regularizer."""
    return train(copy.deepcopy(model), x, y, loss=loss, epochs=epochs, lr=lr, seed=seed, optimizer="sgd",
                 progress=progress, desc="fine-tuning")


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
