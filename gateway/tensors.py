"""Tensors on the wire as typed bytes (little-endian, C order), never as JSON text."""

from __future__ import annotations

import math

import numpy as np

from activeguard_proto.v1 import gateway_pb2

DTYPES = {"float32": np.dtype("<f4")}
MAX_ELEMENTS = 8 * 1024 * 1024
MAX_RANK = 8


def to_tensor(array: np.ndarray) -> gateway_pb2.Tensor:
    array = np.ascontiguousarray(array, dtype=DTYPES["float32"])
    return gateway_pb2.Tensor(data=array.tobytes(), shape=list(array.shape), dtype="float32")


def from_tensor(tensor: gateway_pb2.Tensor) -> np.ndarray:
    """Decode and validate: known dtype, sane shape, byte count that matches, finite values."""
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
    array = np.frombuffer(tensor.data, dtype=dtype).reshape(shape).astype(np.float32)
    if not np.isfinite(array).all():
        raise ValueError("tensor contains NaN or inf")
    return array
