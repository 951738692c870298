"""Digit watermark in layer weights for ownership verification (ActiveGuard §2.5, Eq. 4).

Fingerprints cannot tell the owner from an authorized user, so the owner also hides an n-digit
watermark (digits 0-9) in the weights: n secret positions of one of the larger-norm output
filters of a layer (a conv layer in the paper) are pulled, during fine-tuning or training, towards values that a linear
map d = a·h + b turns into the digits (MSE regularizer λ·mean((d_k − map(v_k))²) added to the task
loss). Extraction rounds map(v) at the same positions of a suspect model.

The map follows the paper, which sends the layer's weight range [0.10, 0.45] to [0, 9]; here the
range is taken from the positive magnitudes, lo = median |W| and hi = max |W|. Digits ≥ 3
therefore sit on large weights that survive magnitude pruning, while digits 0-2 sit near the
pruning threshold (the paper's wm2 vs. wm1 observation).

Any layer weight of two or more dimensions can carry the mark: a Linear layer's matrix, a Conv1d,
Conv2d or Conv3d kernel (a "filter" is one output unit's row or kernel). The default is the conv weight
with the most parameters, else the largest matrix (:func:`activeguard.models.sources.default_watermark_layer`,
``conv2.weight`` for LeNet-5). Every function
here takes either a plain network or a :class:`activeguard.models.inputs.ClientView` (what
``sources.load`` returns as ``.model``): weights are looked up on the owner's own network
(``network_of``), so layer names are the owner's (``layer1.0.conv1.weight``) whatever the source,
while training runs through the view (the client's inputs, normalization included).

Extraction deliberately does **not** clamp to 0-9: a pruned (zeroed) or foreign weight reads as
whatever the map gives (often negative) and never matches a digit by accident.

The key (layer, filter, positions, a, b, digits) is the owner's secret: whoever knows the filter
and positions can overwrite exactly those weights and erase the mark at almost no accuracy cost.
``generate_key`` therefore draws them from the OS CSPRNG (``secrets``); an ``experiment_seed``
exists only to make experiments reproducible, and makes the key guessable. ``save_key`` writes the
key encrypted (scrypt → AES-256-GCM) to a 0600 file. Nothing here logs or prints key contents.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import random
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from activeguard.models.architectures import train
from activeguard.models.inputs import network_of
from activeguard.models.sources import default_watermark_layer, watermark_layers
from activeguard.watermark.alignment import align_layer, aligned_weight

WM1: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 2, 1, 0)
WM2: tuple[int, ...] = (3, 8, 7, 6, 8, 7, 6, 9, 9, 4, 8, 6, 5)
DEFAULT_LAMBDA = 0.01
CHANCE_PER_DIGIT = 0.1
# A graded verdict: verified when an unmarked model would match as many digits with probability at
# most this (13 digits: 9 or more; 12 of 13 after heavy fine-tuning is 1.2e-11, verified).
CHANCE_THRESHOLD = 1e-6
# The filter is drawn from the upper half by norm: low-norm filters are the first that filter
# pruning removes, and half of a layer's filters are too many for an attacker who cannot guess the
# key to overwrite without hurting the model.
FILTER_CANDIDATE_FRACTION = 0.5

KEY_FILE_FORMAT = "activeguard-watermark-key/1"
_KEY_PAYLOAD_FORMAT = "activeguard-watermark-key-payload/1"
_SCRYPT = {"n": 2**15, "r": 8, "p": 1}
_SALT_BYTES = 16
_NONCE_BYTES = 12
# Bounds on KDF parameters read from a file, so a forged file cannot ask for absurd memory/time.
_SCRYPT_MAX = {"n": 2**20, "r": 32, "p": 16}


class WatermarkKeyError(Exception):
    """A key file cannot be opened: wrong passphrase, tampering, corruption or wrong format."""


@dataclass(frozen=True)
class WatermarkKey:
    """Secret needed to extract the watermark. ``positions`` index ``W[filter].reshape(-1)``."""

    layer: str
    filter: int
    positions: tuple[int, ...]
    a: float
    b: float
    digits: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "positions", tuple(_check_int(p, "position") for p in self.positions))
        object.__setattr__(self, "digits", tuple(_check_digits(self.digits)))
        if not isinstance(self.layer, str) or not self.layer:
            raise ValueError("layer must be a non-empty parameter name such as 'conv2.weight'")
        if _check_int(self.filter, "filter") < 0:
            raise ValueError(f"filter index must be >= 0, got {self.filter}")
        if len(self.positions) != len(self.digits):
            raise ValueError(f"{len(self.positions)} positions for {len(self.digits)} digits")
        if len(set(self.positions)) != len(self.positions) or min(self.positions) < 0:
            raise ValueError("positions must be distinct non-negative indices")
        for name in ("a", "b"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number")
            object.__setattr__(self, name, float(value))
        if self.a == 0.0:
            raise ValueError("a must be non-zero")

    def map(self, h: torch.Tensor) -> torch.Tensor:
        """d = a·h + b."""
        return self.a * h + self.b

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "filter": self.filter,
            "positions": list(self.positions),
            "a": self.a,
            "b": self.b,
            "digits": list(self.digits),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WatermarkKey:
        fields = ("layer", "filter", "positions", "a", "b", "digits")
        if not isinstance(data, dict) or set(data) != set(fields):
            raise ValueError(f"a watermark key needs exactly the fields {', '.join(fields)}")
        return cls(**{name: data[name] for name in fields})

    def __repr__(self) -> str:  # never show the secret in logs or tracebacks
        return f"WatermarkKey(layer={self.layer!r}, n={len(self.digits)}, <secret>)"


@dataclass(frozen=True)
class WatermarkResult:
    """Outcome of ``verify``. ``chance_probability``: P(unmarked model matches ≥ matched digits);
    ``success``: that probability is at most ``threshold``. ``aligned``: the suspect's channels were
    matched to the owner's first (``alignment_similarity``: the activation cosine of the suspect
    filter matched to the watermarked one, 1.0 for an unchanged or purely permuted/rescaled copy)."""

    success: bool
    matched: int
    total: int
    extracted: list[int] = field(repr=False)
    chance_probability: float
    threshold: float = CHANCE_THRESHOLD
    aligned: bool = False
    alignment_similarity: float | None = None

    def explanation(self) -> str:
        """The evidence in one line: digits, chance, threshold and alignment."""
        text = (
            f"{self.matched}/{self.total} digits match (an unmarked model matches that many with probability "
            f"{self.chance_probability:.2g}; verified at <= {self.threshold:g})"
        )
        if self.aligned:
            text += f"; aligned to the owner's model (cosine {self.alignment_similarity:.3f})"
        return text


def _check_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{what} must be an int, got {type(value).__name__}")
    return int(value)


def _check_digits(digits: Sequence[int]) -> list[int]:
    if isinstance(digits, (str, bytes)):
        raise ValueError("digits must be a sequence of ints 0-9, not a string")
    out = [_check_int(d, "digit") for d in digits]
    if not out:
        raise ValueError("digits must not be empty")
    bad = [d for d in out if not 0 <= d <= 9]
    if bad:
        raise ValueError(f"digits must be in 0..9, got {bad}")
    return out


def _layer_weight(model: nn.Module, layer: str) -> torch.Tensor:
    """The named weight (two or more dimensions) of the owner's network (through a ClientView), as a
    live parameter."""
    params = dict(network_of(model).named_parameters())
    if layer not in params:
        layers = [w.name for w in watermark_layers(network_of(model))]
        raise ValueError(f"model has no parameter {layer!r}; layer weights: {', '.join(layers) or 'none'}")
    weight = params[layer]
    if weight.dim() < 2:
        raise ValueError(
            f"{layer!r} has shape {tuple(weight.shape)}; the watermark needs a weight of two or more dimensions"
        )
    return weight


def _target_weights(model: nn.Module, key: WatermarkKey) -> torch.Tensor:
    """The watermarked weights v (differentiable); ValueError if the suspect's layer does not fit."""
    weight = _layer_weight(model, key.layer)
    size = int(np.prod(weight.shape[1:]))
    if key.filter >= weight.shape[0] or max(key.positions) >= size:
        raise ValueError(
            f"{key.layer!r} has shape {tuple(weight.shape)}, which does not fit the key (different architecture?)"
        )
    index = torch.tensor(key.positions, dtype=torch.long, device=weight.device)
    return weight[key.filter].reshape(-1)[index]


