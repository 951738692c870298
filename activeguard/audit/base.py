"""One interface for the black-box ownership audits, and their registry.

After QuRD (a fingerprint = query sampler + output representation + distance) and WRT (one
abstract class per role, one file per method, a registry): each method is an :class:`AuditMethod`
in its own module (the science stays there) with a frozen parameters dataclass that is the single
source of its defaults (the CLI builds its flags from it).  ``generate`` makes a fingerprint of the
owner's model; ``score`` compares a suspect with it and returns a :class:`Score` with every statistic
the method measures. No method decides on its own: a verdict comes from the fingerprint's null
(:mod:`activeguard.audit.calibration`).

Adding a method: one module with an ``AuditMethod`` subclass, plus one line in :data:`_MODULES`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import numpy as np
import torch
from torch import nn

from activeguard.audit.metrics import matching_rate

if TYPE_CHECKING:
    from activeguard.models.sources import LoadedModel

Suspect = Callable[[torch.Tensor], Any]  # inputs -> labels (n,) or scores (n, classes); a module or e.g. a forest


@dataclasses.dataclass(frozen=True)
class Owner:
    """The owner's model and what an audit must know about it.

    ``model`` takes rows as clients send them (a :class:`activeguard.models.inputs.ClientView` when built
    by :meth:`from_loaded`): fingerprint points are searched, clipped and stored in that space,
    inside ``bounds``, so a suspect is queried exactly as a client would query it.
    """

    model: nn.Module
    input_shape: tuple[int, ...]
    num_classes: int | None
    task: str  # "classification", "regression" or "generation"
    bounds: tuple[float, float] = (0.0, 1.0)  # the range of input values a client sends

    @classmethod
    def from_loaded(cls, loaded: LoadedModel) -> Owner:
        """The owner as any model source loads it (checkpoint, TorchScript, .pt2, state dict + model file)."""
        return cls(loaded.model, tuple(loaded.spec.shape), loaded.num_classes, loaded.task, loaded.spec.bounds)


@dataclasses.dataclass
class Score:
    """A suspect's score against a fingerprint: ``value`` in [0, 1] (1 = behaves as the owner).

    ``statistics`` holds every statistic the method measured with the same queries, by name (the
    method's :attr:`AuditMethod.scales` say which scale each is on); a calibrated fingerprint judges
    the one its references chose (:mod:`activeguard.audit.calibration`).
    """

    value: float
    evidence: dict[str, Any] = dataclasses.field(default_factory=dict)
    statistics: dict[str, float] = dataclasses.field(default_factory=dict)


def param(default: Any, help: str, **kwargs: Any) -> Any:
    """A parameter field: ``help`` (with ``{default}``) and argparse extras (``choices``) for the CLI."""
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


@dataclasses.dataclass(frozen=True)
class Params:
    """Parameters every method has; subclasses add theirs (frozen: one run, one set of values)."""

    points: int = param(100, "fingerprint points (default {default})")

    def __post_init__(self) -> None:
        if self.points < 1:
            raise ValueError(f"--points must be at least 1, got {self.points}")


P = TypeVar("P", bound=Params)
F = TypeVar("F")


class AuditMethod(ABC, Generic[P, F]):
    """A black-box audit: fingerprint the owner's model, then score suspects against it."""

    name: ClassVar[str]  # registry name: CLI subcommand, file kind, threshold key
    title: ClassVar[str]  # for people, e.g. "CEM (conferrable adversarial examples)"
    label: ClassVar[str]  # short, for table columns, e.g. "CEM"
    score_name: ClassVar[str]  # what the score is called, e.g. "matching rate"
    help: ClassVar[str]  # one line for `audit fingerprint --help`
    needs_data: ClassVar[bool]  # generate can use the owner's training data (a classifier's Split)
    data_note: ClassVar[str] = ""  # when the data is optional or what it is used for, for --data's help
    params_type: ClassVar[type[Params]]
    fingerprint_type: ClassVar[type]
    # every statistic ``score`` reports, with its scale ("rate" of the fingerprint's points, or a
    # "chance" probability as −log10), in the order a calibration considers them
    scales: ClassVar[dict[str, str]]

    @abstractmethod
    def generate(
        self,
        owner: Owner,
        params: P,
        data: Any = None,
        *,
        seed: int = 0,
        stage: Callable[[str], None] = lambda _msg: None,
    ) -> F:
        """Make a fingerprint of ``owner``; ``data`` is its training Split when ``needs_data``."""

    @abstractmethod
    def score(self, fingerprint: F, suspect: Suspect, *, num_classes: int | None = None, **options: Any) -> Score:
        """Score a suspect (a callable inputs -> outputs) against the fingerprint."""

    def candidates(self, params: P, calibrating: bool, has_data: bool = True) -> list[P]:
        """The parameter sets to fingerprint with; a calibration keeps the one its references favour
        (IPGuard compares variants and margins). Default: ``params`` alone."""
        return [params]

    def premise(self, owner: Owner) -> str:
        """Why the method's premise does not hold for this owner ('' when it does): its verdicts are
        then inconclusive, whatever the score."""
        return ""

    @staticmethod
    def points(fingerprint: F) -> int:
        """How many queries a rate statistic averages over (its sampling spread)."""
        return len(fingerprint.points)  # type: ignore[attr-defined]

    def requires_data(self, params: P) -> bool:
        """Whether ``generate`` needs the owner's data with these parameters (IPGuard-R* starts from noise)."""
        return self.needs_data

    def uses_data(self, params: P) -> bool:
        """Whether ``generate`` uses the owner's data when there is some (references train on it either way)."""
        return self.needs_data

    def describe(self, fingerprint: F, params: P) -> dict[str, Any]:
        """How the fingerprint was made, stored in the file's meta and the CLI's JSON."""
        return {}

    def note(self, fingerprint: F) -> str:
        """A caveat about a fresh fingerprint for people ('' when none)."""
        return ""

    def explain(self, score: Score) -> str:
        """The evidence in words, e.g. '87/100 fingerprint points give the owner's label'."""
        return ", ".join(f"{k} {v}" for k, v in score.evidence.items())

    def from_file(self, fields: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
        """Fill in fields an older file lacks (from its meta); the default keeps them as stored."""
        return fields

    def add_score_arguments(self, parser: Any) -> None:
        """Flags of ``activeguard audit NAME`` beyond the common ones (none by default)."""

    def score_options(self, args: Any) -> dict[str, Any]:
        """The ``**options`` of :meth:`score` from those flags."""
        return {}


# What a model raises on inputs it cannot take: eager and exported-program shape errors are
# RuntimeError/AssertionError (a failed shape guard), TorchScript's torch.jit.Error is neither.
MODEL_ERRORS: tuple[type[BaseException], ...] = (RuntimeError, AssertionError, torch.jit.Error)


def error_reason(exc: BaseException) -> str:
    """One line from a model's error (TorchScript puts its traceback first and the reason last)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(exc).__name__


def suspect_outputs(suspect: Suspect, x: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """What a suspect answers for ``x``: score rows (n, classes) or labels (n,); raises a clear error on a
    wrong input shape or output size."""
    if isinstance(suspect, nn.Module):
        suspect.eval()
    try:
        with torch.no_grad():
            out = suspect(x)
    except MODEL_ERRORS as exc:
        raise ValueError(f"suspect cannot take inputs of shape {tuple(x.shape[1:])}: {error_reason(exc)}") from exc
    out = torch.as_tensor(np.asarray(out.detach() if isinstance(out, torch.Tensor) else out))
    if out.ndim == 2 and num_classes is not None and out.shape[1] != num_classes:
        raise ValueError(f"suspect has {out.shape[1]} outputs, the owner's model has {num_classes}")
    if out.ndim not in (1, 2) or len(out) != len(x):
        raise ValueError(f"suspect returned shape {tuple(out.shape)} for {len(x)} queries")
    return out


def suspect_labels(suspect: Suspect, x: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """Labels a suspect assigns to ``x``; raises a clear error on a wrong input shape or output size."""
    out = suspect_outputs(suspect, x, num_classes)
    return (out.argmax(1) if out.ndim == 2 else out).long()


def as_probabilities(out: torch.Tensor) -> torch.Tensor | None:
    """Score rows as probability vectors (rows that already are, ≥ 0 and summing to 1, are kept; logits
    get a softmax); None for labels, which carry no scores."""
    out = torch.as_tensor(out)
    if out.ndim != 2 or not out.is_floating_point():
        return None
    out = out.float()
    if (out >= 0).all() and torch.allclose(out.sum(1), torch.ones(len(out)), atol=1e-3):
        return out
    return torch.softmax(out, 1)


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """A fingerprint class's field annotations, resolved (the modules use postponed annotations)."""
    return typing.get_type_hints(cls)


def _is_a(value: Any, expected: Any) -> bool:
    """Whether a value has its field's declared type; a bool is no number, an int is a float."""
    if typing.get_origin(expected) in (typing.Union, types.UnionType):
        return any(_is_a(value, option) for option in typing.get_args(expected))
    if expected is type(None):
        return value is None
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(expected, type):
        return isinstance(value, expected)
    return True  # an annotation this check does not know (Any, generics): the class's own checks decide


def _type_name(expected: Any) -> str:
    if typing.get_origin(expected) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(option) for option in typing.get_args(expected))
    return "None" if expected is type(None) else getattr(expected, "__name__", str(expected))


def check_field_types(fingerprint: Any) -> None:
    """Every field of a fingerprint dataclass must have its declared type (a tensor, a number that is not
    a bool, a string, or None where allowed): called first in each class's ``__post_init__``, so an
    edited or damaged file is refused on loading, naming the field, instead of failing inside the scoring."""
    for field in dataclasses.fields(fingerprint):
        expected, value = _field_types(type(fingerprint)).get(field.name), getattr(fingerprint, field.name)
        if expected is not None and not _is_a(value, expected):
            raise ValueError(
                f"the fingerprint's {field.name} is a {type(value).__name__}, not {_type_name(expected)} "
                "(a damaged or edited file?)"
            )


def check_labelled_points(points: torch.Tensor, labels: torch.Tensor) -> None:
    """What :class:`LabelMatching` reads from a fingerprint (types checked by :func:`check_field_types`):
    floating-point points, integer labels, one label per point."""
    if not points.is_floating_point() or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(
            f"the fingerprint's points ({points.dtype}) must be floating point and its labels ({labels.dtype}) integers"
        )
    if len(points) == 0:
        raise ValueError("the fingerprint is empty: it holds no points")
    if len(points) != len(labels):
        raise ValueError(f"fingerprint has {len(points)} points but {len(labels)} labels")


class LabelMatching:
    """Output representation = top-1 label, distance = matching rate (shared by IPGuard and CEM).

    The fingerprint needs ``points`` and the owner's ``labels`` on them. A suspect that answers scores
    also gets the ``owner_probability`` statistic: the mean probability it gives the owner's label, which
    a fine-tuned copy keeps high even where its top label flipped.
    """

    scales: ClassVar[dict[str, str]] = {"matching": "rate", "owner_probability": "rate"}

    def score(self, fingerprint: Any, suspect: Suspect, *, num_classes: int | None = None, **options: Any) -> Score:
        out = suspect_outputs(suspect, fingerprint.points, num_classes)
        labels = (out.argmax(1) if out.ndim == 2 else out).long()
        value = matching_rate(fingerprint.labels.numpy(), labels.numpy())
        total = len(fingerprint.labels)
        statistics = {"matching": value}
        probs = as_probabilities(out)
        if probs is not None:
            statistics["owner_probability"] = float(probs[torch.arange(total), fingerprint.labels].mean())
        return Score(value, {"matched": int(round(value * total)), "total": total}, statistics)

    def explain(self, score: Score) -> str:
        return f"{score.evidence['matched']}/{score.evidence['total']} fingerprint points give the owner's label"


# name -> module holding exactly one registered AuditMethod subclass (its science lives there too)
_MODULES: dict[str, str] = {
    "ipguard": "activeguard.audit.ipguard",
    "cem": "activeguard.audit.conferrable",
    "tafa": "activeguard.audit.tafa",
}
_LOADED: dict[str, AuditMethod] = {}


def _load(name: str) -> AuditMethod:
    if name not in _LOADED:
        module = importlib.import_module(_MODULES[name])
        _LOADED[name] = module.METHOD
        if module.METHOD.name != name:
            raise RuntimeError(f"{_MODULES[name]}.METHOD is named {module.METHOD.name!r}, registered as {name!r}")
    return _LOADED[name]


def names() -> list[str]:
    """Registered method names, in registry order."""
    return list(_MODULES)


def get(name: str) -> AuditMethod:
    """The method registered as ``name`` (KeyError names the known ones)."""
    if name not in _MODULES:
        raise KeyError(f"unknown audit method {name!r}; known: {', '.join(_MODULES)}")
    return _load(name)


def methods() -> dict[str, AuditMethod]:
    """Every registered method, by name."""
    return {name: _load(name) for name in _MODULES}
