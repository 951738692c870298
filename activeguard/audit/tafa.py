"""TAFA-style task-agnostic fingerprinting of ReLU networks — a RECONSTRUCTION.

The published TAFA algorithm (Pan et al., ESORICS 2021) is not available to us: only its abstract,
appendix and references survive.  This module is a reconstruction from its stated principles
(``DESIGN.md`` §4.4), not the published algorithm:

* ReLU networks are piecewise linear.  A fingerprint point is an input on the boundary of a linear
  region.  Points are found **without training data**, from random starts in the input range:
  by linear programming over the region's constraints (SciPy HiGHS, ``scipy.optimize.linprog``)
  where the owner's network is a small fully-connected ReLU stack that clients reach as is
  (:func:`lp_boundary_points`: one chosen hidden neuron's pre-activation is 0 while the rest of the
  activation pattern of the start is kept), and elsewhere - convolutions, BatchNorm, residual
  blocks, max-pooling, TorchScript and exported programs, whose layers cannot be read - by
  bisection on the input gradient along random segments of the input box
  (:func:`gradient_boundary_points`: the gradient is constant inside a linear region and jumps
  across its boundary, the line search of the reverse-engineering work TAFA cites).
* Verification is black-box and task-agnostic (classifiers: softmax scores; regressors: the
  prediction; generators: the image): the suspect's outputs at the points and at ±δ along a probe
  direction across the boundary are compared with the owner's, by one of two statistics:

  - ``"distance"``: output distance normalized by the owner's output scale,
    score = mean_i exp(−‖f_s(x_i) − f_o(x_i)‖ / (ρ·scale));
  - ``"bending"``: the second difference b(x) = f(x+δd) − 2f(x) + f(x−δd) (non-zero only where the
    network bends), score = mean_i max(0, 1 − ‖b_s(x_i) − b_o(x_i)‖ / ‖b_o(x_i)‖).

  - ``"kink"`` (the default, ours): does the suspect bend *where and how* the owner bends?  See
    :func:`kink_evidence`.  Unlike the two above it is calibrated: the score is a chance
    probability on a log scale, measured against the suspect's own bends elsewhere on the same
    lines, so one threshold means the same on every task.

  All scores lie in [0, 1] (1 = behaves exactly like the owner), so IPGuard's ARUC applies.

Why the kink statistic (ours; the evidence is in ``activeguard evaluate audit`` and docs/results.md).
On the quick MNIST, diabetes and Fashion-MNIST zoos we measured, per point, output distance,
bending, the shape of the bend profile along the probe line, the share of bending at the point,
slope agreement, the jump vector's direction and size, and a kink's presence.  What separates
copies from independent networks is not what the output *is* (independent networks fitted to the
same data answer alike: the distance statistic accused an independently trained twin of a
regressor) but where the network's linear regions end: a neuron's boundary moves little under
fine-tuning, pruning or quantization and has no reason to be at the same place in a network
trained from other weights.  A point *matches* when the suspect's second difference around it
points the same way in output space as the owner's (cosine ≥ :data:`KINK_COSINE`) and its size
relative to the suspect's own slope is within a factor of two of the owner's (the ratio makes
it blind to a rescaled output, which retraining the last layer produces).  Independent networks
match some points by chance, at a rate that differs by task and architecture, so the same test is
run on windows of the same line ±4 and ±8 steps away, where the owner has no reason to bend: that
rate is the null.  The score is −log10 of the binomial probability of at least the observed
number of matching points under the null, divided by :data:`KINK_LOG10_SCALE` and capped at 1:
a score s means chance ≤ 10^(−10·s).  Classifiers answer probabilities; their centred log
(log p − mean log p = logits − mean logits) is compared, which is exactly piecewise linear.

A point (or null window) also matches by a second test, the *boundary normal* (ours): across one
neuron's boundary the network's Jacobian jumps by a rank-one matrix, (output change) × (boundary
normal)ᵀ, and the normal does not depend on any layer after that neuron.  A generator whose output
layer was re-initialized and retrained keeps the owner's hidden boundaries (RTLL) or moves them
slightly (RTAL: hidden weights 3% off), but its bends point elsewhere in output space, so the bend
test found it at 0 of 300 points (generation ARUC 0.778).  The normal test measures the Jacobian
on both sides of each window by finite differences along 16 random input directions and matches
when the jump's principal input-side direction is within |cosine| 0.8 of the owner's normal
(:func:`_normal_matches`).  With both tests every copy of the LeNet-5, regressor and generator scored 1.00 and no
independent network above 0.26 (measured alone, the normal test kept independent regressors at
≤ 0.08 and generators at ≤ 0.07).  Its price: 170 queries per point instead of 21.

A third test, the *slope test* (ours, :func:`slope_evidence`), is for deep networks.  Along a line
the 15-layer Fashion-MNIST ResNet bends about every 0.1% of the input range; fine-tuning every
layer moves those bends out of reach of both tests above (the copy scored 0.00, ResNet ARUC
0.602).  What such a copy keeps is its coarse local response: its secant slopes along 16 fixed
random directions (half-width 0.3 × the box's width) at each point point the owner's way (cosine
≥ 0.3 at 149 of 300 points) while an independent network's do not (≤ 4 points), measured against the
owner's slopes at *other* points as the null.  It is a second binomial test; the score's chance
probability is twice the smaller of the two.  It applies only where the owner's slopes are
*shattered*, i.e. its slopes at two different points share almost nothing (median cosine ≤ 0.2;
the ResNet 0.04), which generation measures on the owner alone: where they share a template
(MNIST LeNet-5 0.49, the regressor 0.76, the generator 0.80), independently trained networks
share it and part of its point-specific detail too (7 independent LeNet-5s and 8 of 9 independent
regressors were accused with the test on).  With it the ResNet's ARUC is 0.983, every copy 1.00,
no independent network above 0.11.  Its price: 32 more queries per point.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from activeguard.audit import decisions
from activeguard.audit.base import (
    MODEL_ERRORS,
    AuditMethod,
    Owner,
    Params,
    Score,
    Suspect,
    check_field_types,
    error_reason,
    param,
)
from activeguard.models.inputs import ClientView, network_of

STATISTICS = ("kink", "distance", "bending")
# `evaluate audit`, ARUC per scenario (MNIST LeNet-5 / RAND HIE FCN / WGAN generator): see docs/results.md's
# TAFA table; the kink statistic leads on every scenario and is the only one calibrated
DEFAULT_STATISTIC = "kink"
# grid spacing along each point's probe line, as a fraction of the input box's width (quick
# evaluation, ARUC at 0.17% / 0.5% / 1% / 1.7% of the width: regression 0.84 / 0.80 / 0.89 / 0.80,
# generation 0.56 at 0.17%, 0.75 at 0.5%, 0.80 at 1% and 1.7%; classification was measured at 1%)
KINK_STEP_FRACTION = 0.01
KINK_HALF = 10  # the grid runs from −KINK_HALF to +KINK_HALF steps
KINK_NULL_OFFSETS = (-8, -4, 4, 8)  # centres of the null windows, in steps (disjoint from the point's window)
KINK_COSINE = 0.8  # least cosine between the suspect's and the owner's bend vectors at a matching point
KINK_RATIO = (0.5, 2.0)  # the suspect's relative bend size over the owner's, at a matching point
KINK_LOG10_SCALE = 10.0  # a score of 1 = chance probability ≤ 1e-10
# the boundary-normal test (ours; see kink_evidence).  Generation scenario, 300 points: a copy whose
# output layer was re-initialized and every layer retrained (RTAL, hidden weights moved 3%) matches
# at 65 points against a null rate of 3% (the bend test: 0 points); independent generators at most 1.
NORMAL_PROBES = 16  # random input directions along which the Jacobian is measured
# the window's two sides sit this far (× the box width) before and after its centre: wide enough to
# take in a boundary the copy's retraining moved (RTAL matches 37 / 65 / 83 points at 0.001 / 0.003 /
# 0.01), narrow enough that one boundary dominates (the owner matches itself at 241 / 193 / 122)
NORMAL_SIDE_FRACTION = 0.003
NORMAL_DIFF_FRACTION = 1e-4  # finite-difference step (× the box width) inside each side's linear region
NORMAL_COSINE = 0.8  # least |cosine| between the suspect's jump normal and the owner's, seen through the probes
NORMAL_CHUNK = 64  # points per batch of queries (17 × 10 × 64 = 10,880 inputs)
# the slope test (ours; see slope_evidence).  Fashion-MNIST ResNet, 300 points, secant half-width
# 0.05 / 0.3 of the box width: the copy fine-tuned on every layer matches at 124 / 149 points, the
# one retrained on every layer at 198 / 229, against a null of ~1%; independent networks at ≤ 4
# points.  At least cosine 0.2 instead of 0.3, the independent ResNets' largest score rose from
# 0.16 to 0.37 (copies unchanged at 1.00).
# Only where the owner's slopes are *shattered*: the median cosine between its slopes at two different
# points is at most SLOPE_MAX_SHARING (300 points: Fashion-MNIST ResNet 0.04; MNIST LeNet-5 0.49,
# RAND HIE regressor 0.76, WGAN generator 0.80).  Where an owner's slopes share a template,
# independently trained networks share it and some of its point-specific part too: with the test
# on, LeNet-5s of other seeds and splits matched at 295-300 of 300 points (7 false accusations on
# the MNIST zoo) and 8 of 9 independent regressors scored ≥ 0.5; the ResNet's independent networks
# matched at ≤ 4 points.  The generator and LeNet-5 need no slope test (ARUC 0.99 and 0.97 without).
SLOPE_MAX_SHARING = 0.2
SLOPE_SCALE_FRACTION = 0.3  # secant half-width along each probe, × the box width
SLOPE_COSINE = 0.3  # least cosine between the suspect's probe slopes at a point and the owner's
SLOPE_OUTPUTS = 32  # wider outputs (a generator's image) are seen through this many fixed random directions
SLOPE_CHUNK = 256  # points per batch of queries (2 × 16 × 256 = 8,192 inputs)
RHO = 0.5  # distance statistic: a normalized distance of ρ lowers a point's score to 1/e
DECISION_THRESHOLD = decisions.TAFA_THRESHOLD  # see decisions.py


@dataclass
class TafaFingerprint:
    points: torch.Tensor  # (n, *input_shape) on region boundaries
    directions: torch.Tensor  # (n, *input_shape) unit probe directions across the boundary
    delta: float
    outputs: torch.Tensor  # owner's outputs at points, (n, m)
    bends: torch.Tensor  # owner's second differences, (n, m)
    scale: float  # owner's output scale at the points
    solver: str
    seconds: float = 0.0
    output: str = "raw"  # what was compared: "softmax" scores (classifiers) or the "raw" outputs
    step: float = 0.0  # kink statistic: grid spacing along each probe line (0: a file from before it)
    kinks: torch.Tensor | None = None  # owner's bend vector at each point, (n, m)
    kink_sizes: torch.Tensor | None = None  # owner's bend size relative to its slope at each point, (n,)
    slopes: torch.Tensor | None = None  # slope test: owner's secant slopes along the probes, (n, probes, outputs seen)
    slope_scale: float = 0.0  # slope test: the secant's half-width (0: not used, see SLOPE_MAX_SHARING)
    slope_sharing: float = float("nan")  # median cosine of the owner's slopes at two different points

    def __post_init__(self) -> None:
        check_field_types(self)
        for name in ("points", "directions", "outputs", "bends", "kinks", "kink_sizes", "slopes"):
            value = getattr(self, name)
            if value is not None and not value.is_floating_point():
                raise ValueError(f"the fingerprint's {name} are {value.dtype}, not floating point")
        if len(self.points) == 0:
            raise ValueError("the fingerprint is empty: it holds no points")
        self._check_shapes()

    def _check_shapes(self) -> None:
        """Every per-point field must agree with the points, so a damaged or edited file is refused
        here, naming the field, rather than later as if the suspect's outputs were wrong."""
        n = len(self.points)
        if self.outputs.ndim != 2 or len(self.outputs) != n:
            raise ValueError(
                f"the fingerprint's outputs have shape {tuple(self.outputs.shape)}, not ({n}, outputs) "
                "(a damaged or edited file?)"
            )
        m = self.outputs.shape[1]
        expected = {
            "directions": tuple(self.points.shape),
            "bends": (n, m),
            "kinks": (n, m),
            "kink_sizes": (n,),
            "slopes": (n, NORMAL_PROBES, min(m, SLOPE_OUTPUTS)),
        }
        for name, shape in expected.items():
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(
                    f"the fingerprint's {name} have shape {tuple(value.shape)}, not {shape} as its "
                    f"{n} points require (a damaged or edited file?)"
                )


