"""What Predict carries: tensors as typed bytes (little-endian, C order), never as JSON text, and
opaque payloads (bytes plus their media type) for models whose own handler takes bytes."""

from __future__ import annotations

import math
import re
import struct

import numpy as np

from activeguard_proto.v1 import gateway_pb2

DTYPES = {"float32": np.dtype("<f4")}
MAX_ELEMENTS = 8 * 1024 * 1024
MAX_RANK = 8
MAX_PAYLOAD_BYTES = MAX_ELEMENTS * 4  # the largest tensor's bytes
MAX_CONTENT_TYPE = 255
_NPY_MAGIC = b"\x93NUMPY\x01\x00"
# RFC 9110 media type: type "/" subtype, then optional parameters (not parsed; printable ASCII).
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_MEDIA_TYPE = re.compile(rf"{_TOKEN}/{_TOKEN}(?:[ \t]*;[ -~\t]*)?")


def to_tensor(array: np.ndarray) -> gateway_pb2.Tensor:
    array = np.ascontiguousarray(array, dtype=DTYPES["float32"])
    return gateway_pb2.Tensor(data=array.tobytes(), shape=list(array.shape), dtype="float32")


def from_tensor(tensor: gateway_pb2.Tensor) -> np.ndarray:
    """Decode and validate: known dtype, sane shape, byte count that matches, finite values."""
    return _checked_view(tensor).astype(np.float32)


def npy_from_tensor(tensor: gateway_pb2.Tensor) -> bytes:
    """The tensor as ``.npy`` bytes for TorchServe, validated as :func:`from_tensor` does but never
    decoded or re-encoded: a header in front of the client's own bytes (the hop's fast path)."""
    view = _checked_view(tensor)
    return npy_header(view.shape, view.dtype) + tensor.data


def npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    """An ``.npy`` version 1.0 header, as ``np.save`` writes it (padded to a multiple of 64 bytes)."""
    text = f"{{'descr': '{dtype.str}', 'fortran_order': False, 'shape': {tuple(shape)!r}, }}"
    pad = -(len(_NPY_MAGIC) + 2 + len(text) + 1) % 64
    header = (text + " " * pad + "\n").encode("latin1")
    return _NPY_MAGIC + struct.pack("<H", len(header)) + header


def _checked_view(tensor: gateway_pb2.Tensor) -> np.ndarray:
    """A read-only view of the tensor's bytes once dtype, shape, byte count and values are sane."""
    dtype = DTYPES.get(tensor.dtype)
    if dtype is None:
        raise ValueError(f"unsupported dtype {tensor.dtype!r}; send one of {', '.join(DTYPES)}")
    shape = tuple(int(d) for d in tensor.shape)
    if not shape or len(shape) > MAX_RANK or any(d <= 0 for d in shape) or math.prod(shape) > MAX_ELEMENTS:
        raise ValueError(
            f"invalid tensor shape {shape[: MAX_RANK + 1]}: 1 to {MAX_RANK} positive dimensions, "
            f"at most {MAX_ELEMENTS} elements"
        )
    needed = math.prod(shape) * dtype.itemsize
    if len(tensor.data) != needed:
        raise ValueError(f"tensor has {len(tensor.data)} bytes but shape {shape} of {tensor.dtype} needs {needed}")
    array = np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
    if not np.isfinite(array).all():
        raise ValueError("tensor contains NaN or inf")
    return array


def check_payload(payload: gateway_pb2.Payload, max_bytes: int = MAX_PAYLOAD_BYTES) -> bytes:
    """The payload's bytes, unchanged, once they are non-empty, at most ``max_bytes`` long and
    labelled with a media type (raises ValueError)."""
    if not payload.data:
        raise ValueError("the payload is empty: send the bytes the model's handler reads")
    if len(payload.data) > max_bytes:
        raise ValueError(f"the payload has {len(payload.data)} bytes; this gateway accepts at most {max_bytes}")
    if not is_media_type(payload.content_type):
        raise ValueError(f"payload content_type {payload.content_type[:64]!r} is not a media type such as 'image/png'")
    return payload.data


def is_media_type(text: str) -> bool:
    """``type/subtype`` with optional parameters, printable ASCII, at most MAX_CONTENT_TYPE characters."""
    return len(text) <= MAX_CONTENT_TYPE and _MEDIA_TYPE.fullmatch(text) is not None
