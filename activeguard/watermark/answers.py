"""A per-license answer watermark that a surrogate learns: a keyed tilt of the model's decision boundaries.

A licensed user who queries the API to train a surrogate learns whatever the API answers. DAWN
(Szyller et al. 2021) changes the answer for a keyed fraction of inputs, each on its own; measured
here, a surrogate trained for 10 epochs on 6,000 answers reproduced 2 of 68 such labels, and the
best exact test over those inputs reached p ≈ 5e-3: isolated flipped labels are noise that training
smooths away. What a surrogate does learn is where the model's boundaries lie. So, per license:

* an answer is in the **band** when the model's runner-up class is close to its top class (log
  probability margin below ``margin``; ln 3 by default: the runner-up has at least a third of the top's
  probability), where the model itself is unsure;
* in the band, the answer is whichever of the two classes the license's key **prefers** for that
  pair of classes and the model's third-ranked class: the boundary between the two is pushed one way
  or the other, consistently over a whole region of inputs, which is what a surrogate picks up;
* the returned probabilities are the model's own with the two top classes swapped where the
  preferred class is the runner-up, so they are consistent with the returned label, and the same
  input always gets the same answer.

The preference is one bit of an HMAC under the license's own key (itself an HMAC of the owner's
secret and the license id), so two licenses' tilts are independent and a model that never learnt from
a license's answers is as likely to lean either way in every group: the extraction audit's null is
exact (:mod:`activeguard.audit.extraction`). Changed answers are near-ties, so licensed users lose
little accuracy (measured: docs/results.md, "Extraction"). Determinism holds for bit-identical model
outputs; a batch that changes the last bits of an output changes an answer only where two of the
model's top three scores tie to within that noise.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import secrets
from dataclasses import dataclass
from pathlib import Path

import torch

from activeguard.runtime.private_files import PrivateFileError, read_private, write_private

DEFAULT_MARGIN = math.log(
    3
)  # the band: runner-up probability at least a third of the top's (measured: docs/results.md)
MIN_SECRET_BYTES = 32
KEY_CACHE = 4096  # per-license keys a worker remembers


@dataclass(frozen=True)
class Mark:
    """One answer in the band: its row in the request, the model's top three classes and the label returned."""

    row: int
    owner_label: int
    runner_up: int
    third: int  # -1 for a two-class model
    label: int
    margin: float  # the model's log-probability margin of its top class over the runner-up


def group_of(owner_label: int, runner_up: int, third: int) -> tuple[int, int, int]:
    """The region a preference covers: the pair of classes (either order) and the third-ranked class."""
    return (min(owner_label, runner_up), max(owner_label, runner_up), third)


class AnswerWatermark:
    """Decides, per license and model output, which answers are tilted and how."""

    def __init__(self, secret: bytes, margin: float = DEFAULT_MARGIN, num_classes: int = 10):
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"the answer watermark secret must be at least {MIN_SECRET_BYTES} bytes")
        if not (math.isfinite(margin) and margin > 0):
            raise ValueError(f"the answer watermark margin must be a positive number of nats, got {margin}")
        if num_classes < 2:
            raise ValueError("the answer watermark needs at least 2 classes")
        self._secret, self.margin, self.num_classes = secret, float(margin), int(num_classes)
        self._keys: dict[str, bytes] = {}

    def license_key(self, license_id: str) -> bytes:
        """The license's own key: knowing it tilts nobody else's answers."""
        key = self._keys.get(license_id)
        if key is None:
            key = hmac.new(self._secret, b"answer-watermark/" + license_id.encode(), hashlib.sha256).digest()
            if len(self._keys) >= KEY_CACHE:
                self._keys.clear()
            self._keys[license_id] = key
        return key

    def preferred(self, license_id: str, group: tuple[int, int, int]) -> int:
        """The class of the group's pair that this license's answers lean to."""
        lo, hi, third = group
        digest = hmac.new(self.license_key(license_id), f"tilt/{lo}/{hi}/{third}".encode(), hashlib.sha256).digest()
        return hi if digest[0] & 1 else lo

    def marks(self, license_id: str, logits: torch.Tensor) -> list[Mark]:
        """Every answer of one request in the band, with the label to return (model logits, one row each)."""
        scores = torch.log_softmax(logits.detach().float().cpu(), 1)
        k = min(3, scores.shape[1])
        values, classes = scores.topk(k, dim=1)
        band = (values[:, 0] - values[:, 1]) < self.margin
        found = []
        for i in torch.nonzero(band).flatten().tolist():
            top, runner_up = int(classes[i, 0]), int(classes[i, 1])
            third = int(classes[i, 2]) if k > 2 else -1
            label = self.preferred(license_id, group_of(top, runner_up, third))
            found.append(Mark(i, top, runner_up, third, label, float(values[i, 0] - values[i, 1])))
        return found

    def swap_index(self, marks: list[Mark], rows: int) -> torch.Tensor:
        """Per row, the class order that swaps each mark's top class and returned label (identity elsewhere)."""
        index = torch.arange(self.num_classes).repeat(rows, 1)
        for m in marks:
            index[m.row, m.owner_label], index[m.row, m.label] = m.label, m.owner_label
        return index


KEY_FORMAT = "activeguard-answer-key/1"


def create_secret_file(path: str | Path) -> None:
    """A new owner secret in a fresh 0600 file (refuses to overwrite: the audit needs the old one)."""
    document = {"format": KEY_FORMAT, "secret": secrets.token_hex(MIN_SECRET_BYTES)}
    try:
        write_private(path, json.dumps(document).encode())
    except FileExistsError:
        raise PrivateFileError(f"{path} already exists; refusing to overwrite an answer watermark key") from None


def load_secret_file(path: str | Path) -> bytes:
    """The owner secret of an answer watermark key file (0600; never logged)."""
    raw = read_private(path, "answer watermark key")
    try:
        document = json.loads(raw)
        if document.get("format") != KEY_FORMAT:
            raise ValueError
        secret = bytes.fromhex(document["secret"])
    except (ValueError, KeyError, TypeError, AttributeError):
        raise PrivateFileError(f"{path} is not an answer watermark key file ({KEY_FORMAT})") from None
    if len(secret) < MIN_SECRET_BYTES:
        raise PrivateFileError(f"{path} holds a secret shorter than {MIN_SECRET_BYTES} bytes")
    return secret
