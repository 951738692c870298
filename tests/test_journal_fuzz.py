"""Property tests of the journal reader: a journal is a file on a serving host, so anything may be in it.

Whatever bytes a journal file holds (garbage, torn lines, well-formed entries with fields swapped for
any JSON), reading it never raises, never yields a malformed answer record, usage or alert entry, and
reading a growing file piece by piece yields exactly what one read of the whole file does.
Example counts are bounded and derandomized (``FUZZ_EXAMPLES`` raises them locally).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from activeguard.watermark.answers import Mark
from activeguard.watermark.journal import SUFFIX, AnswerRecord, answer_records, read_entries
from activeguard.watermark.traffic import SUSPEND, AlertEntry, UsageEntry
from tests.fuzzing import FUZZ

json_leaves = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
json_values = st.recursive(
    json_leaves,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
    max_leaves=12,
)


def _valid_entries() -> list[dict]:
    record = AnswerRecord.of("ab" * 32, "lic-1", "alice", torch.arange(6.0).reshape(2, 3), Mark(0, 4, 2, 7, 2, 0.03))
    usage = UsageEntry("ab" * 32, "lic-1", 12, {"expired": 2}, 1.0e9)
    return [record.to_entry(), usage.to_entry(), AlertEntry("ab" * 32, "lic-1", "prada", SUSPEND, 1.0e9).to_entry()]


@st.composite
def lines(draw) -> bytes:
    """One line of a journal: garbage, a well-formed entry, or one with a field replaced or removed."""
    choice = draw(st.integers(0, 3))
    if choice == 0:
        return draw(st.binary(max_size=80))
    entry = dict(draw(st.sampled_from(_valid_entries())))
    key = draw(st.sampled_from(sorted(entry)))
    if choice == 2:
        entry[key] = draw(json_values)
    elif choice == 3:
        del entry[key]
    return json.dumps(entry).encode()  # NaN and Infinity included, as Python writes them


journals = st.lists(lines(), max_size=8).map(b"\n".join) | st.binary(max_size=300)


def _check_record(r: AnswerRecord) -> None:
    assert all(isinstance(s, str) for s in (r.model_id, r.license_id, r.user)) and r.model_id and r.license_id
    assert len(r.model_id) <= 64 and len(r.license_id) <= 64 and len(r.user) <= 256
    assert r.shape and all(type(d) is int and d >= 1 for d in r.shape)
    assert len(r.values) == 4 * math.prod(r.shape) and tuple(r.tensor().shape) == r.shape
    labels = (r.owner_label, r.runner_up, r.third, r.label)
    assert all(type(v) is int for v in labels) and min(labels[:2] + labels[3:]) >= 0 and r.third >= -1
    assert math.isfinite(r.margin) and r.margin >= 0 and math.isfinite(r.at) and r.at >= 0


def _check_entry(entry: dict) -> None:
    """Each reader takes any entry (of any kind): it returns a well-formed one or raises ValueError."""
    for reader in (UsageEntry.from_entry, AlertEntry.from_entry):
        try:
            parsed = reader(entry)
        except ValueError:
            continue
        assert parsed.license_id and len(parsed.license_id) <= 64 and math.isfinite(parsed.at)
        if isinstance(parsed, UsageEntry):
            assert type(parsed.served) is int and parsed.served >= 0
            assert all(isinstance(k, str) and type(v) is int and v >= 0 for k, v in parsed.refused.items())


@FUZZ
@given(data=journals, cut=st.integers(0, 400))
def test_any_journal_bytes_read_safely(tmp_path, data: bytes, cut: int):
    path = tmp_path / f"fuzz{SUFFIX}"
    path.write_bytes(data)
    offset = min(cut, len(data))
    entries, end = read_entries(path, offset)
    assert offset <= end <= len(data) and (end == offset or data[end - 1 : end] == b"\n")
    assert all(isinstance(e, dict) for e in entries)
    for entry in read_entries(path)[0]:
        _check_entry(entry)
    for record in answer_records(tmp_path):
        _check_record(record)


@FUZZ
@given(data=journals, pieces=st.lists(st.integers(1, 60), max_size=10))
def test_a_growing_journal_reads_as_a_whole(tmp_path, data: bytes, pieces: list[int]):
    """Written in arbitrary pieces (torn lines between reads), read from the returned offsets: the same
    entries as one read of the finished file, each once."""
    path = tmp_path / f"grow{SUFFIX}"
    path.write_bytes(b"")
    seen, offset, written = [], 0, 0
    for size in [*pieces, len(data)]:
        with open(path, "ab") as f:
            f.write(data[written : written + size])
        written = min(len(data), written + size)
        entries, offset = read_entries(path, offset)
        seen.extend(entries)
    assert seen == read_entries(path)[0]


def test_an_overlong_line_is_skipped_in_bounded_reads(tmp_path, monkeypatch):
    from activeguard.watermark import journal

    monkeypatch.setattr(journal, "MAX_LINE_BYTES", 100)
    good = b'{"kind":"usage"}'
    path = tmp_path / f"long{SUFFIX}"
    path.write_bytes(b"x" * 500 + b"\n" + good + b"\n")
    entries, offset = read_entries(path, 0, max_bytes=101)
    assert (entries, offset) == ([], 501)
    entries, offset = read_entries(path, offset, max_bytes=101)
    assert entries == [json.loads(good)] and offset == path.stat().st_size
    with pytest.raises(ValueError):
        read_entries(path, 0, max_bytes=100)
