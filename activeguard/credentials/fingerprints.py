"""User fingerprints: C&W adversarial examples with a fixed class and confidence (ActiveGuard §2.3).

Eq. 1 in tanh space, x' = low + (high − low)·(tanh(δ) + 1) / 2, minimizing ||x' - x||² + α·g(x')
with Eq. 3 g(x') = max(max_{k≠t} Z_k - Z_t, 0) + |p_t(x') - c|. ``[low, high]`` is the *client's*
input range (``InputSpec.bounds``; the paper's [0, 1] image box by default): fingerprints are
optimized and stored exactly as a client sends them, so the served model sees them like any input.
The distance term is measured in units of that range, so the same α works for [0, 1] and [0, 255].

Deviation from the paper, on purpose: Eq. 3 writes the confidence term on the logit Z_t, but the
control layer compares *softmax probabilities* with c ∈ C_fp, so the term here is on p_t (a logit
of 0.3 says nothing about a confidence of 0.3). The margin term g0 stays on logits, as in C&W.

All requested fingerprints (e.g. all K×T users × several seeds) are solved in **one batched
optimization**; each row stops on its own once its *encoded* form (what a client actually
sends: float32, or optionally 8 bits = 256 levels over the range) satisfies |p_t - c| < ε/2 with t top-1. A final,
separate forward pass re-checks every result through the control layer; rows that fail are
re-optimized once from where they stopped and otherwise reported as failures, never returned
as valid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from activeguard.credentials.control import ControlConfig, decide

# Per-row step size: halved each time p_t crosses c, never below 1/64 of the start.
_DECAY, _FLOOR = 0.5, 1 / 64
_KL_WEIGHT = 1.0
ENCODINGS = ("float32", "uint8")
UNIT_BOX: tuple[float, float] = (0.0, 1.0)


@dataclass
class FingerprintSet:
    """Generated fingerprints, one row per (user, seed)."""

    inputs: torch.Tensor  # (N, *input_shape), float32 in ``bounds``, already in the wire encoding
    users: torch.Tensor  # (N,) intended user index
    success: torch.Tensor  # (N,) bool: passed the final control-layer re-check as its own user
    confidence: torch.Tensor  # (N,) p_t measured in the re-check
    steps: torch.Tensor  # (N,) optimizer steps used
    encoding: str = "float32"
    bounds: tuple[float, float] = UNIT_BOX

    def for_user(self, user: int) -> torch.Tensor:
        """The valid fingerprints of one user (possibly none)."""
        return self.inputs[(self.users == user) & self.success]

    def success_rate_by_user(self) -> dict[int, float]:
        return {int(u): float(self.success[self.users == u].float().mean()) for u in torch.unique(self.users)}


def _check_bounds(bounds: tuple[float, float]) -> tuple[float, float]:
    low, high = (float(v) for v in bounds)
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"bounds must be two finite numbers low < high, got {tuple(bounds)}")
    return low, high


def encode(x: torch.Tensor, encoding: str, bounds: tuple[float, float] = UNIT_BOX) -> torch.Tensor:
    """The exact tensor a client sends: float32 as is, or 8 bits (256 levels over ``bounds``).

    For the [0, 1] box uint8 means pixels k/255; for [0, 255] it means the integers 0..255.
    """
    if encoding == "float32":
        return x.to(torch.float32)
    if encoding == "uint8":
        low, high = _check_bounds(bounds)
        # levels in float32 (for [0, 1] bit-identical to round(x * 255), as stored fingerprints were),
        # values in float64 so that each level lands on the float32 a client's value parses to
        levels = torch.round((x.to(torch.float32) - low) / (high - low) * 255.0).clamp(0, 255)
        return (low + levels.to(torch.float64) / 255.0 * (high - low)).to(torch.float32)
    raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")


def _to_tanh_space(x: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
    low, high = bounds
    return torch.atanh(((x - low) / (high - low)).clamp(1e-4, 1 - 1e-4) * 2 - 1)


def _from_tanh_space(w: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
    low, high = bounds
    return low + (high - low) * (torch.tanh(w) + 1) / 2


def _validate_seeds(seeds: torch.Tensor, count: int, bounds: tuple[float, float]) -> torch.Tensor:
    if seeds.ndim < 2 or seeds.shape[0] != count:
        raise ValueError(f"need {count} seed inputs shaped (N, ...), got {tuple(seeds.shape)}")
    if not torch.isfinite(seeds).all():
        raise ValueError("seed inputs contain NaN or inf")
    low, high = bounds
    if seeds.min() < low or seeds.max() > high:
        raise ValueError(
            f"seed inputs must lie in [{low:g}, {high:g}] (the client's input range the optimizer works in), "
            f"got values in [{float(seeds.min()):g}, {float(seeds.max()):g}]"
        )
    return seeds.detach().to(torch.float32)


@dataclass
class _Targets:
    """What each row aims at: its user, the FO's named classes and probabilities, the full target
    distribution (the FO space's nearest passing distribution) and the space that decodes it."""

    users: torch.Tensor
    classes: torch.Tensor  # (N,) t
    confs: torch.Tensor  # (N,) c
    runner_up: torch.Tensor  # (N,) r, −1 in the paper's space
    runner_up_confs: torch.Tensor  # (N,) q, 0 where there is no runner-up
    distribution: torch.Tensor  # (N, K)
    config: ControlConfig

    @classmethod
    def of(cls, users: torch.Tensor, config: ControlConfig) -> _Targets:
        fos = [config.fo_of_user(u) for u in users.tolist()]
        return cls(
            users=users,
            classes=torch.tensor([f.target for f in fos]),
            confs=torch.tensor([f.confidence for f in fos]),
            runner_up=torch.tensor([-1 if f.runner_up is None else f.runner_up for f in fos]),
            runner_up_confs=torch.tensor([f.runner_up_confidence or 0.0 for f in fos]),
            distribution=config.space.target_distribution(users.tolist(), fos),
            config=config,
        )

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "config"}

    def __getitem__(self, rows: torch.Tensor) -> _Targets:
        return _Targets(**{k: v[rows] for k, v in self._tensors().items()}, config=self.config)

    @staticmethod
    def cat(a: _Targets, b: _Targets) -> _Targets:
        more = b._tensors()
        return _Targets(**{k: torch.cat([v, more[k]]) for k, v in a._tensors().items()}, config=a.config)

    def hit(self, probs: torch.Tensor, tolerance: float) -> torch.Tensor:
        """Rows whose output already decodes to their own user at the tighter generation tolerance."""
        return self.config.space.decode(probs, tolerance) == self.users


