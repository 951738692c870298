"""Removal attacks a pirate applies to a stolen model (ActiveGuard §3.5, IPGuard §5.1.2).

Every function returns a new model and leaves its input untouched, so one source model can
spawn a whole zoo of suspects. They sit with the models, below the audits, because an audit's
calibration makes its own copies of the owner's model with them (the evaluations' zoos use them too).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from activeguard.models.architectures import train
from activeguard.models.fresh import clone

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
        clone(model),
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
    pruned = clone(model)
    params = dict(pruned.named_parameters())
    if parameter not in params:
        raise ValueError(f"model has no parameter {parameter!r}; it has {', '.join(params)}")
    _zero_smallest(params[parameter].data, rate)
    return pruned


@torch.no_grad()
def global_prune(model: nn.Module, rate: float) -> nn.Module:
    """Zero the ``rate`` fraction of smallest-|w| weights across all weight matrices and kernels."""
    _check_rate(rate)
    pruned = clone(model)
    weights = [p for p in pruned.parameters() if p.ndim > 1]  # matrices and kernels (an RNN's weight_ih_l0 too)
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
    copy_ = clone(model)
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
    copy_ = clone(model)
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
    pruned = clone(model)
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


# --- function-preserving edits: same outputs, different weights ---------------------------------
# Between ``producer`` and ``consumer`` only channel-wise, positively homogeneous operations may
# stand (ReLU, max-pooling, flatten): no BatchNorm, no residual sum. That holds for LeNet-5's
# conv1 → conv2 and conv2 → fc1; these edits are what breaks a weight watermark read at fixed
# positions without changing a single answer.


def _producer_consumer(model: nn.Module, producer: str, consumer: str) -> tuple[nn.Module, nn.Module, int]:
    """The two layers and how many consumer inputs each producer channel feeds (1 for a conv, the
    flattened spatial size for a linear after flatten)."""
    modules = dict(model.named_modules())
    if producer not in modules or consumer not in modules:
        raise ValueError(f"model has no layers {producer!r} and {consumer!r}")
    prod, cons = modules[producer], modules[consumer]
    channels = prod.weight.shape[0]
    inputs = cons.weight.shape[1]
    if inputs % channels:
        raise ValueError(f"{consumer!r} takes {inputs} inputs, not a multiple of {producer!r}'s {channels} channels")
    return prod, cons, inputs // channels


def _edit_channels(
    model: nn.Module, producer: str, consumer: str, order: torch.Tensor, scale: torch.Tensor
) -> nn.Module:
    """Producer channel i becomes ``scale[i]`` × old channel ``order[i]``; the consumer undoes both."""
    edited = clone(model)
    prod, cons, block = _producer_consumer(edited, producer, consumer)
    with torch.no_grad():
        view = (-1,) + (1,) * (prod.weight.dim() - 1)
        prod.weight.copy_(prod.weight[order] * scale.view(view))
        if prod.bias is not None:
            prod.bias.copy_(prod.bias[order] * scale)
        # consumer inputs: channel c's block of ``block`` columns moves with it and is divided by its scale
        columns = (order.view(-1, 1) * block + torch.arange(block).view(1, -1)).reshape(-1)
        inverse = (1.0 / scale).repeat_interleave(block)
        w = cons.weight[:, columns]
        cons.weight.copy_(w * inverse.view((1, -1) + (1,) * (w.dim() - 2)))
    return edited


def permute_channels(model: nn.Module, producer: str, consumer: str, seed: int = 0) -> nn.Module:
    """Shuffle ``producer``'s output channels (filters) and the consumer's matching inputs."""
    channels = dict(model.named_modules())[producer].weight.shape[0]
    order = torch.randperm(channels, generator=torch.Generator().manual_seed(seed))
    return _edit_channels(model, producer, consumer, order, torch.ones(channels))


def rescale_channels(
    model: nn.Module, producer: str, consumer: str, low: float = 0.5, high: float = 2.0, seed: int = 0
) -> nn.Module:
    """Multiply each ``producer`` channel by a factor in [low, high] (log-uniform) and divide the
    consumer's matching inputs by it (positive factors commute with ReLU and max-pooling)."""
    if not 0 < low <= high:
        raise ValueError(f"scale factors must satisfy 0 < low <= high, got [{low}, {high}]")
    channels = dict(model.named_modules())[producer].weight.shape[0]
    u = torch.rand(channels, generator=torch.Generator().manual_seed(seed))
    scale = torch.exp(math.log(low) + u * (math.log(high) - math.log(low)))
    return _edit_channels(model, producer, consumer, torch.arange(channels), scale)


def quantize_int8(model: nn.Module) -> nn.Module:
    """Every weight tensor stored as int8 and read back: symmetric per-tensor scale max|W| / 127
    (what an int8 export keeps of the weights; biases stay float, as in int8 inference)."""
    quantized = clone(model)
    with torch.no_grad():
        for p in quantized.parameters():
            if p.dim() > 1:
                scale = p.abs().max().clamp_min(1e-12) / 127.0
                p.copy_(torch.round(p / scale).clamp(-127, 127) * scale)
    return quantized


def distill(owner: nn.Module, student: nn.Module, x: torch.Tensor, *, epochs: int = 15, seed: int = 0) -> nn.Module:
    """Train a fresh ``student`` on the owner's soft labels for ``x`` (a model extraction by
    distillation: no weight of the owner's survives, only its behaviour)."""
    from activeguard.models.architectures import predict

    with torch.no_grad():
        soft = torch.softmax(predict(owner, x), dim=1)
    return train(student, x, soft, epochs=epochs, seed=seed, desc="distilling")
