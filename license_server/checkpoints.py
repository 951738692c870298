"""Model checkpoints named in (or uploaded with) RegisterModel: every failure names the file and the problem.

A checkpoint is loaded with ``weights_only=True`` and checked against a skeleton built on the
meta device, so a hostile or broken file costs neither memory nor code execution.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import torch

from activeguard.models import CHECKPOINT_FORMAT, build_model, load_checkpoint
from license_server.errors import InvalidRequest, NotFound, PreconditionFailed
from license_server.validation import shown

CLASSIFIERS = ("lenet5", "mlp-classifier")  # licenses identify users by a classifier's top-1 output


def _read_checkpoint(path: Path, what: str) -> dict[str, Any]:
    """The checkpoint dict stored at ``path``, or a refusal saying why it is not one."""
    try:
        if path.is_dir():
            raise InvalidRequest(f"{what} is a directory, not a model checkpoint file")
        if not path.exists():
            raise NotFound(f"{what} does not exist on the license server")
        if not path.is_file():
            raise InvalidRequest(f"{what} is not a regular file")
        if path.stat().st_size == 0:
            raise InvalidRequest(f"{what} is empty (0 bytes), not a model checkpoint")
        return load_checkpoint(path)
    except PermissionError:
        raise PreconditionFailed(f"{what} cannot be read by the license server (permission denied)") from None
    except OSError as exc:  # a name too long is the caller's; anything else is the server's file system
        error = InvalidRequest if exc.errno == errno.ENAMETOOLONG else PreconditionFailed
        raise error(f"{what} cannot be read ({exc.strerror or type(exc).__name__})") from None
    except ValueError as exc:
        if exc.__cause__ is not None:  # torch.load itself failed
            raise InvalidRequest(
                f"{what} is not a model checkpoint: torch.load(weights_only=True) cannot read it "
                f"({type(exc.__cause__).__name__}; a text file, a truncated copy or pickled objects?)"
            ) from None
        raise InvalidRequest(
            f"{what} is not an ActiveGuard model checkpoint (a dict with format "
            f"{CHECKPOINT_FORMAT!r}, as activeguard.models.save_model writes)"
        ) from None


def _weights_problem(expected: dict[str, torch.Tensor], state: dict[str, Any]) -> str:
    """What keeps ``state`` from loading into a model whose tensors are ``expected`` ('' if nothing)."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        k
        for k in set(expected) & set(state)
        if not isinstance(state[k], torch.Tensor) or tuple(state[k].shape) != tuple(expected[k].shape)
    )
    parts = [
        f"{label}: {', '.join(keys[:4])}{' …' if len(keys) > 4 else ''}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
        if keys
    ]
    if not parts and not all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point()):
        parts.append("NaN or infinite weights")
    return "; ".join(parts)


def checkpoint_classifier(path: Path, what: str) -> torch.nn.Module:
    """The classifier saved at ``path``; built on the meta device first, so a bogus config costs no memory."""
    ckpt = _read_checkpoint(path, what)
    missing = [k for k in ("arch", "config", "state_dict") if k not in ckpt]
    if missing:
        raise InvalidRequest(f"{what} is an ActiveGuard checkpoint without {', '.join(map(repr, missing))}")
    arch, config, state = ckpt["arch"], ckpt["config"], ckpt["state_dict"]
    if arch not in CLASSIFIERS:
        raise InvalidRequest(
            f"{what} holds a {shown(arch)} model; licenses need a classifier ({' or '.join(CLASSIFIERS)})"
        )
    if not isinstance(config, dict) or not isinstance(state, dict):
        raise InvalidRequest(f"{what}: 'config' and 'state_dict' must both be dicts")
    try:
        with torch.device("meta"):
            skeleton = build_model(arch, **config)
    except Exception as exc:  # noqa: BLE001 - unknown keywords, wrong types, impossible sizes
        raise InvalidRequest(
            f"{what}: its config {shown(config, 160)} does not describe a {arch} model ({type(exc).__name__})"
        ) from None
    problem = _weights_problem(skeleton.state_dict(), state)
    if problem:
        raise InvalidRequest(f"{what}: its weights do not fit its {arch} config ({problem})")
    module = build_model(arch, **config)
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:  # right names and shapes, but tensors that cannot be copied (dtype, layout)
        raise InvalidRequest(
            f"{what}: its weights cannot be loaded into a {arch} model ({type(exc).__name__})"
        ) from None
    return module.eval()


def fingerprint_from_bytes(raw: bytes, shape: tuple[int, ...]) -> torch.Tensor:
    import numpy as np

    arr = np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(shape)
    return torch.from_numpy(arr.copy())[None]
