"""The answer journal: what the extraction audit needs, written where no worker restart loses it.

Each TorchServe worker appends to its own file (host, process and a random suffix in the name, so
replicas and restarted workers never share one) in a directory the license server ingests. One
line per entry, JSON; a batch's entries are written with one ``write`` and made durable
(``fsync``) before the batch is answered, so a record exists for every watermarked answer a client
received. A reader skips a torn last line (a worker killed mid-write) and anything unreadable.

Entries (``kind``):

* ``answer``: an answer in the watermark's band (:class:`AnswerRecord`): the license, the input as the
  model saw it (float32, zlib-compressed), the model's top three classes and the label returned.
  Inputs may be the users' own data: only those in the band (where the model is unsure; a few percent
  of natural queries) are kept, for as long as the license server's retention setting says.
* ``usage``: rows served and refused per license since the last entry;
* ``alert``: the extraction monitor flagged a license (both: :mod:`activeguard.watermark.traffic`).

The license server ingests the files (``--answer-journal``) into its database, where the audit reads
the answer records too (:mod:`activeguard.watermark.record_store`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import os
import secrets
import socket
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from activeguard.watermark import fields
from activeguard.watermark.answers import Mark

logger = logging.getLogger(__name__)

SUFFIX = ".agjournal"
MAX_LINE_BYTES = 16 * 1024 * 1024  # a line longer than this is not ours
MAX_DIMS = 8
MAX_INPUT_VALUES = 16 * 1024 * 1024  # float32 values of one recorded input (64 MiB)
MAX_CLASS = 2**31 - 1  # class indices: INTEGER columns in the record store


@dataclass(frozen=True)
class AnswerRecord:
    """One answer in the watermark's band, as the audit replays it."""

    model_id: str
    license_id: str
    user: str
    shape: tuple[int, ...]
    values: bytes  # the input row, float32 little-endian, C order
    owner_label: int  # the model's top class
    runner_up: int
    third: int  # -1 for a two-class model
    label: int  # what the license's client was told
    margin: float  # the model's log-probability margin of its top class over the runner-up
    at: float

    @property
    def input_sha256(self) -> str:
        return hashlib.sha256(self.values).hexdigest()

    @property
    def record_id(self) -> str:
        """The same answer written twice (a replayed journal, two replicas) is one record."""
        key = f"{self.model_id}/{self.license_id}/{self.input_sha256}"
        return hashlib.sha256(key.encode()).hexdigest()

    def tensor(self) -> torch.Tensor:
        return torch.from_numpy(np.frombuffer(self.values, dtype="<f4").copy().reshape(self.shape))

    @classmethod
    def of(cls, model_id: str, license_id: str, user: str, row: torch.Tensor, mark: Mark) -> AnswerRecord:
        """A record of ``row``, answered as ``mark`` says."""
        values = np.ascontiguousarray(row.detach().to("cpu", torch.float32).numpy(), dtype="<f4")
        classes = (mark.owner_label, mark.runner_up, mark.third, mark.label, mark.margin)
        return cls(model_id, license_id, user, tuple(values.shape), values.tobytes(), *classes, time.time())

    def to_entry(self) -> dict[str, Any]:
        return {
            "kind": "answer",
            "model_id": self.model_id,
            "license_id": self.license_id,
            "user": self.user,
            "shape": list(self.shape),
            "input": base64.b64encode(pack_input(self.values)).decode("ascii"),
            "owner_label": self.owner_label,
            "runner_up": self.runner_up,
            "third": self.third,
            "label": self.label,
            "margin": round(self.margin, 6),
            "at": self.at,
        }

    @classmethod
    def from_entry(cls, entry: dict[str, Any]) -> AnswerRecord:
        """A record from its journal entry; ValueError when it is not a well-formed one."""
        try:
            shape = input_shape(entry.get("shape"))
            packed = base64.b64decode(fields.text(entry, "input", MAX_LINE_BYTES), validate=True)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"not an answer record: {exc}") from None
        return cls(
            fields.text(entry, "model_id"),
            fields.text(entry, "license_id"),
            fields.text(entry, "user", fields.MAX_TEXT, required=False),
            shape,
            unpack_input(packed, shape),
            fields.integer(entry, "owner_label", 0, MAX_CLASS),
            fields.integer(entry, "runner_up", 0, MAX_CLASS),
            fields.integer(entry, "third", -1, MAX_CLASS),
            fields.integer(entry, "label", 0, MAX_CLASS),
            fields.number(entry, "margin", 0.0),
            fields.number(entry, "at", 0.0),
        )


