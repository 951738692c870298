"""Request bodies into model input: JSON ``{"inputs": ...}`` or ``.npy`` bytes, checked before use.

Every limit is checked before anything large is built: the body's size, the ``.npy`` header's
declared shape and byte count, the JSON nesting depth, the rows per request, NaN and inf.
"""

from __future__ import annotations

import io
import json
import math
from typing import Any

import numpy as np
import torch

from activeguard.guard.outcomes import InputError

# Fields of a JSON body that are credentials, not input (the license, or paper mode's bare fingerprint).
CREDENTIAL_KEYS = ("fingerprint", "license")


class BodyParser:
    """Reads one request body into a float32 tensor of ``(rows, *input_shape)``."""

    def __init__(self, input_shape: tuple[int, ...], max_body_bytes: int, max_rows: int):
        self.input_shape = tuple(input_shape)
        self.max_body_bytes = max_body_bytes
        self.max_rows = max_rows

    def parse(self, body: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        """(inputs, extras) from a JSON or .npy body; a JSON body may also carry a ``license``
        (for fingerprints too large for an HTTP header) or, in paper mode, a bare ``fingerprint``."""
        if isinstance(body, str):
            body = body.encode("utf-8", errors="replace")
        if isinstance(body, (bytes, bytearray)):
            body = bytes(body)
            if len(body) > self.max_body_bytes:
                raise InputError(f"body of {len(body)} bytes exceeds the limit of {self.max_body_bytes}")
            if len(body) == 0:
                raise InputError('empty body: send JSON {"inputs": [...]} or .npy bytes')
            if body[:6] == b"\x93NUMPY":
                return self._npy(body), {}
            body = _json(body)
        if not isinstance(body, dict) or "inputs" not in body:
            raise InputError('JSON body must be an object with an "inputs" field')
        return self.as_tensor(body["inputs"]), {k: body[k] for k in CREDENTIAL_KEYS if k in body}

    def _npy(self, body: bytes) -> torch.Tensor:
        """Read an .npy body after checking its header: dtype, shape and byte count come first, so
        a 200-byte header that declares 10^13 elements allocates nothing."""
        stream = io.BytesIO(body)
        try:
            version = np.lib.format.read_magic(stream)
            read_header = {
                (1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0,
            }.get(version)
            if read_header is None:
                raise InputError(f".npy format version {version} is not supported; use 1.0 or 2.0")
            shape, fortran_order, dtype = read_header(stream)
        except InputError:
            raise
        except Exception as exc:  # numpy raises ValueError, SyntaxError, ... on a bad header
            raise InputError(f"unreadable .npy header: {exc}") from None
        if dtype.kind not in "fiu" or dtype.hasobject:
            raise InputError(f".npy dtype {dtype} is not numeric; send float32")
        self._check_shape(tuple(shape))
        count = math.prod(shape)
        data = body[stream.tell() :]
        if len(data) != count * dtype.itemsize:
            raise InputError(f".npy data has {len(data)} bytes; its header declares {count * dtype.itemsize}")
        array = np.frombuffer(data, dtype=dtype, count=count).astype(np.float32)  # a writable copy
        array = array.reshape(shape[::-1]).T if fortran_order else array.reshape(shape)
        return self.as_tensor(array)

    def _check_shape(self, shape: tuple[int, ...]) -> None:
        want = self.input_shape
        if shape == want:
            return
        if len(shape) != len(want) + 1 or shape[1:] != want:
            raise InputError(f"inputs must have shape (N, {', '.join(map(str, want))}), got {shape}")
        if not 1 <= shape[0] <= self.max_rows:
            raise InputError(f"between 1 and {self.max_rows} rows per request, got {shape[0]}")

    def as_tensor(self, data: Any) -> torch.Tensor:
        """Nested numbers (or an array) as a finite float32 batch of the input shape."""
        if _depth(data) > len(self.input_shape) + 1:
            raise InputError(f"inputs must be nested {len(self.input_shape) + 1} levels deep at most")
        try:
            array = np.asarray(data, dtype=np.float32)
        except (TypeError, ValueError, OverflowError):
            raise InputError("inputs must be a nested list of numbers") from None
        self._check_shape(array.shape)
        if array.shape == self.input_shape:
            array = array[None]
        if not np.isfinite(array).all():
            raise InputError("inputs contain NaN or inf")
        return torch.from_numpy(np.ascontiguousarray(array))


def _json(body: bytes) -> Any:
    """Parse a JSON body; absurd nesting ends in RecursionError inside the C parser, not a crash."""
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise InputError("body is neither JSON nor .npy bytes") from None
    except RecursionError:
        raise InputError("JSON body is nested too deeply") from None


def _depth(data: Any, limit: int = 16) -> int:
    """Nesting depth of lists along the first element (enough to stop absurd ranks early)."""
    depth = 0
    while isinstance(data, (list, tuple)) and depth <= limit:
        depth += 1
        data = data[0] if data else None
    return depth