@dataclass
class Finished:
    """A row that left the search: its encoded input, whether it reached its FO, and steps used."""

    row: int  # the id :meth:`FingerprintSearch.add` returned
    x: torch.Tensor  # (*input_shape), in the wire encoding
    hit: bool
    steps: int


class FingerprintSearch:
    """A batched C&W search that rows may join at any step and leave as soon as they are done.

    Adam is applied per row with its own step size, halved whenever that row's p_t (or runner-up
    p_r) crosses its target: a fixed step makes |p_t - c| oscillate around the narrow ε/2 window
    instead of landing in it. A row leaves when its *encoded* form decodes to its own user at
    ``tolerance`` (a hit) or after ``max_steps`` (a miss), so late steps only pay for the rows still
    running, and a license server can add requests to a search already under way (one
    optimization for every waiting request, each answered when its own row is done).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        tolerance: float,
        alpha: float,
        lr: float,
        max_steps: int,
        encoding: str,
        bounds: tuple[float, float],
        margin: float = 0.05,
    ):
        self.model, self.tolerance, self.alpha, self.lr = model, tolerance, alpha, lr
        self.max_steps, self.encoding, self.bounds, self.margin = max_steps, encoding, bounds, margin
        self._next_id = 0
        self._state: dict[str, torch.Tensor] | None = None
        self._aims: _Targets | None = None

    @property
    def active(self) -> int:
        return 0 if self._state is None else len(self._state["id"])

    def add(
        self, aims: _Targets, x0: torch.Tensor, start: torch.Tensor | None = None, lr: float | None = None
    ) -> list[int]:
        """Rows aiming at ``aims`` (one per row), anchored at ``x0``, starting from ``start`` (x0), with
        step size ``lr`` (the search's)."""
        n = len(x0)
        start = x0 if start is None else start
        w = _to_tanh_space(start, self.bounds)
        ids = torch.arange(self._next_id, self._next_id + n)
        self._next_id += n
        new = {
            "id": ids,
            "x0": x0,
            "w": w,
            "m": torch.zeros_like(w),
            "v": torch.zeros_like(w),
            "lr": torch.full((n,), self.lr if lr is None else lr),
            "side": torch.zeros(n, 2),  # sides of c and of q last step
            "age": torch.zeros(n, dtype=torch.int64),  # steps taken (Adam's bias correction)
            "misses": torch.zeros(n, dtype=torch.int64),  # steps whose encoded input was not yet a hit
        }
        if self._state is None:
            self._state, self._aims = new, aims
        else:
            self._state = {k: torch.cat([self._state[k], v]) for k, v in new.items()}
            self._aims = _Targets.cat(self._aims, aims)
        return ids.tolist()

    def add_users(
        self, config: ControlConfig, users: Sequence[int], x0: torch.Tensor, lr: float | None = None
    ) -> list[int]:
        """Rows for ``users`` of ``config``'s FO space, anchored at and starting from ``x0``."""
        return self.add(_Targets.of(torch.as_tensor(list(users), dtype=torch.int64), config), x0, lr=lr)

    def _keep(self, rows: torch.Tensor) -> None:
        assert self._state is not None and self._aims is not None
        if len(rows) == 0:
            self._state, self._aims = None, None
        else:
            self._state = {k: v[rows] for k, v in self._state.items()}
            self._aims = self._aims[rows]

    def step(self) -> list[Finished]:
        """One Adam step for every active row; returns the rows that left."""
        if self._state is None or self._aims is None:
            return []
        st, aim, bounds, model = self._state, self._aims, self.bounds, self.model
        view = (-1,) + (1,) * (st["x0"].ndim - 1)
        t, c = aim.classes, aim.confs
        rows = torch.arange(len(t))
        wa = st["w"].clone().requires_grad_(True)
        x = _from_tanh_space(wa, bounds)
        logits = model(x)
        if self.encoding == "float32":
            p_sent = torch.softmax(logits.detach(), dim=1)
            x_sent = x.detach()
        else:
            x_sent = encode(x.detach(), self.encoding, bounds)
            with torch.no_grad():
                p_sent = torch.softmax(model(x_sent), dim=1)
        hit = aim.hit(p_sent, self.tolerance)
        st["misses"] += (~hit).long()
        st["age"] += 1
        z_t = logits[rows, t]
        z_other = logits.masked_fill(nn.functional.one_hot(t, logits.shape[1]).bool(), -torch.inf).amax(1)
        g0 = torch.relu(z_other - z_t + self.margin)
        log_p = torch.log_softmax(logits, dim=1)
        p_t = log_p[rows, t].exp()
        has_r = aim.runner_up >= 0
        p_r = log_p[rows, aim.runner_up.clamp(min=0)].exp()
        # the runner-up must also out-rank every other class (C&W's margin, on its logit)
        named = nn.functional.one_hot(t, logits.shape[1]).bool() | (
            nn.functional.one_hot(aim.runner_up.clamp(min=0), logits.shape[1]).bool() & has_r[:, None]
        )
        z_rest = logits.masked_fill(named, -torch.inf).amax(1)
        g_order = torch.relu(z_rest - logits[rows, aim.runner_up.clamp(min=0)] + self.margin)
        g_r = torch.where(has_r, (p_r - aim.runner_up_confs).abs() + g_order, torch.zeros_like(p_r))
        target_dist = aim.distribution
        kl = (target_dist * (target_dist.log() - log_p)).sum(1)
        distance = (((x - st["x0"]) / (bounds[1] - bounds[0])) ** 2).flatten(1).sum(1)
        task = g0 + (p_t - c).abs() + g_r + _KL_WEIGHT * kl
        loss = ((distance + self.alpha * task) * (~hit)).sum()
        (grad,) = torch.autograd.grad(loss, wa)
        side = torch.stack([torch.sign(p_t.detach() - c), torch.sign(p_r.detach() - aim.runner_up_confs) * has_r], 1)
        crossed = ((side * st["side"]) < 0).any(1)
        st["lr"] = torch.where(crossed, (st["lr"] * _DECAY).clamp(min=self.lr * _FLOOR), st["lr"])
        st["side"] = side
        beta1, beta2 = 0.9, 0.999
        st["m"] = beta1 * st["m"] + (1 - beta1) * grad
        st["v"] = beta2 * st["v"] + (1 - beta2) * grad**2
        age = st["age"].to(grad.dtype).view(view)
        m_hat = st["m"] / (1 - beta1**age)
        v_hat = st["v"] / (1 - beta2**age)
        st["w"] = wa.detach() - st["lr"].view(view) * m_hat / (v_hat.sqrt() + 1e-8)
        out_of_steps = ~hit & (st["age"] >= self.max_steps)
        finished = [
            Finished(int(st["id"][i]), x_sent[i], True, int(st["misses"][i])) for i in hit.nonzero().squeeze(1).tolist()
        ]
        if out_of_steps.any():
            last = encode(_from_tanh_space(st["w"][out_of_steps], bounds), self.encoding, bounds)
            ids, misses = st["id"][out_of_steps].tolist(), st["misses"][out_of_steps].tolist()
            finished += [Finished(i, xi, False, s) for i, xi, s in zip(ids, last, misses)]
        if finished:
            self._keep((~(hit | out_of_steps)).nonzero().squeeze(1))
        return finished


def _optimize(
    model: nn.Module,
    x0: torch.Tensor,
    start: torch.Tensor,
    aims: _Targets,
    *,
    progress: bool,
    **search: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batched C&W run of every row from the start. Returns (x, done, steps)."""
    n = len(x0)
    best = encode(start, search["encoding"], search["bounds"]).clone()
    done = torch.zeros(n, dtype=torch.bool)
    steps = torch.zeros(n, dtype=torch.int64)
    runner = FingerprintSearch(model, **search)
    ids = runner.add(aims, x0, start)
    position = {row: i for i, row in enumerate(ids)}
    with tqdm(total=n, desc="fingerprints", unit="fp", disable=not progress, leave=False) as bar:
        while runner.active:
            finished = runner.step()
            for f in finished:
                i = position[f.row]
                best[i], done[i], steps[i] = f.x, f.hit, f.steps
            bar.update(sum(f.hit for f in finished))
    return best, done, steps


def generate_fingerprints(
    model: nn.Module,
    config: ControlConfig,
    users: Sequence[int],
    seeds: torch.Tensor | None = None,
    *,
    per_user: int = 1,
    input_shape: tuple[int, ...] | None = None,
    bounds: tuple[float, float] = UNIT_BOX,
    alpha: float | None = None,
    lr: float = 0.2,
    max_steps: int = 1000,
    encoding: str = "float32",
    seed: int = 0,
    progress: bool = False,
) -> FingerprintSet:
    """Fingerprints for ``users`` (``per_user`` each), all solved in one batched optimization.

    ``bounds`` is the client's input range ``[low, high]`` (``InputSpec.bounds``): fingerprints are
    searched in it and returned in it, encoded as a client sends them, so ``model`` must be the model
    as a client reaches it (for a loaded source, ``LoadedModel.model``). ``seeds`` holds
    len(users) * per_user starting inputs in that range (row r belongs to user users[r // per_user]);
    with no data pass ``input_shape`` and uniform noise over the range is used.
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    bounds = _check_bounds(bounds)
    users_t = torch.as_tensor(list(users), dtype=torch.int64)
    if users_t.numel() == 0:
        raise ValueError("no users given")
    for u in users_t.tolist():
        config.fo_of_user(u)  # raises a clear error for an out-of-range user
    if per_user < 1:
        raise ValueError(f"per_user must be >= 1, got {per_user}")
    users_t = users_t.repeat_interleave(per_user)
    n = len(users_t)
    if seeds is None:
        if input_shape is None:
            raise ValueError("give seed inputs or an input_shape for random-noise seeds")
        noise = torch.rand(n, *input_shape, generator=torch.Generator().manual_seed(seed))
        seeds = bounds[0] + (bounds[1] - bounds[0]) * noise
    x0 = _validate_seeds(seeds, n, bounds)
    aims = _Targets.of(users_t, config)

    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        torch.manual_seed(seed)
        opts = dict(
            tolerance=config.epsilon / 2,
            alpha=config.space.task_weight if alpha is None else alpha,
            max_steps=max_steps,
            encoding=encoding,
            bounds=bounds,
            progress=progress,
        )
        x, _, steps = _optimize(model, x0, x0, aims, lr=lr, **opts)
        ok, p_t = _recheck(model, x, aims)
        if not ok.all():  # re-optimize the failures once, gently, from where they stopped
            redo = ~ok
            x_redo, _, more = _optimize(
                model, x0[redo], x[redo].clamp(*bounds), aims[redo.nonzero().squeeze(1)], lr=lr / 5, **opts
            )
            x[redo] = x_redo
            steps[redo] += more
            ok, p_t = _recheck(model, x, aims)
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
    return FingerprintSet(
        inputs=x, users=users_t, success=ok, confidence=p_t, steps=steps, encoding=encoding, bounds=bounds
    )


@torch.no_grad()
def _recheck(model: nn.Module, x: torch.Tensor, aims: _Targets) -> tuple[torch.Tensor, torch.Tensor]:
    """The control layer's own verdict on the encoded fingerprints, one at a time (as served)."""
    probs = torch.cat([torch.softmax(model(row[None]), dim=1) for row in x])
    decision = decide(probs, aims.config)
    ok = decision.authorized & (decision.user == aims.users)
    return ok, probs[torch.arange(len(x)), aims.classes]


@torch.no_grad()
def authenticate(
    model: nn.Module, fingerprints: torch.Tensor, config: ControlConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run fingerprints through ``model`` and return (authorized, user) per row."""
    decision = decide(torch.softmax(model(fingerprints), dim=1), config)
    return decision.authorized, decision.user


@torch.no_grad()
def natural_users(
    model: nn.Module,
    config: ControlConfig,
    input_shape: tuple[int, ...],
    bounds: tuple[float, float] = UNIT_BOX,
    *,
    count: int = 8192,
    seed: int = 1234,
    batch: int = 1024,
) -> set[int]:
    """Users whose FO uniform noise over the input range reaches: a dense FO space skips them, so
    an input nobody made for a license rarely passes as one (issue 16's per-license false acceptance)."""
    low, high = _check_bounds(bounds)
    generator = torch.Generator().manual_seed(seed)
    found: set[int] = set()
    for start in range(0, count, batch):
        n = min(batch, count - start)
        noise = low + (high - low) * torch.rand(n, *input_shape, generator=generator)
        _, users = authenticate(model, noise, config)
        found.update(int(u) for u in users[users >= 0])
    return found
