"""The owner's architecture with new random weights, for every model source.

An ownership audit calibrates against models that are independent of the owner's but as close to it
as an honest competitor could come: the same architecture, trained afresh. This module makes the
fresh copy; :mod:`activeguard.audit.references` trains it.

* eager (checkpoint, state dict + model file): a deep copy; every layer with ``reset_parameters``
  is reset to PyTorch's own initialization, other parameters by the rule below;
* TorchScript: a copy through ``torch.jit.save``/``load``, parameters by the rule below; it trains
  like the eager model (BatchNorm statistics included);
* exported program (``.pt2``): a copy of its graph module, parameters by the rule below. Its graph
  was captured in inference mode, so BatchNorm keeps normalizing with its (reset) running statistics
  and dropout stays off while it trains: references of a ``.pt2`` owner with BatchNorm train worse
  than the eager model would. Give such owners ``--reference`` models, or the eager model.

The rule for a parameter the copy cannot reset by its layer's own method (by name and shape):
a weight of two or more dimensions gets Kaiming-uniform (a = √5, PyTorch's default for Linear, Conv
and RNN layers); a bias next to such a weight gets U(±1/√fan_in); a one-dimensional weight
(a normalization's scale) gets ones and its bias zeros; BatchNorm's running statistics restart at
0 and 1. Anything else (a learned positional table, a scalar) is drawn from a normal with the
owner's own mean and spread of that tensor.
"""

from __future__ import annotations

import copy
import io
import math

import torch
from torch import nn

from activeguard.models.inputs import ClientView, network_of


class FreshCopyError(ValueError):
    """The model cannot be copied with fresh weights (the message says why)."""


def fresh_copy(model: nn.Module, seed: int) -> nn.Module:
    """``model``'s architecture with new random weights drawn from ``seed`` (a :class:`ClientView` stays
    behind the same input spec)."""
    network = clone(network_of(model))
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # reset_parameters draws from the global generator
    covered = _reset_layers(network)
    named = dict(network.named_parameters())
    with torch.no_grad():
        for name, p in named.items():
            if name not in covered:
                _initialize(name, p, named, generator)
        for name, b in network.named_buffers():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "running_mean":
                b.zero_()
            elif leaf == "running_var":
                b.fill_(1.0)
            elif leaf == "num_batches_tracked":
                b.zero_()
    if isinstance(model, ClientView):
        return ClientView(network, model.spec, model.batch_limit, model.fixed_mode)
    return network


def clone(model: nn.Module) -> nn.Module:
    """An independent copy of any model source whose parameters can be trained. A TorchScript module
    goes through ``torch.jit.save``/``load``: its deep copy holds parameters that are not leaves, which
    no optimizer takes. A ClientView keeps its input spec around the cloned network."""
    if isinstance(model, ClientView):
        return ClientView(clone(model.network), model.spec, model.batch_limit, model.fixed_mode)
    if isinstance(model, torch.jit.ScriptModule):
        buffer = io.BytesIO()
        torch.jit.save(model, buffer)
        buffer.seek(0)
        copied = torch.jit.load(buffer)
        return copied.train(model.training)
    try:
        return copy.deepcopy(model)
    except Exception as exc:  # a module holding a handle, a lock or a C object
        raise FreshCopyError(f"the model cannot be copied ({type(exc).__name__}: {exc})") from None


def _reset_layers(network: nn.Module) -> set[str]:
    """Reset every eager layer that knows how; the names of the parameters that were reset."""
    if isinstance(network, torch.jit.ScriptModule):
        return set()
    covered: set[str] = set()
    for prefix, module in network.named_modules():
        reset = getattr(module, "reset_parameters", None)
        own = list(module.named_parameters(recurse=False))
        if own and callable(reset):
            reset()
            covered.update(f"{prefix}.{name}" if prefix else name for name, _ in own)
    return covered


def _initialize(name: str, p: torch.Tensor, named: dict[str, torch.Tensor], generator: torch.Generator) -> None:
    leaf = name.rsplit(".", 1)[-1]
    if p.dim() >= 2:
        fan_in = p[0].numel()
        bound = math.sqrt(6.0 / ((1 + 5) * fan_in))  # kaiming_uniform_(a=√5)
        p.uniform_(-bound, bound, generator=generator)
        return
    sibling = named.get(name[: len(name) - len(leaf)] + leaf.replace("bias", "weight")) if "bias" in leaf else None
    if sibling is not None and sibling.dim() >= 2:
        bound = 1.0 / math.sqrt(sibling[0].numel())
        p.uniform_(-bound, bound, generator=generator)
    elif "bias" in leaf:
        p.zero_()
    elif leaf == "weight":
        p.fill_(1.0)
    else:
        mean, std = float(p.mean()), float(p.std()) if p.numel() > 1 else 0.0
        p.normal_(mean, max(std, 1e-3), generator=generator)