def _key_rng(experiment_seed: int | None = None) -> random.Random:
    """The OS CSPRNG for real keys; a seeded (hence guessable) generator only for experiments."""
    return secrets.SystemRandom() if experiment_seed is None else random.Random(experiment_seed)


def candidate_filters(weight: torch.Tensor) -> list[int]:
    """Indices of the upper ``FILTER_CANDIDATE_FRACTION`` of a layer weight's filters (rows) by L2 norm."""
    norms = weight.detach().float().flatten(1).norm(dim=1)
    count = max(1, math.ceil(FILTER_CANDIDATE_FRACTION * len(norms)))
    return sorted(int(i) for i in norms.argsort(descending=True)[:count])


def _assign_by_rank(positions: Sequence[int], values: torch.Tensor, digits: Sequence[int]) -> tuple[int, ...]:
    """Give the larger digits to the positions with the larger weights (result[i] carries digits[i]).

    The set of positions is the secret; within it, this rank matching moves the weights least
    towards their targets (the map is increasing), so embedding changes the model less and
    converges within the default epochs. A random matching can ask a negative weight to become
    max |W| (digit 9), which 15 epochs at λ = 0.01 do not always manage.
    """
    by_value = sorted(positions, key=lambda p: float(values[p]))
    by_digit = sorted(range(len(digits)), key=lambda i: digits[i])
    assigned = [0] * len(digits)
    for index, position in zip(by_digit, by_value):
        assigned[index] = position
    return tuple(assigned)


