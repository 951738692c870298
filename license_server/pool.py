"""The pool of pre-generated fingerprints: filled ahead of issuance so a license costs a store read.

The store is the progress: each batch is generated on the worker and committed whole, so a filler
stopped anywhere (a restart, an offline run killed) resumes where it was, and nothing is generated
twice. A pooled fingerprint is re-checked on the calling thread before it is signed.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Iterator

from license_server.checkpoints import fingerprint_from_bytes
from license_server.config import ServerConfig
from license_server.generation import FingerprintGenerator
from license_server.logs import log_event
from license_server.metrics import Metrics
from license_server.registry import LoadedModel
from license_server.slots import Slot, SlotAllocator
from license_server.store import Store


class FingerprintPool:
    """Takes pooled fingerprints for issuance and fills each model's pool (one filler per model)."""

    def __init__(
        self,
        config: ServerConfig,
        store: Store,
        allocator: SlotAllocator,
        generator: FingerprintGenerator,
        metrics: Metrics,
    ):
        self.cfg = config
        self.store = store
        self.allocator = allocator
        self.generator = generator
        self.metrics = metrics
        self._fillers: dict[str, threading.Thread] = {}
        self._fillers_lock = threading.Lock()
        self._closing = threading.Event()
        self._stored = threading.Condition()  # notified whenever a batch lands in the pool

    def stop(self) -> None:
        """Fillers finish the batch in hand and start no other."""
        self._closing.set()

    def join(self) -> None:
        with self._fillers_lock:
            fillers = list(self._fillers.values())
        for filler in fillers:
            filler.join(timeout=self.cfg.generation_timeout)

    def wait_for_first(self, m: LoadedModel, timeout: float) -> bool:
        """While a filler is busy on a model whose pool is still empty (just registered), wait for its first
        batch rather than start a search of one's own: a new model's first license then costs one small
        batch. True when the pool holds something."""
        deadline = time.monotonic() + timeout
        with self._stored:
            while not m.slots.pool and self._filling(m.row.model_id):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._stored.wait(min(left, 0.5))
        return bool(m.slots.pool)

    def _filling(self, model_id: str) -> bool:
        with self._fillers_lock:
            filler = self._fillers.get(model_id)
        return filler is not None and filler.is_alive()

    def take(self, m: LoadedModel, slot: Slot) -> bytes | None:
        """The slot's pooled fingerprint, re-checked (one row through the model), or None."""
        if slot not in m.slots.pool:
            return None
        raw = self.store.pregenerated_for(m.row.model_id, slot)
        if raw is None or not self.generator.recheck(m, slot, raw):
            return None
        self.generator.remember(m, slot, fingerprint_from_bytes(raw, m.row.input_shape))
        return raw

    @staticmethod
    def default_count(m: LoadedModel) -> int:
        """Every slot of a sparse (paper) space; 1,000 of a dense one (more on request)."""
        return 1000 if m.config.space.dense else len(m.slots.all_slots)

    def todo(self, m: LoadedModel, count: int, tried: frozenset[Slot] = frozenset()) -> list[Slot]:
        """Free slots without a fingerprint (and not ``tried`` in this run) to bring the pool to ``count``."""
        reserved = self.allocator.reserved(m.row.model_id)
        with self.allocator.lock:
            missing = max(0, count - len(m.slots.pool))
            free = m.slots.free(m.slots.pool, reserved, tried) if missing else []
        random.Random(m.row.model_id).shuffle(free)
        return free[:missing]

    def batches(self, m: LoadedModel, count: int, size: int, first: int | None = None) -> Iterator[list[Slot]]:
        """Batches of slots to generate until the pool holds ``count`` (or every free slot was tried once:
        a slot whose fingerprint failed the re-check is not tried again in the same run); the first batch
        holds ``first`` slots when given (a small one makes the pool usable sooner)."""
        tried: set[Slot] = set()
        while not self._closing.is_set():
            todo = self.todo(m, count, frozenset(tried))[: (first or size) if not tried else size]
            if not todo:
                return
            tried.update(todo)
            yield todo

    def generate_batch(self, m: LoadedModel, slots: list[Slot], hurried: bool = False) -> int:
        """Generate ``slots`` in one batch on the worker and store those that pass; returns how many.
        ``hurried``: with the on-demand step limit (a new model's first batch: its slowest row decides
        when the first license can come from the pool)."""
        steps = self.cfg.on_demand_max_steps if hurried else None
        fut = self.generator.submit(self.generator.generate, m, slots, self.generator.rng.randrange(2**31), steps)
        got = fut.result(timeout=self.cfg.generation_timeout)
        self.store.save_pregenerated(m.row.model_id, [(c, j, raw) for (c, j), raw in got.items()])
        self.allocator.add_to_pool(m.slots, list(got))
        for slot, raw in got.items():
            self.generator.remember(m, slot, fingerprint_from_bytes(raw, m.row.input_shape))
        self.metrics.generated.labels("pregenerated").inc(len(got))
        with self._stored:
            self._stored.notify_all()
        return len(got)

    def fill(self, m: LoadedModel, count: int, *, now: bool = True) -> bool:
        """Fill the pool to ``count``: the first batch now (``now``) or a small first batch on the background
        thread, the rest there too (progress in the ``activeguard_pregenerated_fingerprints`` gauge). One
        filler per model at a time. True when filling goes on."""
        mid = m.row.model_id
        self.metrics.pregeneration_target.labels(mid[:16]).set(count)
        todo = self.todo(m, count)
        if not todo:
            return False
        if now:
            self._logged_batch(m, todo[: self.cfg.pregeneration_batch])
        # more to do, or the first batch lost fingerprints that failed their re-check: the filler
        # goes on with other free slots until the pool holds ``count`` (or every slot was tried)
        if len(m.slots.pool) < count:
            with self._fillers_lock:
                running = self._fillers.get(mid)
                if running is not None and running.is_alive():
                    return
                filler = threading.Thread(
                    target=self._fill,
                    args=(m, count, None if now else self.cfg.first_pregeneration_batch),
                    name=f"pregenerate-{mid[:8]}",
                    daemon=True,
                )
                self._fillers[mid] = filler
                filler.start()
            return True
        return False

    def _fill(self, m: LoadedModel, count: int, first: int | None) -> None:
        try:
            for number, todo in enumerate(self.batches(m, count, self.cfg.pregeneration_batch, first)):
                self._logged_batch(m, todo, hurried=first is not None and number == 0)
        except Exception as exc:  # a store outage or shutdown ends the filler; the next RegisterModel resumes it
            log_event(logging.WARNING, "pre-generation stopped", model_id=m.row.model_id[:16], error=str(exc))

    def _logged_batch(self, m: LoadedModel, slots: list[Slot], hurried: bool = False) -> int:
        start = time.perf_counter()
        ok = self.generate_batch(m, slots, hurried)
        log_event(
            logging.INFO,
            "pregenerated fingerprints",
            model_id=m.row.model_id[:16],
            slots=len(slots),
            ok=ok,
            pool=len(m.slots.pool),
            seconds=round(time.perf_counter() - start, 3),
        )
        return ok
