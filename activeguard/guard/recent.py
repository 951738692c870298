"""A bounded memory of recent results, for credentials checked on a serving hot path.

A worker or the gateway verifies the same license or session token over and over; an Ed25519
check costs ~60 µs, which is most of what the hop itself costs. Callers remember only successes
(a bad credential is checked in full every time) and keep checking what changes with time
(expiry, revocation) on every use.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Recent(Generic[K, V]):
    """A map that forgets its least recently used entry once it holds ``size``; thread-safe."""

    def __init__(self, size: int):
        if size < 1:
            raise ValueError("a Recent map needs room for at least one entry")
        self.size = size
        self._items: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)
