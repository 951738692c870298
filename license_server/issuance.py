"""License issuance: allocation, fingerprint, re-check, signature and storage, without gRPC.

Issuance, step by step (DESIGN §3 "License"), each step a collaborator that owns its state:

1. the :class:`~license_server.registry.ModelRegistry` loads the registered model (checked against
   its model id);
2. the :class:`~license_server.slots.SlotAllocator` reserves a free slot (model, class t, FO index j)
   that neither the store nor an in-flight call of this process holds, nor natural inputs reach
   (dense FO spaces), pre-generated slots first;
3. its fingerprint comes from the :class:`~license_server.pool.FingerprintPool`, or is generated on
   demand by the :class:`~license_server.generation.FingerprintGenerator` (on its worker, never on a
   gRPC thread, where every request waiting at that moment joins one batched optimization); either
   way the exact bytes to be signed were re-checked through the registered model;
4. the canonical payload is signed with the server's Ed25519 key;
5. the whole license is inserted in one transaction; ``UNIQUE (model, class, confidence)`` refuses a
   slot another process took meanwhile, and the call then retries with another slot.

Nothing is written before step 5, so a crash leaves no slot taken without a license. Inputs and
outputs are plain values and store records; refusals are :mod:`license_server.errors`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from activeguard.credentials import licenses as lic
from activeguard.credentials.fo_space import FO
from activeguard.credentials.revocations import sign_revocations
from license_server.checkpoints import fingerprint_from_bytes
from license_server.config import ServerConfig
from license_server.errors import ClientGone, Conflict, GenerationFailed, InvalidRequest, NotFound
from license_server.generation import FingerprintGenerator, SlotFailed
from license_server.logs import log_event
from license_server.metrics import Metrics
from license_server.pool import FingerprintPool
from license_server.registry import LoadedModel, ModelRegistry, Registration
from license_server.slots import Slot, SlotAllocator
from license_server.store import LicenseRecord, ModelRecord, RevocationRecord, SigningKeyRecord, SlotTaken, Store
from license_server.validation import MAX_ID, check_issue, check_list, check_reason, check_text, shown

__all__ = ["Issuer", "Registration", "license_state"]

MAX_REVOCATION_PAGE = 10000
FIRST_BATCH_WAIT_S = 10.0  # how long an issue waits for a just-registered model's first pooled batch


@dataclass(frozen=True)
class Registered:
    model: ModelRecord
    created: bool
    issued: int
    pregenerated: int
    pregeneration_target: int = 0  # the pool size filling goes on towards (0: none)


@dataclass(frozen=True)
class LicensePage:
    licenses: list[LicenseRecord]
    next_page_token: str  # '' on the last page


@dataclass(frozen=True)
class VerificationKey:
    key: SigningKeyRecord
    current: bool


def license_state(r: LicenseRecord, now: int | None = None) -> str:
    """'revoked', 'expired' or 'active', as of ``now``."""
    if r.revoked:
        return "revoked"
    return "expired" if r.expires_at <= (int(time.time()) if now is None else now) else "active"


class Issuer:
    """Every license operation of one server, composed of the collaborators above."""

    def __init__(self, config: ServerConfig, store: Store, key, metrics: Metrics):
        self.cfg = config
        self.store = store
        self.key = key
        self.key_id = lic.key_id(key.public_key())
        self.metrics = metrics
        self.allocator = SlotAllocator(metrics)
        self.registry = ModelRegistry(config, store, self.allocator)
        self.generator = FingerprintGenerator(config, metrics, self.allocator)
        self.pool = FingerprintPool(config, store, self.allocator, self.generator, metrics)

    def close(self) -> None:
        self.pool.stop()
        self.generator.close()  # cancels queued batches, so a filler waiting on one ends now
        self.pool.join()

    def register(self, req: Registration) -> Registered:
        """Register (or find again) a classifier of any source and its protection profile; optionally
        pre-generate (every slot of a paper space, 1,000 of a ranked one, or ``pregenerate_count``)."""
        m, created = self.registry.register(req)
        target = 0
        if req.pregenerate:  # the first batch before the call returns, the rest in the background
            target = req.pregenerate_count or self.pool.default_count(m)
            self.pool.fill(m, target)
        elif self.cfg.pregenerate_on_register:  # everything in the background, a small batch first
            target = req.pregenerate_count or min(self.cfg.register_pool, self.pool.default_count(m))
            if not self.pool.fill(m, target, now=False):
                target = 0
        row = m.row
        log_event(
            logging.INFO,
            "model registered" if created else "model already registered",
            model_id=row.model_id[:16],
            name=row.name,
            source=row.source,
            capacity=row.capacity,
        )
        return Registered(
            model=row,
            created=created,
            issued=self.store.count_licenses(row.model_id),
            pregenerated=len(m.slots.pool),
            pregeneration_target=target,
        )

    def issue(
        self, model_id: str, user: str, validity_seconds: int, still_wanted: Callable[[], bool] = lambda: True
    ) -> LicenseRecord:
        """Allocate, generate, re-check, sign and store one license; ``still_wanted`` is asked before signing."""
        start = time.perf_counter()
        validity = check_issue(user, model_id, validity_seconds, self.cfg.default_validity)
        m = self.registry.get(model_id)
        self.pool.wait_for_first(m, FIRST_BATCH_WAIT_S)
        lost: set[Slot] = set()  # slots this call gave up: hard FOs, or taken by a concurrent issuer
        failed: list[str] = []
        for _attempt in range(len(m.slots.all_slots) + 1):
            slot = self.allocator.reserve(m.slots, lost)
            try:
                got = self._fingerprint(m, slot, failed)
                if got is not None:
                    raw, path = got
                    if not still_wanted():
                        raise ClientGone("the client went away before the license was signed")
                    payload, signed = self._sign(m, slot, user, raw, validity)
                    stored = self._store(m, slot, user, payload, signed)
            finally:
                self.allocator.release(m.row.model_id, slot)
            if got is None or not stored:
                lost.add(slot)
                continue
            self.allocator.mark_taken(m.slots, slot)
            self._issued(m, slot, user, payload, path, start)
            return self.get(payload.license_id)
        raise Conflict("lost every candidate slot to concurrent issuers; retry")

    def _fingerprint(self, m: LoadedModel, slot: Slot, failed: list[str]) -> tuple[bytes, str] | None:
        """(raw fingerprint, 'pregenerated'|'generated'), re-checked: the pool's, else a new one. None
        when no fingerprint reached this slot's FO (a hard FO: the caller tries another slot, three at most)."""
        raw = self.pool.take(m, slot)
        if raw is not None:
            return raw, "pregenerated"
        try:
            return self.generator.on_demand(m, slot), "generated"
        except SlotFailed as exc:
            failed.append(str(exc))
            if len(failed) >= 3:
                raise GenerationFailed("; ".join(failed) + f" (after {len(failed)} slots)") from None
            return None

    def _sign(
        self, m: LoadedModel, slot: Slot, user: str, raw: bytes, validity: int
    ) -> tuple[lic.LicensePayload, lic.SignedLicense]:
        payload = lic.make_payload(
            model_id=m.row.model_id,
            user=user,
            user_index=m.slots.user_index(slot),
            fo=m.slots.fo(slot),
            epsilon=m.row.epsilon,
            fingerprint=fingerprint_from_bytes(raw, m.row.input_shape),
            key=self.key,
            validity_seconds=validity,
            encoding=m.row.encoding,
        )
        return payload, lic.sign_license(payload, self.key)

    def _store(
        self, m: LoadedModel, slot: Slot, user: str, payload: lic.LicensePayload, signed: lic.SignedLicense
    ) -> bool:
        """Insert the whole license in one transaction; False when a concurrent issuer took the slot."""
        try:
            self.store.insert_license(
                dict(
                    license_id=payload.license_id,
                    model_id=payload.model_id,
                    user_name=user,
                    fo_class=slot[0],
                    conf_index=slot[1],
                    fo_confidence=payload.fo_confidence,
                    user_index=payload.user_index,
                    payload=signed.payload,
                    signature=signed.signature,
                    key_id=signed.key_id,
                    issued_at=payload.issued_at,
                    expires_at=payload.expires_at,
                )
            )
            return True
        except SlotTaken:
            self.metrics.slot_conflicts.inc()
            self.allocator.mark_taken(m.slots, slot)
            log_event(
                logging.INFO,
                "slot taken by a concurrent issuer; retrying",
                model_id=m.row.model_id[:16],
                fo_class=slot[0],
                conf_index=slot[1],
            )
            return False

    def _issued(
        self, m: LoadedModel, slot: Slot, user: str, payload: lic.LicensePayload, path: str, start: float
    ) -> None:
        elapsed = time.perf_counter() - start
        self.metrics.issued.labels(m.row.model_id[:16]).inc()
        self.metrics.issue_latency.labels(path).observe(elapsed)
        log_event(
            logging.INFO,
            "license issued",
            license_id=payload.license_id,
            model_id=m.row.model_id[:16],
            user=user,
            fo_class=slot[0],
            fo_index=slot[1],
            path=path,
            seconds=round(elapsed, 4),
        )

    # -- reading and revoking ------------------------------------------------------------------

    def get(self, license_id: str) -> LicenseRecord:
        check_text("license_id", license_id, limit=MAX_ID, required=True)
        r = self.store.get_license(license_id)
        if r is None:
            raise NotFound(f"no license {shown(license_id)}")
        return r

    def list(self, *, model_id: str, user: str, state: str, page_size: int, page_token: str) -> LicensePage:
        """One page of licenses in issue order; ``state`` is '' (all), 'active', 'revoked' or 'expired'."""
        size, after = check_list(page_size, page_token, model_id, user)
        rows = self.store.list_licenses(model_id=model_id, user=user, state=state, after_seq=after, limit=size + 1)
        more, rows = len(rows) > size, rows[:size]
        return LicensePage(licenses=rows, next_page_token=str(rows[-1].seq) if more and rows else "")

    def revoke(self, license_id: str, reason: str) -> LicenseRecord:
        """Revoke a license (idempotent: revoking twice keeps the first reason and time)."""
        check_text("license_id", license_id, limit=MAX_ID, required=True)
        check_reason(reason)
        r, new = self.store.revoke(license_id, reason or "unspecified")
        if r is None:
            raise NotFound(f"no license {shown(license_id)}")
        if new:
            self.revoked(r)
        return r

    def revoked(self, r: LicenseRecord) -> None:
        """Count and log a revocation (by an admin, or by the journal ingester for a suspend alert)."""
        self.metrics.revocations.inc()
        log_event(logging.INFO, "license revoked", license_id=r.license_id, model_id=r.model_id[:16])

    def revocations(self, since: int, model_id: str, page_size: int) -> tuple[list[RevocationRecord], int]:
        """(revocations after sequence ``since``, the cursor to pass next time)."""
        if since < 0:
            raise InvalidRequest(f"since must be >= 0, got {since}")
        check_text("model_id", model_id, limit=MAX_ID)
        rows = self.store.list_revocations(since, model_id, min(page_size or 1000, MAX_REVOCATION_PAGE))
        return rows, rows[-1].seq if rows else since

    def revocation_list(self, model_id: str = "") -> tuple[str, int]:
        """(the signed revocation list's text, its version): every license revoked (of ``model_id``, or
        of all), signed with this server's license key (:mod:`activeguard.credentials.revocations`)."""
        check_text("model_id", model_id, limit=MAX_ID)
        version, revoked = self.store.revocation_snapshot(model_id)
        self.metrics.revocation_version.set(version)
        return sign_revocations(revoked, version, self.key, model_id=model_id), version

    def fo_of(self, r: LicenseRecord) -> FO:
        """A license's whole FO, from its model's FO space."""
        return self.registry.fo_of(r)

    def verification_keys(self) -> list[VerificationKey]:
        return [VerificationKey(key=k, current=k.key_id == self.key_id) for k in self.store.keys()]