def _flat_out(out: Any) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(out.detach() if isinstance(out, torch.Tensor) else out), dtype=torch.float32)
    return t.reshape(len(t), -1)


def relu_mlp_layers(model: nn.Module) -> list[nn.Linear] | None:
    """The Linear layers of a Linear-ReLU-…-Linear stack (MLPClassifier/Regressor, FCGenerator), else None."""
    seq = getattr(model, "net", model)
    if isinstance(seq, nn.Sequential) and seq and isinstance(seq[0], nn.Flatten):
        seq = seq[1:]  # a flattening front is no layer: an MLP on (C, H, W) rows
    if not isinstance(seq, nn.Sequential):
        return None
    mods = list(seq)
    if not mods or len(mods) % 2 == 0:
        return None
    for a, m in enumerate(mods):
        if (a % 2 == 0 and not isinstance(m, nn.Linear)) or (a % 2 == 1 and not isinstance(m, nn.ReLU)):
            return None
    return [m for m in mods if isinstance(m, nn.Linear)]


def _affine_maps(layers: list[nn.Linear], x0: torch.Tensor):
    """Pre-activations of each hidden layer as affine maps A x + c valid in x0's linear region."""
    a = torch.eye(x0.numel(), dtype=torch.float64)
    c = torch.zeros(x0.numel(), dtype=torch.float64)
    h = x0.double().flatten()
    maps = []
    for layer in layers[:-1]:
        w, b = layer.weight.double().detach(), layer.bias.double().detach()
        a, c = w @ a, w @ c + b
        pre = w @ h + b
        maps.append((a, c, pre))
        mask = (pre > 0).double()
        a, c, h = a * mask[:, None], c * mask, torch.relu(pre)
    return maps


