"""Align a suspect's conv layer to the owner's before reading a weight watermark (DESIGN §4.3).

Permuting a layer's filters (and the next layer's inputs to match) or rescaling each filter by a
positive factor (and dividing the next layer's inputs by it) changes no output, yet moves or scales
the weights a watermark sits on (issue 15: 1/13 and 0/13 digits at fixed positions). The owner
verifies with the original model at hand, so the suspect's channels can be matched to the owner's
by what they compute:

1. run the same probe inputs (uniform noise over the input range: no data needed) through both
   models and record the layer's input and output feature maps;
2. match channels by cosine similarity of their activations over every probe and position (the
   Hungarian assignment, SciPy): a positive rescaling leaves the cosine at 1, a permutation only
   reorders the rows; fine-tuning and pruning move it a little;
3. estimate each matched channel's positive scale by least squares (suspect ≈ s · owner);
4. read the suspect's weights in the owner's frame:
   W[i, c] = W_s[out[i], in[c]] · t_c / s_i, where suspect output channel out[i] ≈ s_i × owner
   channel i and suspect input channel in[c] ≈ t_c × owner input channel c.

The match is made on activations, never on the watermark's digits, so an unrelated model's aligned
digits still match only by chance (the chance probability stays valid). Ours, not the paper's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from activeguard.inputs import network_of


@dataclass(frozen=True)
class ChannelMatch:
    """Owner channel i ↔ suspect channel ``order[i]``, which computes ≈ ``scale[i]`` × owner channel i."""

    order: torch.Tensor  # (C,) int64
    scale: torch.Tensor  # (C,) positive
    similarity: torch.Tensor  # (C,) cosine of the matched pairs, in [-1, 1]

    @property
    def is_identity(self) -> bool:
        return bool(torch.equal(self.order, torch.arange(len(self.order))))


@dataclass(frozen=True)
class LayerAlignment:
    outputs: ChannelMatch
    inputs: ChannelMatch


def match_channels(owner: torch.Tensor, suspect: torch.Tensor) -> ChannelMatch:
    """Match channels of two (N, C, ...) activation tensors of one layer (same C)."""
    if owner.shape[1] != suspect.shape[1]:
        raise ValueError(f"the layers have {owner.shape[1]} and {suspect.shape[1]} channels")
    a = owner.transpose(0, 1).reshape(owner.shape[1], -1).double()
    b = suspect.transpose(0, 1).reshape(suspect.shape[1], -1).double()
    cosine = (a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)) @ (b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)).T
    rows, cols = linear_sum_assignment(-cosine.numpy())
    order = torch.as_tensor(cols[np.argsort(rows)], dtype=torch.int64)
    matched = b[order]
    scale = (matched * a).sum(1) / (a * a).sum(1).clamp_min(1e-12)
    return ChannelMatch(order, scale.clamp_min(1e-12).float(), cosine[torch.arange(len(order)), order].float())


def _module_of(model: nn.Module, layer: str) -> nn.Module:
    """The module owning parameter ``layer`` (e.g. 'conv2.weight' → conv2) of the owner's network."""
    network = network_of(model)
    name = layer.rsplit(".", 1)[0] if "." in layer else ""
    modules = dict(network.named_modules())
    if name not in modules:
        raise ValueError(f"model has no module {name!r} for parameter {layer!r}")
    return modules[name]


@torch.no_grad()
def _feature_maps(model: nn.Module, layer: str, probes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, output) of the module that owns ``layer`` for ``probes``."""
    seen: dict[str, torch.Tensor] = {}

    def hook(_module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        seen["in"], seen["out"] = args[0].detach(), output.detach()

    handle = _module_of(model, layer).register_forward_hook(hook)
    try:
        model.eval()
        model(probes)
    finally:
        handle.remove()
    if "in" not in seen:
        raise ValueError(f"the forward pass never reached the module of {layer!r}")
    return seen["in"], seen["out"]


def align_layer(owner: nn.Module, suspect: nn.Module, layer: str, probes: torch.Tensor) -> LayerAlignment:
    """Match the suspect's input and output channels of ``layer`` to the owner's on ``probes``."""
    owner_in, owner_out = _feature_maps(owner, layer, probes)
    suspect_in, suspect_out = _feature_maps(suspect, layer, probes)
    return LayerAlignment(outputs=match_channels(owner_out, suspect_out), inputs=match_channels(owner_in, suspect_in))


def aligned_weight(weight: torch.Tensor, alignment: LayerAlignment) -> torch.Tensor:
    """The suspect's (out, in, kh, kw) weight read in the owner's frame (module docstring, step 4)."""
    out, inp = alignment.outputs, alignment.inputs
    if weight.shape[0] != len(out.order) or weight.shape[1] != len(inp.order):
        raise ValueError(f"weight {tuple(weight.shape)} does not fit the alignment")
    w = weight.detach()[out.order][:, inp.order]
    view_out = (-1,) + (1,) * (w.dim() - 1)
    view_in = (1, -1) + (1,) * (w.dim() - 2)
    return w * inp.scale.view(view_in).to(w.dtype) / out.scale.view(view_out).to(w.dtype)
