"""Align a suspect's layer to the owner's before reading a weight watermark (DESIGN §4.3).

Any layer whose weight has two or more dimensions: a convolution's channels are dimension 1 of its
feature maps, a Linear layer's are the last dimension (its input may be a batch of rows or of
sequences).

Permuting a layer's filters (and the next layer's inputs to match) or rescaling each filter by a
positive factor (and dividing the next layer's inputs by it) changes no output, yet moves or scales
the weights a watermark sits on (issue 15: 1/13 and 0/13 digits at fixed positions). The owner
verifies with the original model at hand, so the suspect's channels can be matched to the owner's
by what they compute:

1. run the same probe inputs (uniform noise over the input range: no data needed) through both
   models and record the layer's input and output feature maps;
2. match the layer's input channels by cosine similarity of their activations over every probe and
   position (the Hungarian assignment, SciPy): a positive rescaling leaves the cosine at 1, a
   permutation only reorders the rows; then its output channels (filters) by the same activation
   cosine plus the cosine of the filters' weights with the owner's (inputs already matched), which
   keeps the match right where pruning or fine-tuning blur the activations;
3. estimate the scales from the weights, not the activations: in the owner's frame each (filter i,
   input channel c) block of the suspect's weight is ≈ (s_i / t_c) × the owner's block, so a
   rank-one fit of the log block ratios (least squares over every block) gives s_i / t_c to ~1%
   even after fine-tuning, where activation-based scales were off by enough to flip digits
   (measured: 6/13 digits after 15 fine-tuning epochs, 13/13 with weight-based scales);
4. read the suspect's weights in the owner's frame: W[i, c] = W_s[out[i], in[c]] · t_c / s_i.

The match is made on activations, never on the watermark's digits, so an unrelated model's aligned
digits still match only by chance (the chance probability stays valid). Ours, not the paper's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from activeguard.models.inputs import network_of


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
    reference_weight: torch.Tensor  # the owner's (out, in, ...) weight, for the scale fit


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(C, C') cosine similarity between the rows of two (C, M) / (C', M) matrices."""
    a, b = a.double(), b.double()
    return (a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)) @ (b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)).T


def channel_rows(activations: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A layer's activations as (channels, everything else): channel dimension 1 for a convolution's
    feature maps, the last one for a Linear layer's."""
    moved = activations.movedim(-1 if channels_last else 1, 0)
    return moved.reshape(moved.shape[0], -1)


def match_channels(owner: torch.Tensor, suspect: torch.Tensor, extra: torch.Tensor | None = None) -> ChannelMatch:
    """Match the channels of two (C, M) activation matrices of one layer (same C, one row per channel:
    :func:`channel_rows`); ``extra`` (C, C) is added to the activation cosines before the assignment
    (e.g. the filters' weight cosines)."""
    if owner.shape[0] != suspect.shape[0]:
        raise ValueError(f"the layers have {owner.shape[0]} and {suspect.shape[0]} channels")
    a, b = owner.double(), suspect.double()
    cosine = _cosines(a, b)
    rows, cols = linear_sum_assignment(-(cosine if extra is None else cosine + extra.double()).numpy())
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
    reference = _weight(owner, layer)
    last = reference.dim() == 2  # a Linear layer: channels are the last dimension of its activations
    owner_in, owner_out = (channel_rows(t, last) for t in _feature_maps(owner, layer, probes))
    suspect_in, suspect_out = (channel_rows(t, last) for t in _feature_maps(suspect, layer, probes))
    inputs = match_channels(owner_in, suspect_in)
    with torch.no_grad():
        # the suspect's filters with their inputs in the owner's order and scale, against the owner's
        filters = _weight(suspect, layer)[:, inputs.order] / inputs.scale.view((1, -1) + (1,) * (reference.dim() - 2))
        weight_cosine = _cosines(reference.flatten(1), filters.flatten(1))
    outputs = match_channels(owner_out, suspect_out, extra=weight_cosine)
    return LayerAlignment(outputs=outputs, inputs=inputs, reference_weight=reference)


def _weight(model: nn.Module, layer: str) -> torch.Tensor:
    return dict(network_of(model).named_parameters())[layer].detach()


def block_scales(suspect: torch.Tensor, owner: torch.Tensor, iterations: int = 50) -> torch.Tensor:
    """(out, in) factors r[i, c] = exp(u_i − v_c) fitted to the log ratios of the suspect's and the owner's
    (i, c) weight blocks (both in the owner's channel order), over the weights the suspect still has
    (pruning zeroes weights, it does not rescale them); blocks whose ratio is not clearly positive do
    not vote, and a filter or input with no vote keeps factor 1."""
    s = suspect.double().reshape(suspect.shape[0], suspect.shape[1], -1)
    o = owner.double().reshape(owner.shape[0], owner.shape[1], -1) * (s != 0)  # a pruned weight says nothing
    energy = (o * o).sum(2)
    ratio = (s * o).sum(2) / energy.clamp_min(1e-30)
    votes = (ratio > 1e-3) & (energy > 1e-6 * energy.max())
    log_r = torch.where(votes, ratio.clamp_min(1e-30).log(), torch.zeros_like(ratio))
    weight = votes.double() * energy  # larger blocks measure the ratio better
    u = torch.zeros(o.shape[0], dtype=torch.float64)
    v = torch.zeros(o.shape[1], dtype=torch.float64)
    for _ in range(iterations):  # alternating least squares on log r ≈ u_i − v_c
        u = ((log_r + v[None, :]) * weight).sum(1) / weight.sum(1).clamp_min(1e-30)
        v = ((u[:, None] - log_r) * weight).sum(0) / weight.sum(0).clamp_min(1e-30)
    return torch.exp(u[:, None] - v[None, :]).float()


def aligned_weight(weight: torch.Tensor, alignment: LayerAlignment) -> torch.Tensor:
    """The suspect's (out, in, ...) weight read in the owner's frame (module docstring, step 4)."""
    out, inp = alignment.outputs, alignment.inputs
    if weight.shape[0] != len(out.order) or weight.shape[1] != len(inp.order):
        raise ValueError(f"weight {tuple(weight.shape)} does not fit the alignment")
    w = weight.detach()[out.order][:, inp.order]
    scale = block_scales(w, alignment.reference_weight)
    return w / scale.view(scale.shape + (1,) * (w.dim() - 2)).to(w.dtype)
