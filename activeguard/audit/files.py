"""One file format for the black-box fingerprints of every registered audit method.

A fingerprint file is a ``torch.save`` of a plain dict, read back with
``torch.load(weights_only=True)`` (tensors and plain Python values only, no arbitrary unpickling)::

    {"format": "activeguard-audit-fingerprint/2", "kind": <registered method name>,
     "fields": {<every dataclass field of the fingerprint>}, "meta": {...},
     "calibration": {<the null: see activeguard.audit.calibration.Calibration>} or None}

The fields are taken from :func:`dataclasses.fields`, so a field added to or removed from a
fingerprint class keeps working: unknown stored fields are ignored on load, and a field missing
from an old file falls back to the class default (or the load fails with a message naming it).
``meta`` holds what the audit needs besides the fingerprint: the owner's model id and source
(file, format), its input spec (shape, range, normalization, outputs: a suspect without its own
spec is queried as the owner is), the number of classes, the task, how the fingerprint was made. ``calibration`` holds the null that
verdicts are judged against; a file of format 1 (before calibration) loads as uncalibrated: it can
still be scored, but never accuses.
"""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path
from typing import Any

import torch

from activeguard.audit import base
from activeguard.audit.calibration import Calibration
from activeguard.models.inputs import InputSpec

FORMAT = "activeguard-audit-fingerprint/2"
_UNCALIBRATED = "activeguard-audit-fingerprint/1"  # before calibrated verdicts: read as uncalibrated
_LEGACY_IPGUARD = "activeguard-ipguard/1"  # written by ipguard.Fingerprint.save


class FingerprintFileError(ValueError):
    """A fingerprint file is missing, empty, foreign, or of another kind; the message names the file."""


@dataclasses.dataclass
class FingerprintFile:
    kind: str
    fingerprint: Any
    meta: dict[str, Any]
    calibration: Calibration | None = None
    format: str = FORMAT

    @property
    def input_spec(self) -> InputSpec | None:
        """The owner's input spec as recorded (older files: the input shape alone; None if neither)."""
        recorded = self.meta.get("input_spec")
        if recorded:
            return InputSpec.from_dict(recorded)
        shape = self.meta.get("input_shape")
        return InputSpec(tuple(int(d) for d in shape)) if shape else None


def kinds() -> dict[str, type]:
    """Fingerprint class of every registered method (the file's ``kind`` is the method's name)."""
    return {name: method.fingerprint_type for name, method in base.methods().items()}


def kind_of(fingerprint: Any) -> str:
    known = kinds()
    for kind, cls in known.items():
        if type(fingerprint) is cls:
            return kind
    raise TypeError(f"{type(fingerprint).__name__} is not an audit fingerprint ({', '.join(known)})")


def _plain(value: Any, where: str) -> Any:
    """Check that ``value`` survives ``torch.load(weights_only=True)``; tensors are detached copies."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v, where) for v in value)
    if isinstance(value, dict):
        return {str(k): _plain(v, where) for k, v in value.items()}
    raise TypeError(f"{where} holds a {type(value).__name__}, which a fingerprint file cannot store")


def save(
    fingerprint: Any, path: str | Path, meta: dict[str, Any] | None = None, calibration: Calibration | None = None
) -> Path:
    """Write ``fingerprint`` (of any registered method), ``meta`` and its ``calibration`` to ``path``."""
    kind = kind_of(fingerprint)
    fields = {
        f.name: _plain(getattr(fingerprint, f.name), f"field {f.name!r}") for f in dataclasses.fields(fingerprint)
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "format": FORMAT,
            "kind": kind,
            "fields": fields,
            "meta": _plain(dict(meta or {}), "meta"),
            "calibration": None if calibration is None else _plain(calibration.to_plain(), "calibration"),
        },
        path,
    )
    return path


def load(path: str | Path, kind: str | None = None) -> FingerprintFile:
    """Read a fingerprint file; ``kind`` (if given) must match the stored kind."""
    path = Path(path)
    if not path.is_file():
        raise FingerprintFileError(f"fingerprint file {path} does not exist")
    if path.stat().st_size == 0:
        raise FingerprintFileError(f"fingerprint file {path} is empty")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # torch's message here advises loading unsafely: not ours to repeat
        raise FingerprintFileError(
            f"{path} is not an ActiveGuard fingerprint file: the weights-only loader cannot read it"
        ) from exc
    except Exception as exc:  # a truncated zip and the like
        raise FingerprintFileError(f"{path} is not an ActiveGuard fingerprint file: {base.error_reason(exc)}") from exc
    stored_format = data.get("format") if isinstance(data, dict) else None
    if stored_format == _LEGACY_IPGUARD:
        stored, fields, meta = "ipguard", {k: data[k] for k in ("points", "labels", "k", "method") if k in data}, {}
    elif stored_format in (FORMAT, _UNCALIBRATED):
        stored, fields, meta = data.get("kind"), data.get("fields"), data.get("meta") or {}
        if stored not in base.names() or not isinstance(fields, dict):
            raise FingerprintFileError(f"{path} holds an unknown fingerprint kind {stored!r}")
    else:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise FingerprintFileError(
            f"{path} is not an ActiveGuard fingerprint file (found {found!r}, expected format {FORMAT})"
        )
    if kind is not None and stored != kind:
        raise FingerprintFileError(f"{path} holds a {stored} fingerprint, not {kind}: use 'activeguard audit {stored}'")
    method = base.get(stored)
    cls = method.fingerprint_type
    fields = method.from_file(dict(fields), dict(meta))
    names = {f.name for f in dataclasses.fields(cls)}
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in fields and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise FingerprintFileError(
            f"{path} lacks the {stored} fingerprint field(s) {', '.join(missing)} (written by another version?)"
        )
    try:  # each fingerprint class checks its fields' types and shapes (base.check_field_types)
        fingerprint = cls(**{k: v for k, v in fields.items() if k in names})
    except (ValueError, TypeError) as exc:
        raise FingerprintFileError(f"{path}: {exc}") from exc
    calibration = None
    if stored_format == FORMAT and data.get("calibration") is not None:
        try:
            calibration = Calibration.from_plain(data["calibration"])
        except (ValueError, TypeError, KeyError) as exc:
            raise FingerprintFileError(f"{path}: its calibration is unreadable ({exc}): make it again") from exc
    return FingerprintFile(stored, fingerprint, dict(meta), calibration, str(stored_format))
