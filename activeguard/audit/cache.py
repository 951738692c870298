"""Content-hash on-disk cache of trained suspect zoos and ensembles (``ACTIVEGUARD_CACHE``).

Workload owners live in the same root, under ``workloads/`` (:mod:`activeguard.models.workloads`), saved in
every model source rather than pickled.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from activeguard.models.workloads import cache_root

ZOO_FORMAT = "activeguard-zoo/1"


def _hash(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode() if not isinstance(part, bytes) else part)
    return h.hexdigest()[:20]


def _tensor_digest(*tensors: torch.Tensor) -> bytes:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.digest()


def default_cache_dir() -> Path:
    """The one cache root (``ACTIVEGUARD_CACHE``): zoos here, workload owners under ``workloads/``."""
    return cache_root()


def cached(key: str, build: Callable[[], Any], cache_dir: str | Path | None) -> Any:
    """Load ``key`` from the on-disk cache or build and store it (``cache_dir=None`` disables caching)."""
    if cache_dir is None:
        return build()
    path = Path(cache_dir) / f"{key}.pt"
    if path.exists():
        try:
            data = torch.load(path, weights_only=False)  # our own cache file, written below
            if data.get("format") == ZOO_FORMAT:
                return data["value"]
        except Exception:  # noqa: BLE001 - a corrupt cache entry is rebuilt
            pass
    value = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"format": ZOO_FORMAT, "value": value}, tmp)
    tmp.replace(path)
    return value
