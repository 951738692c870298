"""License issuance: allocation, fingerprint generation, signing, storage and revocation, without gRPC.

Issuance, step by step (DESIGN §3 "License"):

1. pick a free slot (model, class t, FO index j) that neither the store nor an in-flight call of
   this process holds, nor natural inputs reach (dense FO spaces), pre-generated slots first;
2. get its fingerprint: the pre-generated one, or a fresh C&W example from
   :func:`activeguard.fingerprints.generate_fingerprints` on the generation worker (never on a
   gRPC thread), where every request waiting at that moment joins one batched optimization;
3. re-check the exact bytes that will be signed through the registered model (checked against its
   model id when loaded) with the core control layer: it must authenticate as this slot's user;
4. sign the canonical payload with the server's Ed25519 key;
5. insert the whole license in one transaction; ``UNIQUE (model, class, confidence)`` refuses a
   slot another process took meanwhile, and the call then retries with another slot.

Nothing is written before step 5, so a crash leaves no slot taken without a license. Inputs and
outputs are plain values and store records; refusals are :mod:`license_server.errors`.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from activeguard import inputs, sources
from activeguard import licenses as lic
from activeguard.control import PAPER_EPSILON, ControlConfig, configured
from activeguard.fingerprints import FingerprintSearch, authenticate, encode, generate_fingerprints, natural_users
from activeguard.fo_space import FO
from license_server.checkpoints import (
    STORED_SUFFIXES,
    fingerprint_from_bytes,
    model_code_file,
    registered_classifier,
    staged_model_code,
    stored_suffix,
)
from license_server.config import ServerConfig
from license_server.errors import (
    ClientGone,
    Conflict,
    Exhausted,
    GenerationFailed,
    InvalidRequest,
    IssuanceError,
    NotFound,
    PreconditionFailed,
    TimedOut,
    Unavailable,
)
from license_server.logs import log_event
from license_server.metrics import Metrics
from license_server.store import (
    LicenseRecord,
    ModelRecord,
    RevocationRecord,
    SigningKeyRecord,
    SlotTaken,
    Store,
)
from license_server.validation import (
    MAX_ID,
    check_issue,
    check_list,
    check_model_code,
    check_reason,
    check_register,
    check_text,
    parse_input_spec,
    shown,
)

Slot = tuple[int, int]  # (FO class t, index j of the FO among class t's): user t·T + j
COLD_LR, WARM_LR = 0.2, 0.1  # on-demand step sizes from noise and from a neighbouring FO's fingerprint


class _SlotFailed(Exception):
    """No fingerprint reached this slot's FO: the issuer moves on to another slot."""


def _pair(fo: FO) -> tuple[int, int | None]:
    return fo.target, fo.runner_up


MAX_REVOCATION_PAGE = 10000


@dataclass
class LoadedModel:
    """A registered model in memory: ``module`` is the model as a client reaches it (``inputs.ClientView``)."""

    row: ModelRecord
    module: torch.nn.Module
    spec: inputs.InputSpec
    config: ControlConfig
    all_slots: list[Slot] = field(default_factory=list)
    # This process's view, kept current as it issues (the store's UNIQUE constraint has the last word):
    taken: set[Slot] = field(default_factory=set)  # issued
    pool: set[Slot] = field(default_factory=set)  # with a pre-generated fingerprint
    blocked: set[Slot] = field(default_factory=set)  # reached by natural inputs: never issued
    # the last good fingerprint per (class, runner-up): where the next on-demand search of that pair starts
    neighbours: dict[tuple[int, int | None], torch.Tensor] = field(default_factory=dict)

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


@dataclass(frozen=True)
class Registration:
    """A RegisterModel request in plain values (exactly one of ``model_path`` and ``checkpoint``).

    ``model_path``/``checkpoint`` may hold any model source; a state dict comes with its network's
    code (``model_file_text``, ``model_class``), and ``input_spec`` (JSON) settles what a file does
    not say about its input.
    """

    model_path: str = ""
    checkpoint: bytes = b""
    model_file_text: str = ""
    model_class: str = ""
    input_spec: str = ""
    name: str = ""
    expected_model_id: str = ""
    encoding: str = ""
    num_classes: int = 0
    confidences: tuple[float, ...] = ()
    epsilon: float = 0.0
    pregenerate: bool = False
    fo_scheme: str = ""
    runner_up_confidences: tuple[float, ...] = ()
    pregenerate_count: int = 0


