"""The answer watermark and its journal, applied to what the guard admits.

Every admitted answer with a license behind it (a license, or a gateway session, which names its
license) goes through that license's watermark: an answer in the band gets the class the license's
key prefers, by swapping the model's two top classes where needed (:mod:`activeguard.watermark.answers`),
and becomes a record in the journal (:mod:`activeguard.watermark.journal`), written before the
batch is answered.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from activeguard.watermark.answers import AnswerWatermark, load_secret_file
from activeguard.watermark.journal import AnswerRecord, JournalWriter

if TYPE_CHECKING:
    from activeguard.guard.front import FrontEnd
    from activeguard.guard.profile import Profile


class AnswerStamp:
    """Marks the answers of one worker and journals them; :meth:`flush` once per batch."""

    def __init__(self, profile: Profile, watermark: AnswerWatermark, journal: JournalWriter):
        self.model_id, self.watermark, self.journal = profile.model_id, watermark, journal
        self._pending: list[dict[str, Any]] = []

    @classmethod
    def from_profile(cls, profile: Profile, journal: JournalWriter | None = None) -> AnswerStamp | None:
        """The profile's stamp; None when its answer watermark is off. Raises (the worker does not
        start) when the key file is missing or unsafe, or the journal cannot be written. ``journal``:
        the worker's journal, when the guard already opened it."""
        if not profile.answer_watermark_margin:
            return None
        secret = load_secret_file(profile.answer_key_file)
        watermark = AnswerWatermark(secret, profile.answer_watermark_margin, profile.num_classes)
        return cls(profile, watermark, journal or JournalWriter(profile.answer_journal_dir))

    def apply(self, raw: Any, rows: torch.Tensor, license_id: str, user: str, front: FrontEnd) -> Any:
        """The answer to return for ``rows`` (model input) whose model output is ``raw``."""
        logits = front.logits(raw)
        marks = self.watermark.marks(license_id, logits)
        if not marks:
            return raw
        for m in marks:
            self._pending.append(AnswerRecord.of(self.model_id, license_id, user, rows[m.row], m).to_entry())
        if all(m.label == m.owner_label for m in marks):
            return raw
        return front.permuted(raw, self.watermark.swap_index(marks, len(logits)))

    def take(self) -> list[dict[str, Any]]:
        """This batch's records, for the guard to write with the batch's other entries."""
        entries, self._pending = self._pending, []
        return entries

    def flush(self) -> None:
        """Make this batch's records durable (before any of its answers leaves the worker)."""
        self.journal.write(self.take())
