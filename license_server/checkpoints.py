"""Models named in (or uploaded with) RegisterModel: every failure names the file and the problem.

Any model source :mod:`activeguard.models.sources` loads (project checkpoint, TorchScript, exported
program, state dict + model file) is read with :func:`registered_classifier`, the one loader every
command uses; nothing is unpickled. A project checkpoint is first checked against a skeleton built
on the meta device, so a hostile or broken config costs neither memory nor code execution.

The eager convention's model file is Python the server imports, as TorchServe does: only an admin
(RegisterModel is an admin call) can send it.
"""

from __future__ import annotations

import errno
import hashlib
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from activeguard.models import inputs, sources
from activeguard.models.architectures import CHECKPOINT_FORMAT, build_model, load_checkpoint
from license_server.errors import InvalidRequest, NotFound, PreconditionFailed
from license_server.validation import shown

# Project architectures that are no classifiers (activeguard.models.sources gives them those tasks).
NOT_CLASSIFIERS = ("mlp-regressor", "fc-generator")
# The stored copy of an uploaded model keeps its format; the suffix only tells a person which it is.
STORED_SUFFIXES = {"checkpoint": ".pt", "eager": ".state.pt", "torchscript": ".ts", "export": ".pt2"}


def _check_file(path: Path, what: str) -> None:
    """Refuse what is not a readable, non-empty regular file (OSError escapes to the caller)."""
    if path.is_dir():
        raise InvalidRequest(f"{what} is a directory, not a model file")
    if not path.exists():
        raise NotFound(f"{what} does not exist on the license server")
    if not path.is_file():
        raise InvalidRequest(f"{what} is not a regular file")
    if path.stat().st_size == 0:
        raise InvalidRequest(f"{what} is empty (0 bytes), not a model file")


def _read_checkpoint(path: Path, what: str) -> dict[str, Any]:
    """The checkpoint dict stored at ``path``, or a refusal saying why it is not one."""
    try:
        return load_checkpoint(path)
    except ValueError as exc:
        if exc.__cause__ is not None:  # torch.load itself failed
            raise InvalidRequest(
                f"{what} is not a model checkpoint: torch.load(weights_only=True) cannot read it "
                f"({type(exc.__cause__).__name__}; a text file, a truncated copy or pickled objects?)"
            ) from None
        raise InvalidRequest(
            f"{what} is not an ActiveGuard model checkpoint (a dict with format {CHECKPOINT_FORMAT!r}, as "
            "activeguard.models.architectures.save_model writes); a state dict needs its network's code (model_file_text)"
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


def _check_checkpoint(path: Path, what: str) -> None:
    """Refuse a project checkpoint whose architecture, config or weights are unusable, before building it.

    The skeleton is built on the meta device, so a bogus config (say, a billion hidden units) costs no memory.
    """
    ckpt = _read_checkpoint(path, what)
    missing = [k for k in ("arch", "config", "state_dict") if k not in ckpt]
    if missing:
        raise InvalidRequest(f"{what} is an ActiveGuard checkpoint without {', '.join(map(repr, missing))}")
    arch, config, state = ckpt["arch"], ckpt["config"], ckpt["state_dict"]
    if arch in NOT_CLASSIFIERS:
        raise InvalidRequest(f"{what} holds a {shown(arch)} model; licenses need a classifier")
    if not isinstance(config, dict) or not isinstance(state, dict):
        raise InvalidRequest(f"{what}: 'config' and 'state_dict' must both be dicts")
    try:
        with torch.device("meta"):
            skeleton = build_model(arch, **config)
    except Exception as exc:  # noqa: BLE001 - unknown architectures and keywords, wrong types, impossible sizes
        raise InvalidRequest(
            f"{what}: its config {shown(config, 160)} does not describe a {shown(arch)} model ({type(exc).__name__})"
        ) from None
    problem = _weights_problem(skeleton.state_dict(), state)
    if problem:
        raise InvalidRequest(f"{what}: its weights do not fit its {arch} config ({problem})")


def registered_classifier(path: Path, what: str, options: sources.SourceOptions) -> sources.LoadedModel:
    """The classifier at ``path`` from any source, as a client reaches it; refusals name ``what``."""
    try:
        _check_file(path, what)
        try:
            source = sources.detect(path, options)
        except inputs.SourceError:
            raise InvalidRequest(
                f"{what} is not a model file: neither torch.load(weights_only=True) nor torch.jit.load nor "
                "torch.export.load can read it (a text file or a truncated copy?)"
            ) from None
        if source.name == "checkpoint":
            _check_checkpoint(path, what)
        loaded = sources.load(path, options)
    except PermissionError:
        raise PreconditionFailed(f"{what} cannot be read by the license server (permission denied)") from None
    except OSError as exc:  # a name too long is the caller's; anything else is the server's file system
        error = InvalidRequest if exc.errno == errno.ENAMETOOLONG else PreconditionFailed
        raise error(f"{what} cannot be read ({exc.strerror or type(exc).__name__})") from None
    except inputs.SourceError as exc:  # the loader's one-line reason, naming the file as the client knows it
        raise InvalidRequest(str(exc).replace(str(path), what)) from None
    if loaded.num_classes is None:
        raise InvalidRequest(f"{what} holds a {loaded.task} model; licenses need a classifier")
    return loaded


def stored_suffix(path: Path, options: sources.SourceOptions) -> str:
    """The file suffix of the model's format ('' when it is none): torch.export.load wants '.pt2'."""
    try:
        return STORED_SUFFIXES[sources.detect(path, options).name]
    except (inputs.SourceError, OSError):
        return ""


@contextmanager
def staged_model_code(models_dir: Path, text: str) -> Iterator[Path | None]:
    """The eager convention's model file as a file to import while registering (None without text); removed after."""
    if not text:
        yield None
        return
    models_dir.mkdir(parents=True, exist_ok=True)
    path = models_dir / f"upload-{threading.get_ident()}-{time.time_ns()}.py"
    path.write_text(text)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def model_code_file(models_dir: Path, text: str) -> Path:
    """The recorded model file text as a file to import again (after a restart): named by its content."""
    path = models_dir / f"model-code-{hashlib.sha256(text.encode()).hexdigest()[:32]}.py"
    if not path.is_file() or path.read_text() != text:
        models_dir.mkdir(parents=True, exist_ok=True)
        tmp = models_dir / f"upload-{threading.get_ident()}-{time.time_ns()}.py"
        tmp.write_text(text)
        tmp.replace(path)
    return path


def fingerprint_from_bytes(raw: bytes, shape: tuple[int, ...]) -> torch.Tensor:
    import numpy as np

    arr = np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(shape)
    return torch.from_numpy(arr.copy())[None]
