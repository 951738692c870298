"""License slots: which (class t, FO index j) of a model are issued, pooled, blocked or being issued.

A slot is user ``t·T + j``. This process's view is kept current as it issues; the store's
``UNIQUE (model, class, FO index)`` constraint has the last word when several servers share a
database, and a slot another server took is simply marked taken here.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field

from activeguard.credentials.control import ControlConfig
from activeguard.credentials.fo_space import FO
from license_server.errors import Exhausted
from license_server.metrics import Metrics

Slot = tuple[int, int]  # (FO class t, index j of the FO among class t's): user t·T + j


@dataclass
class SlotBook:
    """One model's slots. ``taken``, ``pool`` and ``blocked`` change only under the allocator's lock."""

    model_id: str
    config: ControlConfig
    all_slots: list[Slot]
    taken: set[Slot] = field(default_factory=set)  # issued
    pool: set[Slot] = field(default_factory=set)  # with a pre-generated fingerprint
    blocked: set[Slot] = field(default_factory=set)  # reached by natural inputs: never issued

    def user_index(self, slot: Slot) -> int:
        return slot[0] * self.config.per_class + slot[1]

    def slot_of(self, user: int) -> Slot:
        t, j = divmod(user, self.config.per_class)
        return t, j

    def fo(self, slot: Slot) -> FO:
        return self.config.fo_of_user(self.user_index(slot))

    def is_free(self, slot: Slot, *exclude: set[Slot]) -> bool:
        """Neither issued nor reached by natural inputs, nor in any of ``exclude``."""
        return slot not in self.taken and slot not in self.blocked and not any(slot in e for e in exclude)

    def free(self, *exclude: set[Slot]) -> list[Slot]:
        """Every slot nobody holds, in slot order."""
        return [s for s in self.all_slots if self.is_free(s, *exclude)]


class SlotAllocator:
    """Reserves free slots for issuance in flight (pooled ones first) and publishes what is left."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self.lock = threading.Lock()
        self._reserved: dict[str, set[Slot]] = {}
        self._rng = random.Random()

    def reserved(self, model_id: str) -> set[Slot]:
        """Slots of the model being issued right now (a copy)."""
        with self.lock:
            return set(self._reserved.get(model_id, ()))

    def reserve(self, book: SlotBook, exclude: set[Slot]) -> Slot:
        """A free slot, pooled ones first; random draws while the space is mostly free, a full scan after."""
        with self.lock:
            reserved = self._reserved.setdefault(book.model_id, set())
            ready = book.pool - book.taken - book.blocked - reserved - exclude  # set algebra: the pool may hold 10,000
            slot = self._rng.choice(tuple(ready)) if ready else None
            for _ in range(64 if slot is None else 0):
                candidate = self._rng.choice(book.all_slots)
                if book.is_free(candidate, reserved, exclude):
                    slot = candidate
                    break
            if slot is None:
                free = book.free(reserved, exclude)
                if not free:
                    raise Exhausted(_exhausted(book, len(reserved)))
                slot = self._rng.choice(free)
            reserved.add(slot)
            return slot

    def release(self, model_id: str, slot: Slot) -> None:
        with self.lock:
            self._reserved.get(model_id, set()).discard(slot)

    def mark_taken(self, book: SlotBook, slot: Slot) -> None:
        """Record an issued slot (ours or a concurrent issuer's) and publish the gauges."""
        with self.lock:
            book.taken.add(slot)
            book.pool.discard(slot)
        self.publish(book)

    def add_to_pool(self, book: SlotBook, slots: list[Slot]) -> None:
        with self.lock:
            book.pool.update(s for s in slots if s not in book.taken)
        self.metrics.pregenerated.labels(book.model_id[:16]).set(len(book.pool))

    def publish(self, book: SlotBook) -> None:
        """Publish the slots still free to issue (neither issued nor reached by natural inputs)."""
        with self.lock:
            free = len(book.all_slots) - len(book.taken | book.blocked)
        self.metrics.free_slots.labels(book.model_id[:16]).set(free)
        self.metrics.pregenerated.labels(book.model_id[:16]).set(len(book.pool))


def _exhausted(book: SlotBook, in_flight: int) -> str:
    cap, issued, blocked = len(book.all_slots), len(book.taken), len(book.blocked)
    space = book.config.space
    what = f"{cap} license slots of model {book.model_id[:16]}… ({space.scheme} FO space, {space.describe()['formula']}"
    what += f"; {blocked} reached by natural inputs are never issued)" if blocked else ")"
    if in_flight:
        return f"all {what} are issued or being issued ({issued} issued, {in_flight} in flight)"
    return f"all {what} are issued; no FO is ever reused"
