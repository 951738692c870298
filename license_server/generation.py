"""Fingerprint generation for issuance, on one worker thread (never on a gRPC thread).

Two ways in: a batch of slots at once (pre-generation), and on demand, where every request waiting
when the worker is free joins one continuous batched search and is answered as soon as its own row
is done. Every fingerprint is re-checked in the exact bytes that will be signed, through the
registered model, before anyone may sign it.
"""

from __future__ import annotations

import concurrent.futures
import logging
import random
import threading
import time
from collections.abc import Callable

import torch

from activeguard.credentials import licenses as lic
from activeguard.credentials.fingerprints import FingerprintSearch, authenticate, encode, generate_fingerprints
from activeguard.credentials.fo_space import FO
from license_server.checkpoints import fingerprint_from_bytes
from license_server.config import ServerConfig
from license_server.errors import TimedOut, Unavailable
from license_server.logs import log_event
from license_server.metrics import Metrics
from license_server.registry import LoadedModel
from license_server.slots import Slot, SlotAllocator

COLD_LR, WARM_LR = 0.2, 0.1  # on-demand step sizes from noise and from a neighbouring FO's fingerprint


class SlotFailed(Exception):
    """No fingerprint reached this slot's FO: the issuer moves on to another slot."""


def _pair(fo: FO) -> tuple[int, int | None]:
    return fo.target, fo.runner_up