def generate_key(
    model: nn.Module,
    digits: Sequence[int],
    layer: str | None = None,
    *,
    experiment_seed: int | None = None,
) -> WatermarkKey:
    """Draw a large-norm filter and n positions, and map [median|W|, max|W|] → [0, 9].

    ``layer`` names a weight (two or more dimensions) of the owner's network; None takes
    ``sources.default_watermark_layer``.

    Filter and positions come from the OS CSPRNG, so nobody can recompute them. Pass
    ``experiment_seed`` only for reproducible experiments: anyone who knows or guesses it can
    recompute the key.
    """
    digits = _check_digits(digits)
    if layer is None:
        layer = default_watermark_layer(network_of(model))
    with torch.no_grad():
        weight = _layer_weight(model, layer).detach().float().cpu()
        size = int(np.prod(weight.shape[1:]))
        if len(digits) > size:
            raise ValueError(f"{len(digits)} digits but a filter of {layer!r} has only {size} positions")
        magnitudes = weight.abs().flatten()
        lo, hi = float(magnitudes.median()), float(magnitudes.max())
    if not hi > lo:
        raise ValueError(f"{layer!r} has no weight spread (median |W| = max |W|); train the model first")
    rng = _key_rng(experiment_seed)
    filter_index = rng.choice(candidate_filters(weight))
    chosen = rng.sample(range(size), len(digits))
    return WatermarkKey(
        layer=layer,
        filter=filter_index,
        positions=_assign_by_rank(chosen, weight[filter_index].reshape(-1), digits),
        a=9.0 / (hi - lo),
        b=-9.0 * lo / (hi - lo),
        digits=tuple(digits),
    )


def regularizer(key: WatermarkKey, lam: float = DEFAULT_LAMBDA) -> Callable[[nn.Module], torch.Tensor]:
    """Eq. 4's extra term λ·mean((d_k − map(v_k))²), as a callable for ``models.train``."""
    if not lam > 0:
        raise ValueError(f"lam must be > 0, got {lam}")

    def term(model: nn.Module) -> torch.Tensor:
        v = _target_weights(model, key)
        target = torch.tensor(key.digits, dtype=v.dtype, device=v.device)
        return lam * torch.mean((target - key.map(v)) ** 2)

    return term


