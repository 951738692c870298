"""What a client sends, and the owner's network as a client reaches it.

:class:`InputSpec` says what one client row is: its shape, its value range, the per-channel
normalization the network expects and whether it answers logits or probabilities. :class:`ClientView`
wraps the owner's network so that every science module (fingerprints, watermark training, audits,
the serving guard) works in the *client's* input space and always sees logits: fingerprints are
optimized and stored exactly as a client sends them. The command line's spec flags are parsed here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

OUTPUTS = ("logits", "probabilities")
_MAX_RANK = 4  # rows of at most 4 dimensions (e.g. C, D, H, W); enough for every classifier served here
_MAX_ROW_VALUES = 50_000_000


class SourceError(ValueError):
    """A model cannot be loaded or used as asked; the message is one line a person can act on."""


# --- input spec -------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputSpec:
    """What one client row is. Values outside ``[low, high]`` are not inputs the model expects."""

    shape: tuple[int, ...]
    low: float = 0.0
    high: float = 1.0
    mean: tuple[float, ...] | None = None  # per channel (dim 0 of a row), applied before the network
    std: tuple[float, ...] | None = None
    outputs: str = "logits"

    def __post_init__(self) -> None:
        shape = tuple(self.shape)
        if not shape or len(shape) > _MAX_RANK or any(isinstance(d, bool) or not isinstance(d, int) for d in shape):
            raise SourceError(f"input shape must be 1 to {_MAX_RANK} integers, got {self.shape!r}")
        if min(shape) < 1 or math.prod(shape) > _MAX_ROW_VALUES:
            raise SourceError(f"input shape {shape} has a dimension below 1 or too many values per row")
        object.__setattr__(self, "shape", shape)
        low, high = float(self.low), float(self.high)
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise SourceError(f"input range must be two finite numbers low < high, got [{self.low}, {self.high}]")
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)
        if (self.mean is None) != (self.std is None):
            raise SourceError("normalization needs both mean and std")
        if self.mean is not None:
            mean, std = tuple(float(v) for v in self.mean), tuple(float(v) for v in self.std)
            if len(mean) != len(std) or len(mean) not in (1, shape[0]):
                raise SourceError(
                    f"normalization needs 1 or {shape[0]} (channels) values each for mean and std, "
                    f"got {len(mean)} and {len(std)}"
                )
            if not all(math.isfinite(v) for v in mean + std) or min(std) <= 0:
                raise SourceError("normalization mean must be finite and std positive")
            object.__setattr__(self, "mean", mean)
            object.__setattr__(self, "std", std)
        if self.outputs not in OUTPUTS:
            raise SourceError(f"outputs must be one of {', '.join(OUTPUTS)}, got {self.outputs!r}")

    @property
    def bounds(self) -> tuple[float, float]:
        return (self.low, self.high)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Rows in this spec's range as the network takes them: (x − mean) / std per channel."""
        if self.mean is None:
            return x
        view = (1, -1) + (1,) * (len(self.shape) - 1)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(view)
        return (x - mean) / torch.tensor(self.std, dtype=x.dtype, device=x.device).view(view)

    def logits(self, scores: torch.Tensor) -> torch.Tensor:
        """The network's answer as logits: log p for a network that answers probabilities."""
        return log_probabilities(scores) if self.outputs == "probabilities" else scores

    def random_rows(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform rows in the input box (probes, noise seeds)."""
        return self.low + (self.high - self.low) * torch.rand((n, *self.shape), generator=generator)

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "range": [self.low, self.high],
            "normalize": None if self.mean is None else {"mean": list(self.mean), "std": list(self.std)},
            "outputs": self.outputs,
        }

    @classmethod
    def from_dict(cls, data: Any) -> InputSpec:
        try:
            norm = data.get("normalize") or {}
            low, high = data.get("range", (0.0, 1.0))
            return cls(
                tuple(data["shape"]),
                low,
                high,
                norm.get("mean"),
                norm.get("std"),
                data.get("outputs", "logits"),
            )
        except SourceError:
            raise
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise SourceError(f"not an input spec: {exc}") from None


@dataclass(frozen=True)
class SpecOverrides:
    """What the command line says about the input (``None``: take it from the file or the default)."""

    shape: tuple[int, ...] | None = None
    bounds: tuple[float, float] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    outputs: str | None = None

    @classmethod
    def pinned(cls, spec: InputSpec) -> SpecOverrides:
        """Overrides that settle a load on exactly ``spec`` (a profile or a database row recorded it)."""
        return cls(shape=spec.shape, bounds=spec.bounds, mean=spec.mean, std=spec.std, outputs=spec.outputs)

    def apply(self, carried: InputSpec | None, what: str) -> InputSpec:
        shape = self.shape or (carried.shape if carried else None)
        if shape is None:
            raise SourceError(f"{what} does not say what its input is: give --input-shape, e.g. 3,32,32")
        base = carried or InputSpec(tuple(shape))
        updates: dict[str, Any] = {"shape": tuple(shape)}
        if self.bounds is not None:
            updates["low"], updates["high"] = self.bounds
        if self.mean is not None:
            updates["mean"], updates["std"] = self.mean, self.std
        if self.outputs is not None:
            updates["outputs"] = self.outputs
        return replace(base, **updates)


# --- the model as a client reaches it -----------------------------------------------------------


class ClientView(nn.Module):
    """The owner's network behind its input spec: client rows in, logits out.

    Normalization (x − mean) / std runs before the network; a network that answers probabilities
    is turned into logits by log p (softmax(log p) = p), so the control layer, fingerprints and
    audits treat every classifier alike. ``batch_limit`` runs a program exported for a fixed batch
    size one chunk at a time.
    """

    def __init__(self, network: nn.Module, spec: InputSpec, batch_limit: int | None = None, fixed_mode: bool = False):
        super().__init__()
        self.network = network
        self.spec = spec
        self.batch_limit = batch_limit
        self.fixed_mode = fixed_mode  # an exported program is captured in eval mode and refuses train()/eval()

    def train(self, mode: bool = True) -> ClientView:
        if self.fixed_mode:
            self.training = mode
            return self
        return super().train(mode)

    @property
    def is_plain(self) -> bool:
        """True when the view adds nothing: no normalization, logits out (the network is the model)."""
        return self.spec.mean is None and self.spec.outputs == "logits"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spec.logits(self.scores(x))

    def scores(self, x: torch.Tensor) -> Any:
        """The network's own answer (logits or probabilities) to client rows."""
        x = self.spec.normalize(x)
        if self.batch_limit is None or len(x) == self.batch_limit:
            return self.network(x)
        return torch.cat([self._fixed_batch(x[i : i + self.batch_limit]) for i in range(0, len(x), self.batch_limit)])

    def _fixed_batch(self, chunk: torch.Tensor) -> torch.Tensor:
        missing = self.batch_limit - len(chunk)
        if missing:
            chunk = torch.cat([chunk, chunk[:1].expand(missing, *chunk.shape[1:])])
        return self.network(chunk)[: self.batch_limit - missing]


def log_probabilities(p: torch.Tensor) -> torch.Tensor:
    """log p, finite where p is 0 (softmax of the result gives p back)."""
    return torch.log(p.clamp_min(1e-12))


def network_of(model: nn.Module) -> nn.Module:
    """The owner's own network inside a :class:`ClientView` (weights, layer names), or the model itself."""
    return model.network if isinstance(model, ClientView) else model


def parse_shape(text: str) -> tuple[int, ...]:
    """'1,28,28' or '3x32x32' → (1, 28, 28)."""
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise SourceError(f"--input-shape {text!r}: give the shape of one row, e.g. 1,28,28") from None
    InputSpec(shape)  # validates
    return shape


def parse_range(text: str) -> tuple[float, float]:
    """'0,1' or '0,255' → (low, high)."""
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise SourceError(f"--input-range {text!r}: give low,high, e.g. 0,1 or 0,255") from None
    InputSpec((1,), low, high)
    return (low, high)


def parse_normalize(text: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """'0.1307/0.3081' or '0.485,0.456,0.406/0.229,0.224,0.225' → (mean, std)."""
    mean_text, sep, std_text = text.partition("/")
    try:
        if not sep:
            raise ValueError
        mean = tuple(float(v) for v in mean_text.split(","))
        std = tuple(float(v) for v in std_text.split(","))
    except ValueError:
        raise SourceError(
            f"--normalize {text!r}: give MEAN/STD per channel, e.g. 0.1307/0.3081 or 0.485,0.456,0.406/0.229,0.224,0.225"
        ) from None
    return mean, std


def overrides_from_text(
    shape: str | None = None, value_range: str | None = None, normalize: str | None = None, outputs: str | None = None
) -> SpecOverrides:
    """The command line's spec flags, parsed."""
    mean, std = parse_normalize(normalize) if normalize else (None, None)
    return SpecOverrides(
        shape=parse_shape(shape) if shape else None,
        bounds=parse_range(value_range) if value_range else None,
        mean=mean,
        std=std,
        outputs=outputs,
    )