class FingerprintGenerator:
    """Owns the generation worker, the on-demand queue and each model's last good fingerprints
    (the starting points of the next on-demand search near them)."""

    def __init__(self, config: ServerConfig, metrics: Metrics, allocator: SlotAllocator):
        self.cfg = config
        self.metrics = metrics
        self.allocator = allocator  # its lock guards the slot books this reads
        # One worker: torch already uses every core for one batch; requests queue, never block gRPC I/O.
        self.worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fingerprint-gen")
        self.rng = random.Random()
        self._noise = torch.Generator().manual_seed(random.SystemRandom().randrange(2**31))
        # on-demand requests waiting to join their model's search: (slot, start cold, answer)
        self._pending: dict[str, list[tuple[Slot, bool, concurrent.futures.Future]]] = {}
        self._searching: set[str] = set()  # models whose on-demand search runs or is queued
        self._pending_lock = threading.Lock()
        # the last good fingerprint per model and (class, runner-up): where the next search of that pair starts
        self._neighbours: dict[str, dict[tuple[int, int | None], torch.Tensor]] = {}

    def close(self) -> None:
        self.worker.shutdown(wait=True, cancel_futures=True)

    def submit(self, fn: Callable, *args) -> concurrent.futures.Future:
        """Queue work on the generation worker; a stopped worker means the server is going away."""
        try:
            return self.worker.submit(fn, *args)
        except RuntimeError:  # submit after shutdown
            raise Unavailable("the license server is shutting down; retry") from None

    # -- batches (pre-generation) ----------------------------------------------------------------

    def generate(self, m: LoadedModel, slots: list[Slot], seed: int, max_steps: int | None = None) -> dict[Slot, bytes]:
        """On the worker: fingerprints for ``slots`` in one batch; only those that pass the re-check. A batch
        lasts as long as its slowest row: ``max_steps`` below the default cuts a hurried batch short."""
        start = time.perf_counter()
        book = m.slots
        torch.set_num_threads(max(1, torch.get_num_threads()))
        fps = generate_fingerprints(
            m.module,
            m.config,
            [book.user_index(s) for s in slots],
            input_shape=m.row.input_shape,
            bounds=m.spec.bounds,
            encoding=m.row.encoding,
            seed=seed,
            max_steps=max_steps or self.cfg.max_steps,
        )
        self.metrics.generation.observe(time.perf_counter() - start)
        out = {}
        for i, slot in enumerate(slots):
            if bool(fps.success[i]):
                raw, _, _, _ = lic.fingerprint_bytes(fps.inputs[i : i + 1])
                if self.recheck(m, slot, raw):
                    out[slot] = raw
        return out

    def recheck(self, m: LoadedModel, slot: Slot, raw: bytes) -> bool:
        """The exact bytes to be signed, decoded as a verifier will, through the registered model."""
        x = fingerprint_from_bytes(raw, m.row.input_shape)
        if not torch.equal(encode(x, m.row.encoding, m.spec.bounds), x):
            return False
        authorized, user = authenticate(m.module, x, m.config)
        return bool(authorized[0]) and int(user[0]) == m.slots.user_index(slot)

    def remember(self, m: LoadedModel, slot: Slot, x: torch.Tensor) -> None:
        """Keep a good fingerprint as the starting point for its (class, runner-up) pair and its class."""
        fo = m.slots.fo(slot)
        near = self._neighbours.setdefault(m.row.model_id, {})
        near[_pair(fo)] = near[(fo.target, -1)] = x  # (t, −1): any runner-up of class t

    # -- on demand ------------------------------------------------------------------------------

    def on_demand(self, m: LoadedModel, slot: Slot) -> bytes:
        """A new, re-checked fingerprint for ``slot``: from a neighbour's fingerprint (if any), then
        from noise. Waits for the worker's running search; SlotFailed when neither reached the FO."""
        for cold in (False, True):
            fut = self._join(m, slot, cold)
            try:
                raw = fut.result(timeout=self.cfg.generation_timeout)
            except concurrent.futures.TimeoutError:
                fut.cancel()
                raise TimedOut("fingerprint generation timed out") from None
            if raw is not None:
                return raw
        raise SlotFailed(f"no fingerprint reached the FO ({m.slots.fo(slot)}) ± {m.row.epsilon / 2}")

    def _join(self, m: LoadedModel, slot: Slot, cold: bool = False) -> concurrent.futures.Future:
        """Queue ``slot`` for the worker's running search of ``m`` (starting one if none runs)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        mid = m.row.model_id
        with self._pending_lock:
            self._pending.setdefault(mid, []).append((slot, cold, fut))
            start = mid not in self._searching
            self._searching.add(mid)
        if start:
            try:
                if not self._neighbours.get(mid):  # the model's first on-demand search: starting points first
                    self._prime(m)
                self.submit(self._search, m)
            except Unavailable:
                with self._pending_lock:
                    self._pending.pop(mid, None)
                    self._searching.discard(mid)
                raise
        return fut

    def _search(self, m: LoadedModel) -> None:
        """On the worker: one continuous batched optimization for ``m``'s on-demand requests. Requests
        join it whenever they arrive and are answered as soon as their own row is done (the encoded
        fingerprint re-checked as signed), so nobody waits for a slower row; a miss answers None and
        its caller tries again. Returns once no request is running or waiting."""
        mid = m.row.model_id
        search = FingerprintSearch(
            m.module,
            tolerance=m.config.epsilon / 2,
            alpha=m.config.space.task_weight,
            lr=COLD_LR,
            max_steps=min(self.cfg.max_steps, self.cfg.on_demand_max_steps),
            encoding=m.row.encoding,
            bounds=m.spec.bounds,
        )
        running: dict[int, tuple[Slot, concurrent.futures.Future]] = {}  # search row -> request
        try:
            while True:
                with self._pending_lock:
                    joining = self._pending.pop(mid, [])
                    if not joining and not running:
                        self._searching.discard(mid)
                        return
                joining = [(slot, cold, fut) for slot, cold, fut in joining if fut.set_running_or_notify_cancel()]
                for slot, cold, fut in joining:
                    start, lr = self._start(m, slot, cold)
                    (row,) = search.add_users(m.config, [m.slots.user_index(slot)], start, lr=lr)
                    running[row] = (slot, fut)
                if joining:
                    self.metrics.on_demand_batch.observe(search.active)
                for done in search.step():
                    slot, fut = running.pop(done.row)
                    raw = lic.fingerprint_bytes(done.x[None])[0] if done.hit else None
                    ok = raw is not None and self.recheck(m, slot, raw)
                    if ok:
                        self.metrics.generated.labels("on_demand").inc()
                        self.remember(m, slot, done.x[None])
                    fut.set_result(raw if ok else None)
        except BaseException as exc:
            with self._pending_lock:
                self._searching.discard(mid)
                left = self._pending.pop(mid, [])
            for fut in [f for _, f in running.values()] + [f for _, _, f in left]:
                if not fut.done():
                    fut.set_exception(exc)
            raise

    def _prime(self, m: LoadedModel) -> None:
        """Queue one fingerprint per class of a dense space on the worker, ahead of the model's first
        on-demand search, kept only as a starting point, so that on-demand rows start near their class
        rather than from noise (the first 100 licenses of a fresh model: 12.9/s from noise). Nothing
        is pooled or stored: counts and slots stay as they were."""
        if not m.config.space.dense:
            return
        rng = random.Random(m.row.model_id)
        by_class: dict[int, list[Slot]] = {}
        with self.allocator.lock:
            for slot in m.slots.free(m.slots.pool):
                by_class.setdefault(slot[0], []).append(slot)
        slots = [rng.choice(free) for free in by_class.values()]

        def run() -> None:
            try:
                for slot, raw in self.generate(m, slots, self.rng.randrange(2**31)).items():
                    self.remember(m, slot, fingerprint_from_bytes(raw, m.row.input_shape))
            except Exception as exc:  # priming is an optimization: issuance works without it
                log_event(logging.WARNING, "priming failed", model_id=m.row.model_id[:16], error=str(exc))

        if slots:
            self.submit(run)

    def _start(self, m: LoadedModel, slot: Slot, cold: bool) -> tuple[torch.Tensor, float]:
        """(start, step size) of an on-demand row: the last good fingerprint of the same (class,
        runner-up) pair when there is one (a neighbour in the FO grid: about half the steps,
        measured), else of the same class, else, or when ``cold``, uniform noise over the input range."""
        fo = m.slots.fo(slot)
        near = self._neighbours.get(m.row.model_id, {})
        start = None if cold else near.get(_pair(fo), near.get((fo.target, -1)))
        if start is not None:
            return start, WARM_LR
        low, high = m.spec.bounds
        return low + (high - low) * torch.rand(1, *m.row.input_shape, generator=self._noise), COLD_LR