def embed(
    model: nn.Module,
    key: WatermarkKey,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lam: float = DEFAULT_LAMBDA,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = False,
) -> nn.Module:
    """Train ``model`` in place on task loss + Eq. 4 (fine-tune a trained model, or a fresh one).

    ``x`` are client rows: pass a loaded source's ``.model`` (the ClientView) so the task loss sees
    the inputs as served (normalization, probabilities → logits), while the regularizer reaches the
    owner's weights. Any network with trainable parameters works, TorchScript included.

    ``seed`` drives only the training's randomness (batch order); the key's secrecy does not depend on it.
    """
    _target_weights(model, key)  # fail early on a model the key does not fit
    return train(
        model,
        x,
        y,
        epochs=epochs,
        lr=lr,
        seed=seed,
        regularizer=regularizer(key, lam),
        progress=progress,
        desc="watermark",
    )


def extract(
    model: nn.Module, key: WatermarkKey, *, reference: nn.Module | None = None, probes: torch.Tensor | None = None
) -> list[int]:
    """round(map(v)) at the key's positions; values outside 0-9 are kept (see module docstring).

    With ``reference`` (the owner's original model) and ``probes`` (inputs both accept), the
    suspect's channels are aligned to the owner's first (:mod:`activeguard.watermark.alignment`)."""
    return _extract(model, key, reference, probes)[0]


def _extract(
    model: nn.Module, key: WatermarkKey, reference: nn.Module | None, probes: torch.Tensor | None
) -> tuple[list[int], float | None]:
    if reference is None:
        with torch.no_grad():
            values = key.map(_target_weights(model, key).double())
        return [int(v) for v in torch.round(values).tolist()], None
    if probes is None:
        raise ValueError("aligning to the owner's model needs probe inputs")
    _target_weights(model, key)  # the same shape checks (a clear error for another architecture)
    alignment = align_layer(reference, model, key.layer, probes)
    weight = aligned_weight(_layer_weight(model, key.layer), alignment)
    index = torch.tensor(key.positions, dtype=torch.long)
    values = key.map(weight[key.filter].reshape(-1)[index].double())
    similarity = float(alignment.outputs.similarity[key.filter])
    return [int(v) for v in torch.round(values).tolist()], similarity


def chance_probability(matched: int, total: int) -> float:
    """P(X ≥ matched), X ~ Binomial(total, 1/10): an unmarked model matching by luck."""
    from scipy.stats import binom

    return float(binom.sf(matched - 1, total, CHANCE_PER_DIGIT))


def verify(
    model: nn.Module,
    key: WatermarkKey,
    *,
    reference: nn.Module | None = None,
    probes: torch.Tensor | None = None,
    threshold: float = CHANCE_THRESHOLD,
) -> WatermarkResult:
    """Extract and compare, graded by the chance probability. A suspect whose layer does not fit the
    key raises ValueError. With ``reference`` and ``probes``, the suspect is aligned to the owner's
    model first, so permuted and positively rescaled filters keep the mark."""
    extracted, similarity = _extract(model, key, reference, probes)
    matched = sum(e == d for e, d in zip(extracted, key.digits))
    total = len(key.digits)
    chance = chance_probability(matched, total)
    return WatermarkResult(
        success=chance <= threshold,
        matched=matched,
        total=total,
        extracted=extracted,
        chance_probability=chance,
        threshold=threshold,
        aligned=reference is not None,
        alignment_similarity=similarity,
    )


# --- encrypted key files ------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise WatermarkKeyError(f"key file field {what!r} is missing or not a string")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise WatermarkKeyError(f"key file field {what!r} is not valid base64") from exc


def _derive(passphrase: str, salt: bytes, params: dict[str, int]) -> bytes:
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    kdf = Scrypt(salt=salt, length=32, n=params["n"], r=params["r"], p=params["p"])
    return kdf.derive(passphrase.encode("utf-8"))