def lp_boundary_point(
    layers: list[nn.Linear],
    x0: torch.Tensor,
    layer: int,
    neuron: int,
    bounds: tuple[float, float],
    margin: float = 1e-6,
) -> torch.Tensor | None:
    """Closest point (L1) to x0 in x0's linear region where hidden neuron ``neuron`` of ``layer`` is 0.

    Solved with HiGHS: variables (x, t), minimize Σt with t ≥ |x − x0|, subject to keeping the
    activation signs of every hidden neuron up to ``layer`` (except the target) and the target's
    pre-activation = 0.  Returns None when the LP is infeasible.
    """
    from scipy.optimize import linprog

    d = x0.numel()
    maps = _affine_maps(layers, x0)[: layer + 1]
    rows, rhs = [], []
    for li, (a, c, pre) in enumerate(maps):
        sign = torch.where(pre > 0, -1.0, 1.0).double()  # active: -(a x + c) <= -margin ; inactive: a x + c <= -margin
        keep = torch.ones(len(pre), dtype=torch.bool)
        if li == layer:
            keep[neuron] = False
        rows.append((sign[:, None] * a)[keep].numpy())
        rhs.append((-(sign * c) - margin)[keep].numpy())
    a_rows = np.concatenate(rows)
    a_ub = np.hstack([a_rows, np.zeros((len(a_rows), d))])
    eye = np.eye(d)
    x0n = x0.double().flatten().numpy()
    a_ub = np.vstack([a_ub, np.hstack([eye, -eye]), np.hstack([-eye, -eye])])
    b_ub = np.concatenate([np.concatenate(rhs), x0n, -x0n])
    a_t, c_t, _ = maps[layer]
    a_eq = np.hstack([a_t[neuron].numpy(), np.zeros(d)])[None, :]
    b_eq = np.array([-c_t[neuron].item()])
    cost = np.concatenate([np.zeros(d), np.ones(d)])
    res = linprog(
        cost, A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=b_eq, bounds=[bounds] * d + [(0, None)] * d, method="highs"
    )
    if res.status != 0:
        return None
    return torch.as_tensor(res.x[:d], dtype=torch.float32).reshape(x0.shape)


def lp_boundary_points(
    model: nn.Module,
    n: int,
    input_shape: tuple[int, ...],
    *,
    bounds=(-3.0, 3.0),
    init: str = "normal",
    seed: int = 0,
    max_tries: int | None = None,
):
    """n boundary points of a small ReLU MLP by LP from random starts (no training data)."""
    layers = relu_mlp_layers(network_of(model))
    if layers is None:
        raise ValueError(f"{type(model).__name__} is not a fully-connected ReLU stack; use the gradient path")
    gen = torch.Generator().manual_seed(seed)
    points, neurons = [], []
    tries = 0
    while len(points) < n and tries < (max_tries or 5 * n):
        tries += 1
        x0 = _random_inputs(1, input_shape, init, bounds, gen)[0]
        li = int(torch.randint(len(layers) - 1, (1,), generator=gen))
        maps = _affine_maps(layers, x0)
        # the neuron of that layer whose boundary is closest (in pre-activation / gradient norm)
        a, _, pre = maps[li]
        dist = pre.abs() / a.norm(dim=1).clamp_min(1e-12)
        neuron = int(dist.argmin())
        x = lp_boundary_point(layers, x0, li, neuron, bounds)
        if x is not None:
            points.append(x)
            neurons.append((li, neuron, a[neuron].float()))
    if not points:
        raise RuntimeError("no LP was feasible")
    dirs = torch.stack([g / g.norm() for _, _, g in neurons]).reshape(len(points), *input_shape)
    return torch.stack(points), dirs


def _random_inputs(n, shape, init, bounds, gen):
    if init == "uniform":
        lo, hi = bounds
        return lo + (hi - lo) * torch.rand((n, *shape), generator=gen)
    return torch.randn((n, *shape), generator=gen).clamp(*bounds)


