"""Offline pre-generation: fill a registered model's pool of ready fingerprints from the command line.

The same batches, re-checks and store writes as the server's background filler
(:meth:`license_server.pool.FingerprintPool.fill`), with a progress bar. Safe to stop at any
point and to run again: each batch is committed whole, the next run starts from what the store
holds (slots with a fingerprint or a license are skipped), and the pool's primary key
(model, class, FO index) makes a duplicate impossible. It may run beside a live server on the same
database; the server sees the new fingerprints when it next loads the model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from tqdm.auto import tqdm

from activeguard.credentials import licenses as lic
from license_server.config import ServerConfig
from license_server.issuance import Issuer
from license_server.metrics import Metrics
from license_server.store import Store


@dataclass(frozen=True)
class PregenerationReport:
    model_id: str
    target: int
    generated: int  # fingerprints that passed the re-check in this run
    attempted: int
    pool: int  # ready fingerprints after the run
    seconds: float

    @property
    def per_second(self) -> float:
        return self.generated / self.seconds if self.seconds > 0 else 0.0


def pregenerate(
    config: ServerConfig, model_id: str, count: int, *, batch: int | None = None, progress: bool = True
) -> PregenerationReport:
    """Fill ``model_id``'s pool up to ``count`` fingerprints, ``batch`` per optimization."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    store = Store(config.database_url)
    store.ensure_schema()
    key, _ = lic.load_or_create_signing_key(config.signing_key)
    issuer = Issuer(config, store, key, Metrics())
    try:
        m = issuer.registry.get(model_id)
        size = batch or config.pregeneration_batch
        start, generated, attempted = time.perf_counter(), 0, 0
        missing = len(issuer.pool.todo(m, count))
        with tqdm(total=missing, desc="pre-generating", unit="fp", disable=not progress) as bar:
            for chunk in issuer.pool.batches(m, count, size):
                ok = issuer.pool.generate_batch(m, chunk)
                generated, attempted = generated + ok, attempted + len(chunk)
                bar.update(ok)
                bar.set_postfix(pool=len(m.slots.pool), failed=attempted - generated)
        return PregenerationReport(
            model_id=m.row.model_id,
            target=count,
            generated=generated,
            attempted=attempted,
            pool=len(m.slots.pool),
            seconds=time.perf_counter() - start,
        )
    finally:
        issuer.close()
        store.close()