def _check_passphrase(passphrase: str) -> None:
    if not isinstance(passphrase, str) or not passphrase:
        raise ValueError("passphrase must be a non-empty string")


def _header_aad(header: dict[str, Any]) -> bytes:
    """Format, KDF parameters and salt are authenticated too, so they cannot be swapped."""
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")


def save_key(key: WatermarkKey, path: str | Path, passphrase: str) -> None:
    """Encrypt ``key`` to ``path`` (mode 0600): scrypt(n=2^15, r=8, p=1) → AES-256-GCM."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    _check_passphrase(passphrase)
    salt, nonce = os.urandom(_SALT_BYTES), os.urandom(_NONCE_BYTES)
    header = {"format": KEY_FILE_FORMAT, "kdf": {"name": "scrypt", **_SCRYPT}, "salt": _b64(salt)}
    payload = json.dumps({"format": _KEY_PAYLOAD_FORMAT, "key": key.to_dict()}).encode("utf-8")
    ciphertext = AESGCM(_derive(passphrase, salt, _SCRYPT)).encrypt(nonce, payload, _header_aad(header))
    document = {**header, "nonce": _b64(nonce), "ciphertext": _b64(ciphertext)}
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        os.fchmod(handle.fileno(), 0o600)  # O_CREAT's mode is ignored for an existing file
        json.dump(document, handle)
    os.chmod(path, 0o600)


def _read_document(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as exc:
        raise WatermarkKeyError(f"cannot read key file {path}: {type(exc).__name__}") from exc
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise WatermarkKeyError(f"{path} is not a watermark key file (not JSON; truncated or corrupted?)") from exc
    if not isinstance(document, dict) or document.get("format") != KEY_FILE_FORMAT:
        raise WatermarkKeyError(f"{path} is not a watermark key file (expected format {KEY_FILE_FORMAT})")
    return document


def _kdf_params(document: dict[str, Any]) -> dict[str, int]:
    kdf = document.get("kdf")
    if not isinstance(kdf, dict) or kdf.get("name") != "scrypt" or set(kdf) != {"name", *_SCRYPT}:
        raise WatermarkKeyError("key file has missing or unsupported KDF parameters")
    params = {}
    for name, limit in _SCRYPT_MAX.items():
        value = kdf[name]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise WatermarkKeyError(f"key file KDF parameter {name!r} is out of range")
        params[name] = value
    if params["n"] < 2 or params["n"] & (params["n"] - 1):
        raise WatermarkKeyError("key file KDF parameter 'n' must be a power of two")
    return params


def load_key(path: str | Path, passphrase: str) -> WatermarkKey:
    """Decrypt a key file; WatermarkKeyError on a wrong passphrase, tampering or corruption."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    _check_passphrase(passphrase)
    path = Path(path)
    document = _read_document(path)
    params = _kdf_params(document)
    salt = _unb64(document.get("salt"), "salt")
    nonce = _unb64(document.get("nonce"), "nonce")
    ciphertext = _unb64(document.get("ciphertext"), "ciphertext")
    if len(salt) != _SALT_BYTES or len(nonce) != _NONCE_BYTES or len(ciphertext) <= 16:
        raise WatermarkKeyError(f"{path} has a malformed salt, nonce or ciphertext (truncated?)")
    header = {"format": document["format"], "kdf": document["kdf"], "salt": document["salt"]}
    try:
        payload = AESGCM(_derive(passphrase, salt, params)).decrypt(nonce, ciphertext, _header_aad(header))
    except InvalidTag:
        raise WatermarkKeyError("wrong passphrase or tampered key file") from None
    try:
        data = json.loads(payload.decode("utf-8"))
        if data.get("format") != _KEY_PAYLOAD_FORMAT:
            raise ValueError("unexpected payload format")
        return WatermarkKey.from_dict(data["key"])
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        # Authenticated but unusable: written by an incompatible version. No detail (it is secret).
        raise WatermarkKeyError(f"{path} decrypted but does not hold a valid watermark key") from None