def input_shape(value: Any) -> tuple[int, ...]:
    """A recorded input's shape: 1 to :data:`MAX_DIMS` positive sizes, at most :data:`MAX_INPUT_VALUES` values."""
    if not isinstance(value, list | tuple) or not 1 <= len(value) <= MAX_DIMS:
        raise ValueError(f"shape is not a list of 1 to {MAX_DIMS} sizes")
    shape = tuple(fields.integer({"size": d}, "size", 1, MAX_INPUT_VALUES) for d in value)
    if math.prod(shape) > MAX_INPUT_VALUES:
        raise ValueError(f"an input of more than {MAX_INPUT_VALUES} values")
    return shape


def pack_input(values: bytes) -> bytes:
    """An input row as it is kept (journal and record store): its float32 bytes, zlib-compressed."""
    return zlib.compress(values, 6)


def unpack_input(packed: bytes, shape: tuple[int, ...]) -> bytes:
    """The float32 bytes of a packed input of ``shape``; ValueError unless exactly that many come out
    (never inflating more than one byte past it, so a zlib bomb costs nothing)."""
    expected = 4 * math.prod(shape)
    inflater = zlib.decompressobj()
    try:
        values = inflater.decompress(packed, expected + 1)
    except zlib.error as exc:
        raise ValueError(f"an unreadable input: {exc}") from None
    if len(values) != expected or not inflater.eof or inflater.unused_data:
        raise ValueError("an answer record whose input does not match its shape")
    return values


class JournalWriter:
    """Appends entries to this process's own journal file; durable before :meth:`write` returns."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        name = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}{SUFFIX}"
        self.path = self.directory / name
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)  # users' inputs: owner-only
        self._file = os.fdopen(fd, "ab")

    def write(self, entries: list[dict[str, Any]]) -> None:
        if not entries:
            return
        data = b"".join(json.dumps(e, separators=(",", ":")).encode() + b"\n" for e in entries)
        self._file.write(data)
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def journal_files(directory: str | Path) -> list[Path]:
    """Every journal file of a directory, oldest name first (a missing directory has none)."""
    root = Path(directory)
    return sorted(root.glob(f"*{SUFFIX}")) if root.is_dir() else []


def read_entries(path: str | Path, offset: int = 0, max_bytes: int | None = None) -> tuple[list[dict[str, Any]], int]:
    """Complete entries of one journal file from byte ``offset``, and the offset after the last one
    read (a torn last line is left for the next read; an unreadable line is skipped and logged).

    ``max_bytes`` bounds what one call reads (a backlog is then read in several calls); it must exceed
    :data:`MAX_LINE_BYTES`, so that a chunk without a line end is a line that is not ours, skipped."""
    if max_bytes is not None and max_bytes <= MAX_LINE_BYTES:
        raise ValueError(f"max_bytes must exceed {MAX_LINE_BYTES}")
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(-1 if max_bytes is None else max_bytes)
        end = data.rfind(b"\n") + 1
        if end == 0 and max_bytes is not None and len(data) == max_bytes:
            logger.warning("skipped an overlong line of journal %s", path)
            return [], _next_line(f, offset, offset + len(data))
    entries = []
    for line in data[:end].splitlines():
        entry = _entry(line)
        if entry is None and line.strip():
            logger.warning("skipped an unreadable line of journal %s", path)
        elif entry is not None:
            entries.append(entry)
    return entries, offset + end


def _entry(line: bytes) -> dict[str, Any] | None:
    """One line's entry; None for a blank, overlong or unreadable line, or JSON that is not an object."""
    if len(line) > MAX_LINE_BYTES:
        return None
    try:
        entry = json.loads(line)
    except (ValueError, RecursionError):  # RecursionError: JSON nested deeper than Python's stack
        return None
    return entry if isinstance(entry, dict) else None


def _next_line(f: Any, start: int, position: int) -> int:
    """The offset after the first line end at or past ``position``; ``start`` when there is none yet
    (the overlong line is still being written: it is skipped on a later read)."""
    f.seek(position)
    while chunk := f.read(1024 * 1024):
        found = chunk.find(b"\n")
        if found >= 0:
            return position + found + 1
        position += len(chunk)
    return start


def answers_in(entries: Iterable[dict[str, Any]], source: str | Path = "a journal") -> Iterator[AnswerRecord]:
    """The well-formed answer records among ``entries`` (others are skipped; a malformed one is logged)."""
    for entry in entries:
        if entry.get("kind") != "answer":
            continue
        try:
            yield AnswerRecord.from_entry(entry)
        except ValueError as exc:
            logger.warning("skipped a record of %s: %s", source, exc)


def answer_records(
    directory: str | Path, model_id: str | None = None, license_id: str | None = None
) -> Iterator[AnswerRecord]:
    """The answer records of every journal in ``directory`` (of one model and/or license when given),
    each once."""
    seen: set[str] = set()
    for path in journal_files(directory):
        for record in answers_in(read_entries(path)[0], path):
            if model_id is not None and record.model_id != model_id:
                continue
            if (license_id is None or record.license_id == license_id) and record.record_id not in seen:
                seen.add(record.record_id)
                yield record