def _input_gradients(model: nn.Module, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Gradient of a fixed random projection of the outputs, w·f(x), per row (constant in a linear region)."""
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad((model(xg).reshape(len(x), -1) * weights).sum(), xg)
    return g.flatten(1)


def _differ(a: torch.Tensor, b: torch.Tensor, tol: float) -> torch.Tensor:
    """Rows whose gradients differ by more than float noise: the two inputs lie in different regions."""
    scale = torch.maximum(a.norm(dim=1), b.norm(dim=1)).clamp_min(1e-12)
    return (a - b).norm(dim=1) > tol * scale


def gradient_boundary_points(
    model: nn.Module,
    n: int,
    input_shape: tuple[int, ...],
    *,
    bounds=(0.0, 1.0),
    init: str = "uniform",
    seed: int = 0,
    steps: int = 24,
    tol: float = 1e-4,
    redraws: int = 3,
):
    """Region-boundary points of any piecewise-linear model by bisection on its input gradient (batched).

    Each point starts from a segment a → b between two random inputs in the box (so it stays in the
    box).  Along it the model is piecewise linear, so the gradient g of a random projection of its
    outputs is constant inside a linear region and jumps across a region boundary.  Bisection keeps
    the ends of [lo, hi] in different regions; after ``steps`` halvings the point lies within
    |b − a|·2^−steps of a boundary.  Its probe direction is the jump g(hi) − g(lo), the boundary's
    normal when one neuron flips there (the LP path's neuron gradient).  Only forward passes and
    input gradients are used, so it works on TorchScript and exported programs as on eager modules.
    Segments along which the gradient never changes are redrawn ``redraws`` times, then dropped.
    """
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        a = _random_inputs(n, input_shape, init, bounds, gen)
        b = _random_inputs(n, input_shape, init, bounds, gen)
        with torch.no_grad():
            width = int(model(a[:1]).reshape(1, -1).shape[1])
        weights = torch.randn(width, generator=gen)
        g_lo = _input_gradients(model, a, weights)
        g_hi = _input_gradients(model, b, weights)
        for _ in range(redraws):
            flat = ~_differ(g_lo, g_hi, tol)
            if not flat.any():
                break
            b[flat] = _random_inputs(int(flat.sum()), input_shape, init, bounds, gen)
            g_hi[flat] = _input_gradients(model, b[flat], weights)
        bends = _differ(g_lo, g_hi, tol)
        if not bends.any():
            raise ValueError(
                "the model's output does not bend anywhere along random segments of its input range: "
                "TAFA fingerprints piecewise-linear (ReLU) networks"
            )
        a, b, g_lo, g_hi = a[bends], b[bends], g_lo[bends], g_hi[bends]
        m = len(a)
        lo, hi = torch.zeros(m), torch.ones(m)
        expand = (m, *([1] * len(input_shape)))
        for _ in range(steps):
            mid = (lo + hi) / 2
            g_mid = _input_gradients(model, a + mid.reshape(expand) * (b - a), weights)
            left = ~_differ(g_mid, g_lo, tol)  # mid is still in lo's region: the boundary lies right of it
            lo, hi = torch.where(left, mid, lo), torch.where(left, hi, mid)
            g_lo = torch.where(left[:, None], g_mid, g_lo)
            g_hi = torch.where(left[:, None], g_hi, g_mid)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    points = a + ((lo + hi) / 2).reshape(expand) * (b - a)
    jump = g_hi - g_lo
    lost = jump.norm(dim=1, keepdim=True) == 0  # a jump lost to rounding: cross along the segment instead
    jump = torch.where(lost, (b - a).flatten(1), jump)
    dirs = jump / jump.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return points.detach(), dirs.reshape(m, *input_shape).detach()


def lp_applies(model: nn.Module) -> bool:
    """Whether the LP path can read the model: a Linear-ReLU stack that clients reach unchanged."""
    plain = not isinstance(model, ClientView) or model.is_plain
    return plain and relu_mlp_layers(network_of(model)) is not None


def _second_difference(f: Callable, x: torch.Tensor, d: torch.Tensor, delta: float):
    with torch.no_grad():
        out = _flat_out(f(torch.cat([x, x + delta * d, x - delta * d])))
    n = len(x)
    mid, plus, minus = out[:n], out[n : 2 * n], out[2 * n :]
    return mid, plus - 2 * mid + minus


def _compared(out: torch.Tensor, output: str) -> torch.Tensor:
    """What the kink statistic compares: classifiers' probabilities as centred logs (piecewise linear)."""
    if output != "softmax":
        return out
    logs = torch.log(out.clamp_min(1e-30))
    return logs - logs.mean(1, keepdim=True)


def _line_outputs(f: Callable, fp_points: torch.Tensor, dirs: torch.Tensor, step: float, output: str):
    """Outputs on the grid x + t·d, t = −KINK_HALF..KINK_HALF steps, for every point: (n, 2·KINK_HALF+1, m)."""
    n, width = len(fp_points), 2 * KINK_HALF + 1
    t = torch.arange(-KINK_HALF, KINK_HALF + 1, dtype=torch.float32) * step
    grid = fp_points[:, None] + t.reshape(1, width, *([1] * (fp_points.dim() - 1))) * dirs[:, None]
    with torch.no_grad():
        out = _flat_out(f(grid.reshape(n * width, *fp_points.shape[1:])))
    return _compared(out, output).double().reshape(n, width, -1)


def _bends_at(line: torch.Tensor, centres: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Bend vectors (second differences summed over the 3 cells around each centre: a kink up to 2 steps
    away counts) and their size relative to the local slope, at grid indices ``centres``."""
    second = line[:, 2:] - 2 * line[:, 1:-1] + line[:, :-2]  # cell j bends around grid point j + 1
    first = (line[:, 1:] - line[:, :-1]).norm(dim=2)
    bends = torch.stack([second[:, c - 2 : c + 1].sum(1) for c in centres], 1)
    slopes = torch.stack([first[:, max(0, c - 3) : c + 3].mean(1) for c in centres], 1).clamp_min(1e-30)
    return bends, bends.norm(dim=2) / slopes


@dataclass
class KinkEvidence:
    """Per-point evidence of the kink statistic (see the module docstring)."""

    matches: torch.Tensor  # (n,) bool: the suspect bends at the point as the owner does, by either test
    cosines: torch.Tensor  # (n,) cosine of the bend vectors at the point (bend test)
    size_ratios: torch.Tensor  # (n,) suspect's relative bend size / owner's (bend test)
    normal_cosines: torch.Tensor  # (n,) |cosine| of the suspect's boundary normal and the owner's (normal test)
    null_rate: float  # share of null windows that match
    bend_p_value: float  # P(at least this many matches | null rate), bend and normal tests
    slope: SlopeEvidence | None  # the slope test (None: a file from before it)
    p_value: float  # the uncalibrated score's chance: bends, or with shattered slopes twice the smaller (Bonferroni)
    score: float

    def summary(self) -> dict[str, Any]:
        n = len(self.matches)
        slope = self.slope
        slope_cos = slope.cosines if slope is not None else [None] * n
        found = {
            "matched_points": int(self.matches.sum()),
            "points": n,
            "null_match_rate": round(self.null_rate, 4),
            "bend_chance_probability": float(f"{self.bend_p_value:.3g}"),
            "chance_probability": float(f"{self.p_value:.3g}"),
        }
        if slope is not None:
            found["slope_matched_points"] = int((slope.cosines >= SLOPE_COSINE).sum())
            found["slope_null_match_rate"] = round(slope.null_rate, 4)
            found["slope_chance_probability"] = float(f"{slope.p_value:.3g}")
        found["per_point"] = [
            {
                "match": bool(m),
                "cosine": round(float(c), 3),
                "size_ratio": round(float(r), 3),
                "normal_cosine": round(float(nc), 3),
                **({} if sc is None else {"slope_cosine": round(float(sc), 3)}),
            }
            for m, c, r, nc, sc in zip(self.matches, self.cosines, self.size_ratios, self.normal_cosines, slope_cos)
        ]
        return found


def _window_centres() -> list[int]:
    """Grid indices of the point's window and of the null windows on its line."""
    return [KINK_HALF] + [KINK_HALF + u for u in KINK_NULL_OFFSETS]


def _bend_matches(suspect: Callable, fp: TafaFingerprint):
    """The bend test at every window: (n, windows) matches, cosines and relative-size ratios."""
    line = _line_outputs(suspect, fp.points, fp.directions, fp.step, fp.output)
    if line.shape[2] != fp.kinks.shape[1]:
        raise ValueError(f"suspect outputs have shape ({line.shape[2]},), the owner's ({fp.kinks.shape[1]},)")
    bends, sizes = _bends_at(line, _window_centres())
    owner_bends, owner_sizes = fp.kinks.double(), fp.kink_sizes.double()
    cos = (bends * owner_bends[:, None]).sum(2) / (bends.norm(dim=2) * owner_bends.norm(dim=1)[:, None]).clamp_min(
        1e-30
    )
    ratio = sizes / owner_sizes[:, None].clamp_min(1e-30)
    lo, hi = KINK_RATIO
    return (cos >= KINK_COSINE) & (ratio >= lo) & (ratio <= hi), cos, ratio


def _probes(d: int) -> torch.Tensor:
    """The fixed random unit input directions (seed 0) along which the normal and slope tests measure."""
    probes = torch.randn(NORMAL_PROBES, d, generator=torch.Generator().manual_seed(0))
    return probes / probes.norm(dim=1, keepdim=True)


def _output_view(m: int) -> torch.Tensor | None:
    """Fixed random directions (seed 1) through which outputs wider than :data:`SLOPE_OUTPUTS` are seen,
    so a generator's fingerprint stores 32 numbers per probe and point instead of 784."""
    if m <= SLOPE_OUTPUTS:
        return None
    view = torch.randn(m, SLOPE_OUTPUTS, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return view / view.norm(dim=0, keepdim=True)


def _slopes(f: Callable, points: torch.Tensor, half_width: float, output: str) -> torch.Tensor:
    """Secant slopes (f(x + h·p) − f(x − h·p)) / 2h along every probe p at every point: (n, probes, outputs seen)."""
    n, shape = len(points), tuple(points.shape[1:])
    probes = _probes(int(np.prod(shape)))
    moves = torch.cat([probes, -probes]).reshape(-1, *shape) * half_width
    chunks = []
    for start in range(0, n, SLOPE_CHUNK):
        x = points[start : start + SLOPE_CHUNK]
        queries = x[:, None] + moves[None]  # (b, 2 × probes, *shape)
        with torch.no_grad():
            out = _flat_out(f(queries.reshape(-1, *shape)))
        out = _compared(out, output).double().reshape(len(x), 2 * NORMAL_PROBES, -1)
        chunks.append((out[:, :NORMAL_PROBES] - out[:, NORMAL_PROBES:]) / (2 * half_width))
    slopes = torch.cat(chunks)
    view = _output_view(slopes.shape[2])
    return slopes if view is None else slopes @ view


def _unit_rows(a: torch.Tensor) -> torch.Tensor:
    return a / a.norm(dim=1, keepdim=True).clamp_min(1e-30)


def _slope_sharing(slopes: torch.Tensor) -> float:
    """Median cosine between the owner's slopes at two different points: near 0 where they are shattered."""
    unit = _unit_rows(slopes.flatten(1))
    pairs = unit @ unit.T
    return float(pairs[~torch.eye(len(pairs), dtype=torch.bool)].median()) if len(pairs) > 1 else 1.0


@dataclass
class SlopeEvidence:
    """Per-point evidence of the slope test (see :func:`slope_evidence`)."""

    cosines: torch.Tensor  # (n,) cosine of the suspect's probe slopes at each point and the owner's
    null_rate: float  # share of (owner's point i, suspect's point j ≠ i) pairs that match
    p_value: float  # P(at least this many matching points | null rate)


def slope_evidence(fp: TafaFingerprint, suspect: Callable) -> SlopeEvidence:
    """Do the suspect's slopes at the points point the owner's way, more often than at other points?

    Ours.  On a deep network (the Fashion-MNIST BatchNorm ResNet) the owner bends about every 0.1%
    of the input range along a line, and fine-tuning every layer moves those bends out of reach of
    the bend and normal tests.  What it keeps is the network's local linear response at coarser
    scale: the secant slopes along :data:`NORMAL_PROBES` fixed random directions, over a half-width of
    :data:`SLOPE_SCALE_FRACTION` of the box, averaged over many small regions.  The points are far
    from any training data (random starts in a box of 784 numbers), where an independently trained
    network's response has no reason to follow the owner's - where the owner's slopes are
    shattered (:data:`SLOPE_MAX_SHARING`); generation leaves the test out elsewhere.  A point matches when the
    cosine of the two flattened slope matrices is at least :data:`SLOPE_COSINE`; the null pairs
    the owner's slopes at one point with the suspect's at every *other* point, which takes out any
    response the two networks share everywhere (a global template), so the rate is the chance of a
    match without a point-specific likeness."""
    from scipy.stats import binom

    slopes = _slopes(suspect, fp.points, fp.slope_scale, fp.output).flatten(1)
    owner = fp.slopes.double().flatten(1)
    if slopes.shape[1] != owner.shape[1]:
        raise ValueError(f"suspect outputs do not have the owner's shape ({owner.shape[1] // NORMAL_PROBES} seen)")
    pairs = _unit_rows(owner) @ _unit_rows(slopes).T  # (owner's point, suspect's point)
    n = len(pairs)
    cosines = pairs.diagonal()
    others = pairs[~torch.eye(n, dtype=torch.bool)]
    null_rate = (int((others >= SLOPE_COSINE).sum()) + 1) / (others.numel() + 2)
    k = int((cosines >= SLOPE_COSINE).sum())
    return SlopeEvidence(cosines, null_rate, float(binom.sf(k - 1, n, null_rate)))


def _normal_matches(suspect: Callable, fp: TafaFingerprint) -> tuple[torch.Tensor, torch.Tensor]:
    """The boundary-normal test at every window: (n, windows) matches and |cosines|.

    Across one neuron's boundary the Jacobian of a piecewise-linear network jumps by a rank-one
    matrix, (change of output) × (boundary normal)ᵀ.  The input-side factor does not depend on any
    layer after that neuron, so it survives a retrained output layer.  Each window's Jacobian is
    measured on both sides (one-sided differences along :data:`NORMAL_PROBES` random directions),
    and the principal input-side direction of the jump is compared with the owner's boundary
    normal (its probe direction) through the same probes."""
    n, shape = len(fp.points), tuple(fp.points.shape[1:])
    d = int(np.prod(shape))
    width = fp.step / KINK_STEP_FRACTION
    probes = _probes(d)
    owner_normal = (fp.directions.reshape(n, d) @ probes.T).double()
    owner_normal = owner_normal / owner_normal.norm(dim=1, keepdim=True).clamp_min(1e-30)
    offsets = torch.tensor([c - KINK_HALF for c in _window_centres()], dtype=torch.float32) * fp.step
    sides = torch.tensor([-1.0, 1.0]) * NORMAL_SIDE_FRACTION * width
    along = offsets[:, None] + sides[None, :]  # (windows, 2): where each window's two sides sit on the line
    h = NORMAL_DIFF_FRACTION * width
    moves = torch.cat([torch.zeros(1, d), h * probes])  # the anchor itself, then one step along each probe
    cosines = []
    for start in range(0, n, NORMAL_CHUNK):
        x = fp.points[start : start + NORMAL_CHUNK].reshape(-1, d)
        u = fp.directions[start : start + NORMAL_CHUNK].reshape(-1, d)
        anchors = x[:, None, None] + along[None, :, :, None] * u[:, None, None]  # (b, windows, 2, d)
        queries = anchors[..., None, :] + moves  # (b, windows, 2, probes + 1, d)
        with torch.no_grad():
            out = _flat_out(suspect(queries.reshape(-1, *shape)))
        out = _compared(out, fp.output).double().reshape(*queries.shape[:-1], -1)
        jac = (out[..., 1:, :] - out[..., :1, :]) / h  # (b, windows, 2, probes, m)
        jump = jac[:, :, 1] - jac[:, :, 0]  # (b, windows, probes, m)
        gram = jump @ jump.transpose(-1, -2)  # (probes × probes): its top eigenvector is the jump's normal
        _, vectors = torch.linalg.eigh(gram)
        cos = (vectors[..., -1] * owner_normal[start : start + NORMAL_CHUNK, None]).sum(-1).abs()
        flat = jump.flatten(2).norm(dim=2) <= 1e-3 * jac.flatten(2).norm(dim=2)  # no boundary crossed
        cosines.append(torch.where(flat, torch.zeros_like(cos), cos))
    cos = torch.cat(cosines)
    return cos >= NORMAL_COSINE, cos


def kink_evidence(fp: TafaFingerprint, suspect: Callable) -> KinkEvidence:
    """Does the suspect bend where and how the owner bends, more often than on the same lines elsewhere?

    A point (and likewise each null window) matches when the bend test or the boundary-normal test
    passes there; one binomial test compares the points' matches with the null windows' rate.  The
    slope test (:func:`slope_evidence`) is a second binomial test; the chance probability reported
    is twice the smaller of the two (Bonferroni), so either test can carry a copy and neither
    doubles the chance of accusing an independent network."""
    from scipy.stats import binom

    if fp.kinks is None or fp.kink_sizes is None or fp.step <= 0:
        raise ValueError("this fingerprint predates the kink statistic: generate it again or use --statistic distance")
    bend, cos, ratio = _bend_matches(suspect, fp)
    normal, normal_cos = _normal_matches(suspect, fp)
    match = bend | normal
    n, null = len(match), match[:, 1:]
    k = int(match[:, 0].sum())
    null_rate = (int(null.sum()) + 1) / (null.numel() + 2)  # Laplace: never a zero null rate
    bend_p = float(binom.sf(k - 1, n, null_rate))
    slope = slope_evidence(fp, suspect) if fp.slopes is not None and fp.slope_scale > 0 else None
    p_value = min(1.0, 2 * min(bend_p, slope.p_value)) if slope is not None and _slopes_gated(fp) else bend_p
    score = min(1.0, max(0.0, -math.log10(max(p_value, 1e-300)) / KINK_LOG10_SCALE))
    return KinkEvidence(match[:, 0], cos[:, 0], ratio[:, 0], normal_cos[:, 0], null_rate, bend_p, slope, p_value, score)


PREMISE_PROBES = 64  # random lines on which the owner's piecewise linearity is measured
PREMISE_SMOOTH_SHARE = 0.5  # beyond this share of bending probes that curve smoothly, the premise fails


def smoothness(model: nn.Module, input_shape: tuple[int, ...], bounds, output: str, seed: int = 0) -> str:
    """Why ``model`` is not piecewise linear along random lines ('' when it is, or no bend shows).

    TAFA's bend, boundary-normal and slope tests assume ReLU-like pieces (ReLU, leaky ReLU, max-pooling,
    hard limits). At each probe x, along a random unit direction d, the second difference
    b(h) = f(x + hd) − 2f(x) + f(x − hd) is exactly 0 for a piecewise-linear f unless a boundary lies
    within h, and then shrinks at most linearly with h (and vanishes once the boundary is out of reach);
    for a smooth f it is f''(x)·h² at every probe: GELU, SiLU, tanh, sigmoid, and also ReLU networks
    with a normalization computed per input (LayerNorm, GroupNorm), which divides by a smooth function
    of the input. A probe *curves smoothly* when b(h)/b(h/2) and b(h/2)/b(h/4) are both near 4.
    Measured in float64 where the model converts (h = 1e-3 of the box width), else in float32 with
    h = 1e-2.
    """
    import copy

    gen = torch.Generator().manual_seed(seed)
    low, high = bounds
    x = low + (high - low) * torch.rand((PREMISE_PROBES, *input_shape), generator=gen, dtype=torch.float64)
    d = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    d = d / d.flatten(1).norm(dim=1).reshape(-1, *([1] * len(input_shape)))
    try:
        wide = copy.deepcopy(model).double().eval()
        with torch.no_grad():
            wide(x[:2])
        dtype, h, noise = torch.float64, 1e-3 * (high - low), 1e-12
    except Exception:  # a program whose graph fixes float32
        wide, dtype, h, noise = model, torch.float32, 1e-2 * (high - low), 1e-5

    def f(z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = torch.as_tensor(wide(z.to(dtype))).to(dtype).reshape(len(z), -1)  # not _flat_out: keep float64
        return out - out.mean(1, keepdim=True) if output == "softmax" else out  # a classifier's centred logits

    mid = f(x)
    second = []
    for step in (h, h / 2, h / 4):
        second.append((f(x + step * d) - 2 * mid + f(x - step * d)).norm(dim=1).double())
    scale = mid.norm(dim=1).double() + 1e-12
    bending = second[0] > noise * scale
    if int(bending.sum()) < 8:
        return ""
    r1 = second[0] / second[1].clamp_min(1e-300)
    r2 = second[1] / second[2].clamp_min(1e-300)
    smooth = bending & (r1 > 3.0) & (r1 < 5.0) & (r2 > 3.0) & (r2 < 5.0)
    share = float(smooth.sum()) / float(bending.sum())
    if share <= PREMISE_SMOOTH_SHARE:
        return ""
    return (
        f"the model is not piecewise linear: at {int(smooth.sum())} of {int(bending.sum())} bending probes its "
        "second difference shrinks as h² (a smooth activation such as GELU, SiLU, tanh or sigmoid, or a "
        "normalization per input such as LayerNorm or GroupNorm); TAFA's bend, normal and slope tests "
        "assume ReLU-like pieces"
    )


def generate(
    model: nn.Module,
    n: int,
    input_shape: tuple[int, ...],
    *,
    output: str = "raw",
    solver: str = "auto",
    bounds=(-3.0, 3.0),
    init: str = "normal",
    delta: float = 0.05,
    seed: int = 0,
) -> TafaFingerprint:
    """Fingerprint ``model`` at ``n`` region-boundary points (no training data used).

    ``output``: what a client sees and verification compares: ``"raw"`` outputs, or ``"softmax"``
    scores (classifiers).  ``solver``: "lp", "gradient" or "auto" (LP where
    :func:`lp_applies` and the input dimension is ≤ 64, else gradient).
    """
    start = time.perf_counter()
    d = int(np.prod(input_shape))
    if solver == "auto":
        solver = "lp" if lp_applies(model) and d <= 64 else "gradient"
    if solver == "lp":
        if not lp_applies(model):
            raise ValueError(
                "the LP solver reads the network's layers: it needs a Linear/ReLU stack that clients reach "
                "without normalization or a probabilities output; use --solver gradient"
            )
        points, dirs = lp_boundary_points(model, n, input_shape, bounds=bounds, init=init, seed=seed)
    elif solver == "gradient":
        points, dirs = gradient_boundary_points(model, n, input_shape, bounds=bounds, init=init, seed=seed)
    else:
        raise ValueError(f"solver must be 'lp', 'gradient' or 'auto', got {solver!r}")
    f = (lambda x: torch.softmax(model(x), 1)) if output == "softmax" else model
    outputs, bends = _second_difference(f, points, dirs, delta)
    scale = float((outputs - outputs.mean(0)).pow(2).sum(1).mean().sqrt().clamp_min(1e-8))
    step = KINK_STEP_FRACTION * (bounds[1] - bounds[0])
    kinks, sizes = _bends_at(_line_outputs(f, points, dirs, step, output), [KINK_HALF])
    bent = kinks[:, 0].norm(dim=1) > 0  # rounding can hide a bend: such a point carries no evidence
    if not bent.any():
        raise ValueError("the model does not bend measurably at any of its boundary points")
    slope_scale = SLOPE_SCALE_FRACTION * (bounds[1] - bounds[0])
    slopes = _slopes(f, points[bent], slope_scale, output)
    sharing = _slope_sharing(slopes)  # the uncalibrated score uses the slope test only where it is low
    return TafaFingerprint(
        points[bent],
        dirs[bent],
        delta,
        outputs[bent],
        bends[bent],
        scale,
        solver,
        time.perf_counter() - start,
        output,
        step,
        kinks[bent, 0].float(),
        sizes[bent, 0].float(),
        slopes.float(),
        slope_scale,
        sharing,
    )


def verify(fp: TafaFingerprint, suspect: Callable[[torch.Tensor], Any], statistic: str = DEFAULT_STATISTIC) -> float:
    """Black-box score in [0, 1] of a suspect (a callable inputs -> outputs) against the fingerprint."""
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    if statistic == "kink":
        return _suspect_call(lambda: kink_evidence(fp, suspect), fp).score
    return _suspect_call(lambda: _scored(fp, suspect, statistic), fp)


def _slopes_gated(fp: TafaFingerprint) -> bool:
    """Whether the uncalibrated kink score includes the slope test (shattered slopes, SLOPE_MAX_SHARING)."""
    return fp.slopes is not None and fp.slope_scale > 0 and fp.slope_sharing <= SLOPE_MAX_SHARING


def _minus_log10(p: float) -> float:
    return -math.log10(max(p, 1e-300))


def _suspect_call(run: Callable, fp: TafaFingerprint):
    """Run a statistic, turning a suspect that cannot take the fingerprint's inputs into a clear error."""
    try:
        return run()
    except MODEL_ERRORS as exc:
        raise ValueError(
            f"suspect cannot take inputs of shape {tuple(fp.points.shape[1:])}: {error_reason(exc)}"
        ) from exc


def _scored(fp: TafaFingerprint, suspect: Callable, statistic: str) -> float:
    """The distance and bending statistics."""
    mid, bend = _second_difference(suspect, fp.points, fp.directions, fp.delta)
    if mid.shape != fp.outputs.shape:
        raise ValueError(
            f"suspect outputs have shape {tuple(mid.shape[1:])}, the owner's {tuple(fp.outputs.shape[1:])}"
        )
    if statistic == "distance":
        dist = (mid - fp.outputs).norm(dim=1) / fp.scale
        return float(torch.exp(-dist / RHO).mean())
    ref = fp.bends.norm(dim=1)
    ok = ref > 1e-6 * fp.scale
    if not ok.any():
        raise ValueError("the owner's model does not bend at any fingerprint point")
    err = (bend - fp.bends).norm(dim=1)[ok] / ref[ok]
    return float((1 - err).clamp_min(0).mean())


@dataclass(frozen=True)
class TafaParams(Params):
    # more points than the other methods: a scalar-output copy (a regressor) matches at a minority
    # of points, and the binomial test needs numbers to tell that from chance (100 → 300 points
    # lifted the regression scenario's ARUC from 0.64 to 0.83 in the quick evaluation)
    points: int = param(300, "boundary points (default {default}; generation needs no data)")
    solver: str = param(
        "auto",
        "linear programming (plain ReLU MLPs with at most 64 inputs) or gradient bisection "
        "(any model) (default {default})",
        choices=["auto", "lp", "gradient"],
    )


class Tafa(AuditMethod[TafaParams, TafaFingerprint]):
    """Query sampler: region-boundary points; representation: outputs (classifiers: softmax); distance: a statistic."""

    name = "tafa"
    title = "TAFA (reconstruction)"
    label = "TAFA"
    score_name = "TAFA score"
    help = "TAFA reconstruction: ReLU region-boundary points, needs no training data, any task"
    needs_data = False
    params_type = TafaParams
    fingerprint_type = TafaFingerprint
    # bends and slopes: −log10 of their binomial chance; distance and bending: means over the points.
    # A calibration chooses among them by the references (the slope test's old gate, "shattered"
    # slopes, accused independent GELU networks whose slopes the owner's shared at 0.85-0.89).
    scales = {"bends": "chance", "slopes": "chance", "distance": "rate", "bending": "rate"}

    def generate(
        self,
        owner: Owner,
        params: TafaParams,
        data: Any = None,
        *,
        seed: int = 0,
        stage: Callable[[str], None] = lambda _msg: None,
    ) -> TafaFingerprint:
        model = owner.model
        softmax = owner.task == "classification"  # compare score vectors, the scale every classifier answers in
        stage(f"searching {params.points} region-boundary points (no training data)…")
        return generate(
            model,
            params.points,
            owner.input_shape,
            solver=params.solver,
            seed=seed,
            output="softmax" if softmax else "raw",
            bounds=owner.bounds,
            init="uniform",
        )

    def premise(self, owner: Owner) -> str:
        output = "softmax" if owner.task == "classification" else "raw"
        return smoothness(owner.model, owner.input_shape, owner.bounds, output)

    def score(
        self,
        fingerprint: TafaFingerprint,
        suspect: Suspect,
        *,
        num_classes: int | None = None,
        statistic: str | None = None,
        **options: Any,
    ) -> Score:
        from activeguard.audit.remote import probabilities

        statistic = statistic or DEFAULT_STATISTIC
        call = suspect
        if fingerprint.output == "softmax":
            call = lambda x: probabilities(suspect(x), getattr(suspect, "name", "suspect"))  # noqa: E731
        evidence: dict[str, Any] = {"points": len(fingerprint.points), "statistic": statistic}
        statistics = {
            "distance": _suspect_call(lambda: _scored(fingerprint, call, "distance"), fingerprint),
            "bending": _suspect_call(lambda: _scored(fingerprint, call, "bending"), fingerprint),
        }
        if fingerprint.kinks is None or fingerprint.kink_sizes is None or fingerprint.step <= 0:
            if statistic == "kink":
                raise ValueError(
                    "this fingerprint predates the kink statistic: generate it again or use --statistic distance"
                )
            return Score(statistics[statistic], evidence, statistics)
        found = _suspect_call(lambda: kink_evidence(fingerprint, call), fingerprint)
        statistics["bends"] = _minus_log10(found.bend_p_value)
        if found.slope is not None:
            statistics["slopes"] = _minus_log10(found.slope.p_value)
        if statistic == "kink":
            return Score(found.score, {**evidence, **found.summary()}, statistics)
        return Score(statistics[statistic], evidence, statistics)

    def describe(self, fingerprint: TafaFingerprint, params: TafaParams) -> dict[str, Any]:
        return {
            "output": fingerprint.output,
            "solver": fingerprint.solver,
            "slope_test": _slopes_gated(fingerprint),
            "slope_sharing": round(fingerprint.slope_sharing, 3),
        }

    def note(self, fingerprint: TafaFingerprint) -> str:
        """Whether the uncalibrated score uses the slope test, and why (see SLOPE_MAX_SHARING)."""
        if math.isnan(fingerprint.slope_sharing):
            return ""
        shared = f"median cosine of its slopes at two points {fingerprint.slope_sharing:.2f}"
        if _slopes_gated(fingerprint):
            return f"slope test in the score: the owner's slopes are shattered ({shared} ≤ {SLOPE_MAX_SHARING})"
        return (
            f"slope test not in the score: the owner's slopes share a template ({shared} > {SLOPE_MAX_SHARING}); "
            "a calibration chooses among bends, slopes, distance and bending by its references"
        )

    def explain(self, score: Score) -> str:
        e = score.evidence
        if e["statistic"] == "kink":
            slopes = (
                f"; slopes as the owner's at {e['slope_matched_points']} points, {e['slope_null_match_rate']:.1%} "
                "between other points"
                if "slope_matched_points" in e
                else ""
            )
            return (
                f"bends as the owner's at {e['matched_points']} of {e['points']} boundary points, "
                f"{e['null_match_rate']:.1%} elsewhere on the same lines{slopes}: chance "
                + (f"{e['chance_probability']:.2g}" if e["chance_probability"] > 0 else "< 1e-300")
            )
        return f"{e['points']} boundary points, {e['statistic']} statistic"

    def from_file(self, fields: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
        return {"output": meta.get("output", "raw"), **fields}  # files before the field kept it in meta only

    def add_score_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--statistic",
            choices=list(STATISTICS),
            default=None,
            help="kink: bends where and how the owner's do, against a null from the same lines (calibrated); "
            "distance: output distance; bending: second-difference error (default: kink)",
        )

    def score_options(self, args: Any) -> dict[str, Any]:
        return {"statistic": args.statistic}


METHOD = Tafa()