@dataclass(frozen=True)
class Registered:
    model: ModelRecord
    created: bool
    issued: int
    pregenerated: int


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
    """Every license operation of one server: owns the loaded models, slot reservations and the generation worker."""

    def __init__(self, config: ServerConfig, store: Store, key, metrics: Metrics):
        self.cfg = config
        self.store = store
        self.key = key
        self.key_id = lic.key_id(key.public_key())
        self.metrics = metrics
        self._models: dict[str, LoadedModel] = {}
        self._models_lock = threading.Lock()
        self._reserved: dict[str, set[Slot]] = {}
        self._reserve_lock = threading.Lock()
        # One worker: torch already uses every core for one batch; requests queue, never block gRPC I/O.
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fingerprint-gen")
        self._rng = random.Random()
        # on-demand requests waiting to join their model's search: (slot, start cold, answer)
        self._pending: dict[str, list[tuple[Slot, bool, concurrent.futures.Future]]] = {}
        self._searching: set[str] = set()  # models whose on-demand search runs or is queued
        self._noise = torch.Generator().manual_seed(random.SystemRandom().randrange(2**31))
        self._pending_lock = threading.Lock()
        self._fillers: dict[str, threading.Thread] = {}  # background pre-generation, per model
        self._fillers_lock = threading.Lock()
        self._closing = threading.Event()
        self._controls: dict[str, ControlConfig] = {}  # model id -> FO space, for describing licenses

    def close(self) -> None:
        self._closing.set()
        self.pool.shutdown(wait=True, cancel_futures=True)
        with self._fillers_lock:
            fillers = list(self._fillers.values())
        for filler in fillers:
            filler.join(timeout=self.cfg.generation_timeout)

    # -- models --------------------------------------------------------------------------------

    def model(self, model_id: str) -> LoadedModel:
        """The registered model, loaded once and checked against its model id (the file may have changed)."""
        with self._models_lock:
            loaded = self._models.get(model_id)
            if loaded is not None:
                return loaded
            row = self.store.get_model(model_id)
            if row is None:
                raise NotFound(f"model {shown(model_id)} is not registered (RegisterModel first)")
            try:
                model = registered_classifier(
                    Path(row.model_path), f"model file {row.model_path!r}", self._options(row)
                )
            except IssuanceError as exc:
                raise PreconditionFailed(
                    f"the registered model file of model {row.model_id[:16]}… cannot be used any more: {exc}"
                ) from None
            if model.model_id != row.model_id:
                raise PreconditionFailed(
                    f"the model file at the registered path now has model id {model.model_id[:16]}…, "
                    f"not the registered {row.model_id[:16]}…; refusing to issue for it"
                )
            loaded = self._loaded(row, model)
            self._models[model_id] = loaded
        self._refresh_free_slots(loaded)
        return loaded

    def _loaded(self, row: ModelRecord, model: sources.LoadedModel) -> LoadedModel:
        """The model with its slots: issued and pre-generated ones read once from the store, and for a
        dense FO space the FOs uniform noise reaches (seeded, so every server blocks the same ones)."""
        config = row.control
        slots = [(t, j) for t in range(row.num_classes) for j in range(config.per_class)]
        m = LoadedModel(row=row, module=model.model, spec=model.spec, config=config, all_slots=slots)
        if config.space.dense:
            natural = natural_users(m.module, config, model.spec.shape, model.spec.bounds)
            m.blocked = {m.slot_of(u) for u in natural}
        m.taken = self.store.taken_slots(row.model_id)
        m.pool = self.store.pregenerated_slots(row.model_id) - m.taken
        return m

    @property
    def _models_dir(self) -> Path:
        return self.cfg.data_dir / "models"

    def _options(self, row: ModelRecord) -> sources.SourceOptions:
        """How to load a registered model again: its recorded code (eager convention) and input spec."""
        code = model_code_file(self._models_dir, row.model_file_text) if row.model_file_text else None
        spec = inputs.InputSpec.from_dict(json.loads(row.input_spec)) if row.input_spec else None
        return sources.SourceOptions(
            code, row.model_class, inputs.SpecOverrides.pinned(spec) if spec else inputs.SpecOverrides()
        )

    @staticmethod
    def _named(model_path: str, options: sources.SourceOptions) -> tuple[Path, sources.LoadedModel]:
        """(resolved path, classifier) for a model path on the server's file system."""
        try:
            path = Path(model_path).resolve()
        except (OSError, RuntimeError) as exc:  # symlink loops and the like
            raise InvalidRequest(
                f"model_path {shown(model_path, 200)} cannot be resolved ({type(exc).__name__})"
            ) from None
        return path, registered_classifier(path, f"model file {shown(str(path), 200)}", options)

    def _uploaded(self, data: bytes, options: sources.SourceOptions) -> tuple[Path, sources.LoadedModel]:
        """(stored path, classifier) for uploaded model bytes, stored in their own format; nothing stays
        on disk when they are refused."""
        self._models_dir.mkdir(parents=True, exist_ok=True)
        unnamed = self._models_dir / f"upload-{threading.get_ident()}-{time.time_ns()}"
        unnamed.write_bytes(data)
        tmp = unnamed.rename(unnamed.with_name(unnamed.name + stored_suffix(unnamed, options)))
        try:
            model = registered_classifier(tmp, f"the uploaded checkpoint ({len(data)} bytes)", options)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        path = self._models_dir / f"{model.model_id}{STORED_SUFFIXES[model.source.name]}"
        tmp.replace(path)
        return path, model

    def register(self, req: Registration) -> Registered:
        """Register (or find again) a classifier of any source and its protection profile; optionally
        pre-generate every slot."""
        encoding = check_register(req.model_path, req.checkpoint, req.name, req.expected_model_id, req.encoding)
        check_model_code(req.model_file_text, req.model_class)
        spec = parse_input_spec(req.input_spec)
        overrides = inputs.SpecOverrides.pinned(spec) if spec else inputs.SpecOverrides()
        with staged_model_code(self._models_dir, req.model_file_text) as code:
            options = sources.SourceOptions(code, req.model_class or None, overrides)
            path, model = (
                self._uploaded(req.checkpoint, options) if req.checkpoint else self._named(req.model_path, options)
            )
        mid = model.model_id
        if req.expected_model_id and req.expected_model_id != mid:
            raise PreconditionFailed(
                f"the model has model id {mid[:16]}…, not the expected {req.expected_model_id[:16]}…"
            )
        width = model.num_classes
        k = req.num_classes or width
        if k != width:
            raise InvalidRequest(f"num_classes={k} but the model outputs {width} values")
        try:
            config = configured(
                k,
                scheme=req.fo_scheme,
                confidences=tuple(req.confidences),
                runner_up_confidences=tuple(req.runner_up_confidences),
                epsilon=req.epsilon or PAPER_EPSILON,
            )
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        row = ModelRecord(
            model_id=mid,
            name=req.name or mid[:16],
            num_classes=k,
            confidences=config.confidences,
            epsilon=config.epsilon,
            input_shape=model.spec.shape,
            encoding=encoding,
            model_path=str(path),
            created_at=int(time.time()),
            source=model.source.name,
            model_class=model.model_class,
            model_file_text=req.model_file_text if model.source.name == "eager" else None,
            input_spec=json.dumps(model.spec.to_dict(), sort_keys=True),
            runner_up_confidences=config.runner_up_confidences,
        )
        row, created = self.store.add_model(row)
        with self._models_lock:
            m = self._models.get(mid)
        if m is None:
            fresh = self._loaded(row, model)
            with self._models_lock:
                m = self._models.setdefault(mid, fresh)
        self._refresh_free_slots(m)
        if req.pregenerate:
            self.pregenerate(m, req.pregenerate_count or self.default_pregeneration(m))
        log_event(
            logging.INFO,
            "model registered" if created else "model already registered",
            model_id=mid[:16],
            name=row.name,
            source=row.source,
            capacity=row.capacity,
        )
        return Registered(
            model=row,
            created=created,
            issued=self.store.count_licenses(mid),
            pregenerated=len(m.pool),
        )

    # -- pre-generation ------------------------------------------------------------------------

    @staticmethod
    def default_pregeneration(m: LoadedModel) -> int:
        """Every slot of a sparse (paper) space; 1,000 of a dense one (more on request)."""
        return 1000 if m.config.space.dense else len(m.all_slots)

    def pregeneration_todo(self, m: LoadedModel, count: int, tried: frozenset[Slot] = frozenset()) -> list[Slot]:
        """Free slots without a fingerprint (and not ``tried`` in this run) to bring the pool to ``count``.
        The store is the progress: a run stopped anywhere resumes there, and nothing is generated twice."""
        with self._reserve_lock:
            missing = max(0, count - len(m.pool))
            free = m.free(m.pool, self._reserved.get(m.row.model_id, set()), tried) if missing else []
        random.Random(m.row.model_id).shuffle(free)
        return free[:missing]

    def pregeneration_batches(self, m: LoadedModel, count: int, size: int) -> Iterator[list[Slot]]:
        """Batches of slots to generate until the pool holds ``count`` (or every free slot was tried once:
        a slot whose fingerprint failed the re-check is not tried again in the same run)."""
        tried: set[Slot] = set()
        while not self._closing.is_set():
            todo = self.pregeneration_todo(m, count, frozenset(tried))[:size]
            if not todo:
                return
            tried.update(todo)
            yield todo

    def pregenerate_batch(self, m: LoadedModel, slots: list[Slot]) -> int:
        """Generate ``slots`` in one batch on the worker and store those that pass; returns how many."""
        fut = self._submit(self._generate, m, slots, self._rng.randrange(2**31))
        return self._pooled(m, fut.result(timeout=self.cfg.generation_timeout))

    def _pooled(self, m: LoadedModel, got: dict[Slot, bytes]) -> int:
        """Store generated fingerprints in the pool (and as neighbours for on-demand starts)."""
        self.store.save_pregenerated(m.row.model_id, [(c, j, raw) for (c, j), raw in got.items()])
        with self._reserve_lock:
            m.pool.update(s for s in got if s not in m.taken)
        for slot, raw in got.items():
            self._remember(m, slot, fingerprint_from_bytes(raw, m.row.input_shape))
        self.metrics.generated.labels("pregenerated").inc(len(got))
        self.metrics.pregenerated.labels(m.row.model_id[:16]).set(len(m.pool))
        return len(got)

    def pregenerate(self, m: LoadedModel, count: int) -> None:
        """Fill the pool to ``count``: the first batch now, the rest on a background thread (progress in
        the ``activeguard_pregenerated_fingerprints`` gauge). One filler per model at a time."""
        mid = m.row.model_id
        self.metrics.pregeneration_target.labels(mid[:16]).set(count)
        todo = self.pregeneration_todo(m, count)
        if not todo:
            return
        batch = self.cfg.pregeneration_batch
        self._pregenerate_logged(m, todo[:batch])
        # more to do, or the first batch lost fingerprints that failed their re-check: the filler
        # goes on with other free slots until the pool holds ``count`` (or every slot was tried)
        if len(m.pool) < count:
            with self._fillers_lock:
                running = self._fillers.get(mid)
                if running is not None and running.is_alive():
                    return
                filler = threading.Thread(
                    target=self._fill, args=(m, count), name=f"pregenerate-{mid[:8]}", daemon=True
                )
                self._fillers[mid] = filler
                filler.start()

    def _fill(self, m: LoadedModel, count: int) -> None:
        try:
            for todo in self.pregeneration_batches(m, count, self.cfg.pregeneration_batch):
                self._pregenerate_logged(m, todo)
        except Exception as exc:  # a store outage or shutdown ends the filler; the next RegisterModel resumes it
            log_event(logging.WARNING, "pre-generation stopped", model_id=m.row.model_id[:16], error=str(exc))

    def _pregenerate_logged(self, m: LoadedModel, slots: list[Slot]) -> int:
        start = time.perf_counter()
        ok = self.pregenerate_batch(m, slots)
        log_event(
            logging.INFO,
            "pregenerated fingerprints",
            model_id=m.row.model_id[:16],
            slots=len(slots),
            ok=ok,
            pool=len(m.pool),
            seconds=round(time.perf_counter() - start, 3),
        )
        return ok

    # -- issuance ------------------------------------------------------------------------------

    def issue(
        self, model_id: str, user: str, validity_seconds: int, still_wanted: Callable[[], bool] = lambda: True
    ) -> LicenseRecord:
        """Allocate, generate, re-check, sign and store one license; ``still_wanted`` is asked before signing."""
        start = time.perf_counter()
        validity = check_issue(user, model_id, validity_seconds, self.cfg.default_validity)
        m = self.model(model_id)
        lost: set[Slot] = set()
        failed: list[str] = []
        for _attempt in range(len(m.all_slots) + 1):
            slot = self._reserve(m, lost)
            try:
                try:
                    raw, path = self._fingerprint_for(m, slot)
                except _SlotFailed as exc:  # a hard FO for this model: another slot, at most three
                    lost.add(slot)
                    failed.append(str(exc))
                    if len(failed) >= 3:
                        raise GenerationFailed("; ".join(failed) + f" (after {len(failed)} slots)") from None
                    continue
                if not still_wanted():
                    raise ClientGone("the client went away before the license was signed")
                payload = lic.make_payload(
                    model_id=m.row.model_id,
                    user=user,
                    user_index=m.user_index(slot),
                    fo=m.fo(slot),
                    epsilon=m.row.epsilon,
                    fingerprint=fingerprint_from_bytes(raw, m.row.input_shape),
                    key=self.key,
                    validity_seconds=validity,
                    encoding=m.row.encoding,
                )
                signed = lic.sign_license(payload, self.key)
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
                except SlotTaken:
                    self.metrics.slot_conflicts.inc()
                    lost.add(slot)
                    self._mark_taken(m, slot)
                    log_event(
                        logging.INFO,
                        "slot taken by a concurrent issuer; retrying",
                        model_id=m.row.model_id[:16],
                        fo_class=slot[0],
                        conf_index=slot[1],
                    )
                    continue
            finally:
                self._release(m.row.model_id, slot)
            self._mark_taken(m, slot)
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
            return self.get(payload.license_id)
        raise Conflict("lost every candidate slot to concurrent issuers; retry")

    def _submit(self, fn: Callable, *args) -> concurrent.futures.Future:
        """Queue work on the generation worker; a stopped worker means the server is going away."""
        try:
            return self.pool.submit(fn, *args)
        except RuntimeError:  # submit after shutdown
            raise Unavailable("the license server is shutting down; retry") from None

    # -- generation (runs on the worker thread) -------------------------------------------------

    def _generate(self, m: LoadedModel, slots: list[Slot], seed: int) -> dict[Slot, bytes]:
        """Fingerprints for ``slots`` in one batch; only those that pass the re-check are returned."""
        start = time.perf_counter()
        users = [m.user_index(s) for s in slots]
        torch.set_num_threads(max(1, torch.get_num_threads()))
        fps = generate_fingerprints(
            m.module,
            m.config,
            users,
            input_shape=m.row.input_shape,
            bounds=m.spec.bounds,
            encoding=m.row.encoding,
            seed=seed,
            max_steps=self.cfg.max_steps,
        )
        self.metrics.generation.observe(time.perf_counter() - start)
        out = {}
        for i, slot in enumerate(slots):
            if bool(fps.success[i]):
                raw, _, _, _ = lic.fingerprint_bytes(fps.inputs[i : i + 1])
                if self._recheck(m, slot, raw):
                    out[slot] = raw
        return out

    def _recheck(self, m: LoadedModel, slot: Slot, raw: bytes) -> bool:
        """The exact bytes to be signed, decoded as a verifier will, through the registered model."""
        x = fingerprint_from_bytes(raw, m.row.input_shape)
        if not torch.equal(encode(x, m.row.encoding, m.spec.bounds), x):
            return False
        authorized, user = authenticate(m.module, x, m.config)
        return bool(authorized[0]) and int(user[0]) == m.user_index(slot)

    def _fingerprint_for(self, m: LoadedModel, slot: Slot) -> tuple[bytes, str]:
        """(raw fingerprint, 'pregenerated'|'generated'), re-checked. A pooled one is read and checked
        on the calling thread (one row through the model); a new one waits for the worker's next batch."""
        if slot in m.pool:
            raw = self.store.pregenerated_for(m.row.model_id, slot)
            if raw is not None and self._recheck(m, slot, raw):
                self._remember(m, slot, fingerprint_from_bytes(raw, m.row.input_shape))
                return raw, "pregenerated"
        for cold in (False, True):  # from a neighbour's fingerprint (if any), then from noise
            fut = self._on_demand(m, slot, cold)
            try:
                raw = fut.result(timeout=self.cfg.generation_timeout)
            except concurrent.futures.TimeoutError:
                fut.cancel()
                raise TimedOut("fingerprint generation timed out") from None
            if raw is not None:
                return raw, "generated"
        raise _SlotFailed(f"no fingerprint reached the FO ({m.fo(slot)}) ± {m.row.epsilon / 2}")

    def _on_demand(self, m: LoadedModel, slot: Slot, cold: bool = False) -> concurrent.futures.Future:
        """Queue ``slot`` for the worker's running search of ``m`` (starting one if none runs)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        mid = m.row.model_id
        with self._pending_lock:
            self._pending.setdefault(mid, []).append((slot, cold, fut))
            start = mid not in self._searching
            self._searching.add(mid)
        if start:
            try:
                if not m.neighbours:  # the model's first on-demand search: give it starting points first
                    self._prime(m)
                self._submit(self._search, m)
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
                    (row,) = search.add_users(m.config, [m.user_index(slot)], start, lr=lr)
                    running[row] = (slot, fut)
                if joining:
                    self.metrics.on_demand_batch.observe(search.active)
                for done in search.step():
                    slot, fut = running.pop(done.row)
                    raw = lic.fingerprint_bytes(done.x[None])[0] if done.hit else None
                    ok = raw is not None and self._recheck(m, slot, raw)
                    if ok:
                        self.metrics.generated.labels("on_demand").inc()
                        self._remember(m, slot, done.x[None])
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
        with self._reserve_lock:
            by_class: dict[int, list[Slot]] = {}
            for slot in m.free(m.pool):
                by_class.setdefault(slot[0], []).append(slot)
        slots = [rng.choice(free) for free in by_class.values()]

        def run() -> None:
            try:
                for slot, raw in self._generate(m, slots, self._rng.randrange(2**31)).items():
                    self._remember(m, slot, fingerprint_from_bytes(raw, m.row.input_shape))
            except Exception as exc:  # priming is an optimization: issuance works without it
                log_event(logging.WARNING, "priming failed", model_id=m.row.model_id[:16], error=str(exc))

        if slots:
            self._submit(run)

    def _start(self, m: LoadedModel, slot: Slot, cold: bool) -> tuple[torch.Tensor, float]:
        """(start, step size) of an on-demand row: the last good fingerprint of the same (class,
        runner-up) pair when there is one (a neighbour in the FO grid: about half the steps,
        measured), else of the same class, else, or when ``cold``, uniform noise over the input range."""
        fo = m.fo(slot)
        near = None if cold else m.neighbours.get(_pair(fo), m.neighbours.get((fo.target, -1)))
        if near is not None:
            return near, WARM_LR
        low, high = m.spec.bounds
        return low + (high - low) * torch.rand(1, *m.row.input_shape, generator=self._noise), COLD_LR

    @staticmethod
    def _remember(m: LoadedModel, slot: Slot, x: torch.Tensor) -> None:
        fo = m.fo(slot)
        m.neighbours[_pair(fo)] = m.neighbours[(fo.target, -1)] = x  # (t, −1): any runner-up of class t

    # -- slots ---------------------------------------------------------------------------------

    def _reserve(self, m: LoadedModel, exclude: set[Slot]) -> Slot:
        """A free slot, pooled ones first; random draws while the space is mostly free, a full scan after."""
        mid = m.row.model_id
        with self._reserve_lock:
            reserved = self._reserved.setdefault(mid, set())
            ready = m.pool - m.taken - m.blocked - reserved - exclude  # set algebra: the pool may hold 10,000
            slot = self._rng.choice(tuple(ready)) if ready else None
            for _ in range(64 if slot is None else 0):
                candidate = self._rng.choice(m.all_slots)
                if m.is_free(candidate, reserved, exclude):
                    slot = candidate
                    break
            if slot is None:
                free = m.free(reserved, exclude)
                if not free:
                    raise Exhausted(self._exhausted(m, len(reserved)))
                slot = self._rng.choice(free)
            reserved.add(slot)
            return slot

    def _exhausted(self, m: LoadedModel, in_flight: int) -> str:
        cap, issued, blocked = len(m.all_slots), len(m.taken), len(m.blocked)
        space = m.config.space
        what = f"{cap} license slots of model {m.row.model_id[:16]}… ({space.scheme} FO space, {space.describe()['formula']}"
        what += f"; {blocked} reached by natural inputs are never issued)" if blocked else ")"
        if in_flight:
            return f"all {what} are issued or being issued ({issued} issued, {in_flight} in flight)"
        return f"all {what} are issued; no FO is ever reused"

    def _mark_taken(self, m: LoadedModel, slot: Slot) -> None:
        """Record an issued slot (ours or a concurrent issuer's) and publish the gauges."""
        with self._reserve_lock:
            m.taken.add(slot)
            m.pool.discard(slot)
        self._refresh_free_slots(m)

    def _refresh_free_slots(self, m: LoadedModel) -> None:
        """Publish the slots still free to issue (neither issued nor reached by natural inputs)."""
        with self._reserve_lock:
            free = len(m.all_slots) - len(m.taken | m.blocked)
        self.metrics.free_slots.labels(m.row.model_id[:16]).set(free)
        self.metrics.pregenerated.labels(m.row.model_id[:16]).set(len(m.pool))

    def _release(self, model_id: str, slot: Slot) -> None:
        with self._reserve_lock:
            self._reserved.get(model_id, set()).discard(slot)

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
            self.metrics.revocations.inc()
            log_event(logging.INFO, "license revoked", license_id=r.license_id, model_id=r.model_id[:16])
        return r

    def revocations(self, since: int, model_id: str, page_size: int) -> tuple[list[RevocationRecord], int]:
        """(revocations after sequence ``since``, the cursor to pass next time)."""
        if since < 0:
            raise InvalidRequest(f"since must be >= 0, got {since}")
        check_text("model_id", model_id, limit=MAX_ID)
        rows = self.store.list_revocations(since, model_id, min(page_size or 1000, MAX_REVOCATION_PAGE))
        return rows, rows[-1].seq if rows else since

    def fo_of(self, r: LicenseRecord) -> FO:
        """A license's whole FO, from its model's FO space (built once per model)."""
        config = self._controls.get(r.model_id)
        if config is None:
            row = self.store.get_model(r.model_id)
            if row is None:
                return FO(r.fo_class, r.fo_confidence)
            config = self._controls.setdefault(r.model_id, row.control)
        return config.fo_of_user(r.user_index)

    def verification_keys(self) -> list[VerificationKey]:
        return [VerificationKey(key=k, current=k.key_id == self.key_id) for k in self.store.keys()]
