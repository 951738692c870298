"""Fingerprint files are evidence in an ownership dispute: an edited or damaged one must be refused with
a :class:`FingerprintFileError` naming what is wrong, whatever a field was replaced with."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from activeguard.audit import base, conferrable, files, ipguard, tafa
from activeguard.models.architectures import MLPRegressor


@functools.cache
def _fingerprints() -> dict[str, object]:
    """One small fingerprint of each kind (TAFA's from a real LP boundary search on an untrained MLP)."""
    points, labels = torch.rand(4, 1, 6, 6), torch.tensor([0, 1, 2, 1])
    torch.manual_seed(0)
    return {
        "ipguard": ipguard.Fingerprint(points, labels, 3.0, "TL"),
        "cem": conferrable.CemFingerprint(points, labels, torch.rand(4), 0.85, 2),
        "tafa": tafa.generate(MLPRegressor(in_features=10), 4, (10,), solver="lp", seed=0),
    }


_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.lists(st.integers(0, 9), max_size=4),
    st.lists(st.integers(0, 5), max_size=4).map(lambda shape: torch.zeros(shape)),
    st.lists(st.integers(0, 5), max_size=3).map(lambda shape: torch.ones(shape, dtype=torch.int64)),
)


@settings(max_examples=300, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["ipguard", "cem", "tafa"]), data=st.data(), value=_VALUES)
def test_any_edited_field_loads_or_is_refused_with_a_file_error(kind, data, value):
    fingerprint = _fingerprints()[kind]
    path = Path(tempfile.mkdtemp()) / f"edited.{kind}"
    files.save(fingerprint, path)
    stored = torch.load(path, weights_only=True)
    field = data.draw(st.sampled_from(sorted(stored["fields"])), label="field")
    stored["fields"][field] = value
    torch.save(stored, path)
    try:
        loaded = files.load(path, kind).fingerprint
    except files.FingerprintFileError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc)
        return
    # what loads can be scored: a verdict, or a ValueError the CLI reports in one line, never a crash
    method, suspect = base.get(kind), _suspects()[kind]
    try:
        score = method.score(loaded, suspect, num_classes=3)
    except ValueError:
        return
    assert 0.0 <= score.value <= 1.0 or score.value != score.value  # a probability, or NaN from NaN fields


@functools.cache
def _suspects() -> dict[str, torch.nn.Module]:
    torch.manual_seed(1)
    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 3)).eval()
    return {"ipguard": classifier, "cem": classifier, "tafa": MLPRegressor(in_features=10).eval()}
