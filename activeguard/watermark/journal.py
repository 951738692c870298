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
* ``usage``: rows served and refused per license since the last entry.
* ``alert``: the extraction monitor flagged a license.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import secrets
import socket
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from activeguard.watermark.answers import Mark

logger = logging.getLogger(__name__)

SUFFIX = ".agjournal"
MAX_LINE_BYTES = 16 * 1024 * 1024  # a line longer than this is not ours


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
            "input": base64.b64encode(zlib.compress(self.values, 6)).decode("ascii"),
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
            shape = tuple(int(d) for d in entry["shape"])
            values = zlib.decompress(base64.b64decode(entry["input"], validate=True), bufsize=4 * int(np.prod(shape)))
            record = cls(
                str(entry["model_id"]),
                str(entry["license_id"]),
                str(entry["user"]),
                shape,
                values,
                int(entry["owner_label"]),
                int(entry["runner_up"]),
                int(entry["third"]),
                int(entry["label"]),
                float(entry["margin"]),
                float(entry["at"]),
            )
        except (KeyError, TypeError, ValueError, zlib.error) as exc:
            raise ValueError(f"not an answer record: {exc}") from None
        if any(d <= 0 for d in shape) or len(values) != 4 * int(np.prod(shape)):
            raise ValueError("an answer record whose input does not match its shape")
        return record


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


def read_entries(path: str | Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Complete entries of one journal file from byte ``offset``, and the offset after the last one
    read (a torn last line is left for the next read; an unreadable line is skipped and logged)."""
    entries: list[dict[str, Any]] = []
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1
    for line in data[:end].splitlines():
        if not line.strip() or len(line) > MAX_LINE_BYTES:
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            logger.warning("skipped an unreadable line of journal %s", path)
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries, offset + end


def answer_records(directory: str | Path, model_id: str | None = None) -> Iterator[AnswerRecord]:
    """The answer records of every journal in ``directory`` (of one model when ``model_id`` is given),
    each once."""
    seen: set[str] = set()
    for path in journal_files(directory):
        for entry in read_entries(path)[0]:
            if entry.get("kind") != "answer":
                continue
            try:
                record = AnswerRecord.from_entry(entry)
            except ValueError as exc:
                logger.warning("skipped a record of %s: %s", path, exc)
                continue
            if (model_id is None or record.model_id == model_id) and record.record_id not in seen:
                seen.add(record.record_id)
                yield record
