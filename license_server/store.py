"""The license store: SQLAlchemy Core over SQLite (default) or PostgreSQL (``postgresql+psycopg://``).

Invariants the schema itself enforces (not just the code):

- one license per slot, ever: ``UNIQUE (model_id, fo_class, conf_index)`` on ``licenses``; a
  revoked license keeps its row, so an FO is never handed out twice. A slot is (class t, index j
  of the FO among class t's FOs): the paper's confidence index, or the ranked space's FO number
  (:mod:`activeguard.credentials.fo_space`), so the same constraint serves both spaces;
- a license row is inserted whole (payload, signature, FO) in one transaction, together with the
  removal of the slot's pre-generated fingerprint, so a crash leaves the license or nothing;
- ``schema_version`` holds the schema's version; a newer database is refused, an older one is
  migrated step by step by :data:`MIGRATIONS`.
"""

from __future__ import annotations

import functools
import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    delete,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from activeguard.credentials.control import ControlConfig
from activeguard.runtime.database import database_errors, describe, lock_schema, open_engine
from activeguard.runtime.database import redact_url as redact_url  # the server logs the URL through the store

SCHEMA_VERSION = 4
# version -> list of SQL statements that migrate from version-1 to version.
MIGRATIONS: dict[int, list[str]] = {
    # 2: any model source (activeguard.models.sources), not only project checkpoints: how to load each model
    2: [
        "ALTER TABLE ag_models ADD COLUMN source VARCHAR(32) NOT NULL DEFAULT 'checkpoint'",
        "ALTER TABLE ag_models ADD COLUMN model_class TEXT",
        "ALTER TABLE ag_models ADD COLUMN model_file_text TEXT",
        "ALTER TABLE ag_models ADD COLUMN input_spec TEXT",
    ],
    # 3: the ranked FO space (activeguard.credentials.fo_space); NULL: the paper's space, as every older model
    3: ["ALTER TABLE ag_models ADD COLUMN runner_up_confidences TEXT"],
    # 4: the answer journal's usage, alerts and read offsets (license_server.journal_ledger); new tables only,
    # which create_all makes. The answer records have a table of their own (activeguard.watermark.record_store).
    4: [],
}

metadata = MetaData()

schema_version = Table(
    "ag_schema_version",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("version", Integer, nullable=False),
    Column("updated_at", Integer, nullable=False),
)

models = Table(
    "ag_models",
    metadata,
    Column("model_id", String(64), primary_key=True),
    Column("name", String(256), nullable=False),
    Column("num_classes", Integer, nullable=False),
    Column("confidences", Text, nullable=False),  # JSON list
    Column("epsilon", Float, nullable=False),
    Column("input_shape", Text, nullable=False),  # JSON list
    Column("encoding", String(16), nullable=False),
    Column("model_path", Text, nullable=False),
    Column("created_at", Integer, nullable=False),
    # How to load the model (schema 2): its source, the eager convention's code, the settled input spec.
    Column("source", String(32), nullable=False, server_default="checkpoint"),
    Column("model_class", Text, nullable=True),
    Column("model_file_text", Text, nullable=True),
    Column("input_spec", Text, nullable=True),  # JSON InputSpec.to_dict(); NULL: registered before schema 2
    Column("runner_up_confidences", Text, nullable=True),  # JSON list; NULL: the paper's FO space
)

licenses = Table(
    "ag_licenses",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("license_id", String(64), nullable=False, unique=True),
    Column("model_id", String(64), ForeignKey("ag_models.model_id"), nullable=False, index=True),
    Column("user_name", String(256), nullable=False, index=True),
    Column("fo_class", Integer, nullable=False),
    Column("conf_index", Integer, nullable=False),
    Column("fo_confidence", Float, nullable=False),
    Column("user_index", Integer, nullable=False),
    Column("payload", LargeBinary, nullable=False),
    Column("signature", LargeBinary, nullable=False),
    Column("key_id", String(32), nullable=False),
    Column("issued_at", Integer, nullable=False),
    Column("expires_at", Integer, nullable=False),
    Column("revoked", Boolean, nullable=False, default=False),
    Column("revoked_at", Integer, nullable=True),
    Column("revoke_reason", Text, nullable=True),
    UniqueConstraint("model_id", "fo_class", "conf_index", name="uq_ag_licenses_slot"),
)

revocations = Table(
    "ag_revocations",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("license_id", String(64), ForeignKey("ag_licenses.license_id"), nullable=False, unique=True),
    Column("model_id", String(64), nullable=False, index=True),
    Column("revoked_at", Integer, nullable=False),
    Column("reason", Text, nullable=False),
)

pregenerated = Table(
    "ag_pregenerated",
    metadata,
    Column("model_id", String(64), ForeignKey("ag_models.model_id"), primary_key=True),
    Column("fo_class", Integer, primary_key=True),
    Column("conf_index", Integer, primary_key=True),
    Column("fingerprint", LargeBinary, nullable=False),  # float32 little-endian, one input row
    Column("created_at", Integer, nullable=False),
)

# -- the answer journal's ledger (schema 4; queries in license_server.journal_ledger) ----------------
# No foreign keys to ag_licenses: an audit database may ingest journals of licenses it never issued.

journal_offsets = Table(
    "ag_journal_offsets",
    metadata,
    Column("journal", String(255), primary_key=True),  # the file's name: unique per worker process
    Column("offset", BigInteger, nullable=False),  # bytes ingested (whole lines)
    Column("updated_at", Integer, nullable=False),
)

license_usage = Table(
    "ag_license_usage",
    metadata,
    Column("license_id", String(64), primary_key=True),
    Column("outcome", String(16), primary_key=True),  # served | refused
    Column("reason", String(64), primary_key=True),  # the refusal's reason; "" for served
    Column("model_id", String(64), nullable=False, index=True),
    Column("rows", BigInteger, nullable=False),
    Column("last_seen", Float, nullable=False),
)

license_alerts = Table(
    "ag_license_alerts",
    metadata,
    Column("alert_key", String(64), primary_key=True),  # AlertEntry.key: one alert of one journal, once
    Column("license_id", String(64), nullable=False, index=True),
    Column("model_id", String(64), nullable=False),
    Column("reason", String(64), nullable=False),
    Column("policy", String(16), nullable=False),
    Column("detail", Text, nullable=False),
    Column("at", Float, nullable=False),
    Column("acted_at", Integer, nullable=True),  # a suspend alert: when the license was revoked (or found so)
    Column("action", Text, nullable=True),
)

signing_keys = Table(
    "ag_signing_keys",
    metadata,
    Column("key_id", String(32), primary_key=True),
    Column("public_key", LargeBinary, nullable=False),
    Column("created_at", Integer, nullable=False),
)


class StoreError(Exception):
    """The database failed or holds something this server cannot use; the message is safe for clients."""


class StoreUnavailable(StoreError):
    """A database call failed (unreachable, unwritable, broken schema); ``detail`` is for the server log only."""

    def __init__(self, op: str, detail: str = ""):
        super().__init__(f"the license store is unavailable ({op} failed); retry later")
        self.op, self.detail = op, detail


class SlotTaken(StoreError):
    """Another issuance (this process or another) took the slot first."""


class AlreadyExists(StoreError):
    """The model is registered with another profile, which may never change."""


@dataclass(frozen=True)
class ModelRecord:
    model_id: str
    name: str
    num_classes: int
    confidences: tuple[float, ...]
    epsilon: float
    input_shape: tuple[int, ...]
    encoding: str
    model_path: str
    created_at: int
    source: str = "checkpoint"
    model_class: str | None = None
    model_file_text: str | None = None  # the eager convention's network code (the server imports it)
    input_spec: str | None = None  # JSON InputSpec.to_dict(); None for models registered before schema 2
    runner_up_confidences: tuple[float, ...] = ()  # the ranked FO space's Q; () the paper's space

    @property
    def control(self) -> ControlConfig:
        return ControlConfig(
            self.num_classes, self.confidences, self.epsilon, runner_up_confidences=self.runner_up_confidences
        )

    @property
    def capacity(self) -> int:
        return self.control.num_users


@dataclass(frozen=True)
class LicenseRecord:
    """One row of ``ag_licenses``: the signed license and the slot (FO) it holds."""

    seq: int
    license_id: str
    model_id: str
    user_name: str
    fo_class: int
    conf_index: int
    fo_confidence: float
    user_index: int
    payload: bytes
    signature: bytes
    key_id: str
    issued_at: int
    expires_at: int
    revoked: bool
    revoked_at: int | None
    revoke_reason: str | None


@dataclass(frozen=True)
class RevocationRecord:
    seq: int
    license_id: str
    model_id: str
    revoked_at: int
    reason: str


@dataclass(frozen=True)
class SigningKeyRecord:
    key_id: str
    public_key: bytes
    created_at: int


R = TypeVar("R")


def as_record(cls: type[R], row: Any) -> R:
    """A frozen dataclass from a result row (bytes columns copied out of driver buffers)."""
    values = {f.name: getattr(row, f.name) for f in fields(cls)}
    return cls(**{k: bytes(v) if isinstance(v, memoryview) else v for k, v in values.items()})


def _model_row(r: Any) -> ModelRecord:
    return ModelRecord(
        model_id=r.model_id,
        name=r.name,
        num_classes=r.num_classes,
        confidences=tuple(json.loads(r.confidences)),
        epsilon=r.epsilon,
        input_shape=tuple(json.loads(r.input_shape)),
        encoding=r.encoding,
        model_path=r.model_path,
        created_at=r.created_at,
        source=r.source,
        model_class=r.model_class,
        model_file_text=r.model_file_text,
        input_spec=r.input_spec,
        runner_up_confidences=tuple(json.loads(r.runner_up_confidences or "[]")),
    )


def _same_spec(old: str | None, new: str | None) -> bool:
    """Input specs agree (a model registered before schema 2 has none recorded: its shape decides)."""
    return old is None or new is None or json.loads(old) == json.loads(new)


F = TypeVar("F", bound=Callable[..., Any])


def guarded(op: str) -> Callable[[F], F]:
    """Turn any database failure inside a store's method (``self._db_errors``) into :class:`StoreUnavailable`:
    no driver or SQLAlchemy exception leaves a store, so callers need to know one error family only."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return fn(self, *args, **kwargs)
            except StoreError:
                raise
            except self._db_errors as exc:
                raise StoreUnavailable(op, describe(exc)) from exc

        return inner  # type: ignore[return-value]

    return wrap


class Store:
    """The license database; every method returns records (dataclasses) and raises only :class:`StoreError`."""

    def __init__(self, url: str, *, echo: bool = False):
        self.url = url
        try:
            self.engine: Engine = open_engine(url, echo=echo)
        except (SQLAlchemyError, ImportError, ValueError) as exc:
            raise StoreUnavailable("opening the database", describe(exc)) from exc
        self._db_errors = database_errors(self.engine)
        self.dialect = self.engine.dialect.name
        # ``seq`` columns are INTEGER: 32-bit on PostgreSQL, 64-bit on SQLite. A cursor beyond that range
        # matches no row, and binding it would fail ("integer out of range"): a store error, not a page.
        self.max_sequence = 2**31 - 1 if self.dialect == "postgresql" else 2**63 - 1
        # SQLite allows one writer; serializing this process's writers avoids busy-wait storms.
        self._write_lock = threading.Lock() if self.dialect == "sqlite" else None
        self.ensure_schema()

    # -- setup ---------------------------------------------------------------------------------

    def ensure_schema(self) -> int:
        """Create or migrate the schema; returns the version in force."""
        try:
            with self.engine.begin() as conn:
                lock_schema(conn)
                metadata.create_all(conn, checkfirst=True)
                row = conn.execute(select(schema_version.c.version).where(schema_version.c.id == 1)).first()
                if row is None:
                    conn.execute(insert(schema_version).values(id=1, version=SCHEMA_VERSION, updated_at=_now()))
                    return SCHEMA_VERSION
                version = row.version
                if version > SCHEMA_VERSION:
                    raise StoreError(
                        f"the database has schema version {version}, newer than this server's {SCHEMA_VERSION}; "
                        "upgrade the server"
                    )
                for v in range(version + 1, SCHEMA_VERSION + 1):
                    for stmt in MIGRATIONS.get(v, []):
                        conn.execute(text(stmt))
                    conn.execute(
                        update(schema_version).where(schema_version.c.id == 1).values(version=v, updated_at=_now())
                    )
                return SCHEMA_VERSION
        except self._db_errors as exc:
            raise StoreUnavailable("preparing the database schema", describe(exc)) from exc

    @guarded("reading the schema version")
    def schema_version(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(schema_version.c.version)).scalar_one())

    def write(self) -> _WriteTxn:
        """One write transaction (``with store.write() as conn``), serialized in-process on SQLite."""
        return _WriteTxn(self)

    def close(self) -> None:
        self.engine.dispose()

    # -- keys ----------------------------------------------------------------------------------

    @guarded("recording the signing key")
    def record_key(self, key_id: str, public_key: bytes) -> None:
        with self.write() as conn:
            if conn.execute(select(signing_keys.c.key_id).where(signing_keys.c.key_id == key_id)).first() is None:
                conn.execute(insert(signing_keys).values(key_id=key_id, public_key=public_key, created_at=_now()))

    @guarded("reading the signing keys")
    def keys(self) -> list[SigningKeyRecord]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(signing_keys).order_by(signing_keys.c.created_at)).all()
        return [as_record(SigningKeyRecord, r) for r in rows]

    # -- models --------------------------------------------------------------------------------

    @guarded("registering the model")
    def add_model(self, row: ModelRecord) -> tuple[ModelRecord, bool]:
        """Insert a model; (existing, False) if registered with the same profile; AlreadyExists otherwise."""
        with self.write() as conn:
            existing = conn.execute(select(models).where(models.c.model_id == row.model_id)).first()
            if existing is not None:
                old = _model_row(existing)
                same = (
                    old.num_classes,
                    old.confidences,
                    old.runner_up_confidences,
                    old.epsilon,
                    old.input_shape,
                    old.encoding,
                ) == (
                    row.num_classes,
                    row.confidences,
                    row.runner_up_confidences,
                    row.epsilon,
                    row.input_shape,
                    row.encoding,
                ) and _same_spec(old.input_spec, row.input_spec)
                if not same:
                    raise AlreadyExists(
                        f"model {row.model_id[:16]}… is already registered with another profile "
                        f"(K={old.num_classes}, C_fp={list(old.confidences)}, "
                        f"runner-up grid={list(old.runner_up_confidences)}, epsilon={old.epsilon}, "
                        f"encoding={old.encoding}, input {old.input_spec or list(old.input_shape)}); "
                        "a profile cannot change once licenses may exist"
                    )
                return old, False
            conn.execute(
                insert(models).values(
                    model_id=row.model_id,
                    name=row.name,
                    num_classes=row.num_classes,
                    confidences=json.dumps(list(row.confidences)),
                    epsilon=row.epsilon,
                    input_shape=json.dumps(list(row.input_shape)),
                    encoding=row.encoding,
                    model_path=row.model_path,
                    created_at=row.created_at,
                    source=row.source,
                    model_class=row.model_class,
                    model_file_text=row.model_file_text,
                    input_spec=row.input_spec,
                    runner_up_confidences=json.dumps(list(row.runner_up_confidences))
                    if row.runner_up_confidences
                    else None,
                )
            )
        return row, True

    @guarded("reading the model")
    def get_model(self, model_id: str) -> ModelRecord | None:
        with self.engine.connect() as conn:
            r = conn.execute(select(models).where(models.c.model_id == model_id)).first()
        return None if r is None else _model_row(r)

    @guarded("listing models")
    def list_models(self) -> list[ModelRecord]:
        with self.engine.connect() as conn:
            return [_model_row(r) for r in conn.execute(select(models).order_by(models.c.created_at)).all()]

    # -- slots ---------------------------------------------------------------------------------

    @guarded("reading issued slots")
    def taken_slots(self, model_id: str) -> set[tuple[int, int]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(licenses.c.fo_class, licenses.c.conf_index).where(licenses.c.model_id == model_id)
            ).all()
        return {(r.fo_class, r.conf_index) for r in rows}

    @guarded("counting licenses")
    def count_licenses(self, model_id: str | None = None) -> int:
        q = select(func.count()).select_from(licenses)
        if model_id is not None:
            q = q.where(licenses.c.model_id == model_id)
        with self.engine.connect() as conn:
            return int(conn.execute(q).scalar_one())

    @guarded("saving pre-generated fingerprints")
    def save_pregenerated(self, model_id: str, rows: Iterable[tuple[int, int, bytes]]) -> int:
        """Store ready fingerprints for free slots (replacing older ones); returns how many."""
        n = 0
        with self.write() as conn:
            taken = {
                (r.fo_class, r.conf_index)
                for r in conn.execute(
                    select(licenses.c.fo_class, licenses.c.conf_index).where(licenses.c.model_id == model_id)
                )
            }
            for cls, j, data in rows:
                if (cls, j) in taken:
                    continue
                conn.execute(
                    delete(pregenerated).where(
                        and_(
                            pregenerated.c.model_id == model_id,
                            pregenerated.c.fo_class == cls,
                            pregenerated.c.conf_index == j,
                        )
                    )
                )
                conn.execute(
                    insert(pregenerated).values(
                        model_id=model_id, fo_class=cls, conf_index=j, fingerprint=data, created_at=_now()
                    )
                )
                n += 1
        return n

    @guarded("reading a pre-generated fingerprint")
    def pregenerated_for(self, model_id: str, slot: tuple[int, int]) -> bytes | None:
        with self.engine.connect() as conn:
            r = conn.execute(
                select(pregenerated.c.fingerprint).where(
                    and_(
                        pregenerated.c.model_id == model_id,
                        pregenerated.c.fo_class == slot[0],
                        pregenerated.c.conf_index == slot[1],
                    )
                )
            ).first()
        return None if r is None else bytes(r.fingerprint)

    @guarded("counting pre-generated fingerprints")
    def count_pregenerated(self, model_id: str) -> int:
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    select(func.count()).select_from(pregenerated).where(pregenerated.c.model_id == model_id)
                ).scalar_one()
            )

    @guarded("reading pre-generated slots")
    def pregenerated_slots(self, model_id: str) -> set[tuple[int, int]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(pregenerated.c.fo_class, pregenerated.c.conf_index).where(pregenerated.c.model_id == model_id)
            ).all()
        return {(r.fo_class, r.conf_index) for r in rows}

    # -- licenses ------------------------------------------------------------------------------

    @guarded("storing the license")
    def insert_license(self, row: dict[str, Any]) -> None:
        """Insert one whole license and drop its slot's pre-generated fingerprint, atomically.

        Raises :class:`SlotTaken` when the unique slot constraint (or the license id) refuses it.
        """
        try:
            with self.write() as conn:
                conn.execute(insert(licenses).values(**row, revoked=False))
                conn.execute(
                    delete(pregenerated).where(
                        and_(
                            pregenerated.c.model_id == row["model_id"],
                            pregenerated.c.fo_class == row["fo_class"],
                            pregenerated.c.conf_index == row["conf_index"],
                        )
                    )
                )
        except IntegrityError as exc:
            raise SlotTaken(
                f"slot ({row['fo_class']}, {row['conf_index']}) of model {row['model_id'][:16]}… is taken"
            ) from exc

    @guarded("reading the license")
    def get_license(self, license_id: str) -> LicenseRecord | None:
        with self.engine.connect() as conn:
            r = conn.execute(select(licenses).where(licenses.c.license_id == license_id)).first()
        return None if r is None else as_record(LicenseRecord, r)

    @guarded("listing licenses")
    def list_licenses(
        self,
        *,
        model_id: str = "",
        user: str = "",
        state: str = "",
        after_seq: int = 0,
        limit: int = 100,
        now: int | None = None,
    ) -> list[LicenseRecord]:
        now = _now() if now is None else now
        if after_seq >= self.max_sequence:
            return []
        q = select(licenses).where(licenses.c.seq > after_seq)
        if model_id:
            q = q.where(licenses.c.model_id == model_id)
        if user:
            q = q.where(licenses.c.user_name == user)
        if state == "active":
            q = q.where(and_(licenses.c.revoked.is_(False), licenses.c.expires_at > now))
        elif state == "revoked":
            q = q.where(licenses.c.revoked.is_(True))
        elif state == "expired":
            q = q.where(and_(licenses.c.revoked.is_(False), licenses.c.expires_at <= now))
        with self.engine.connect() as conn:
            return [as_record(LicenseRecord, r) for r in conn.execute(q.order_by(licenses.c.seq).limit(limit))]

    @guarded("revoking the license")
    def revoke(self, license_id: str, reason: str) -> tuple[LicenseRecord | None, bool]:
        """(row, newly_revoked); row None if the license does not exist."""
        with self.write() as conn:
            # FOR UPDATE: two servers revoking one license at once (an admin and a suspend alert) on
            # PostgreSQL must not both insert its revocation; SQLite's BEGIN IMMEDIATE already serializes.
            r = conn.execute(select(licenses).where(licenses.c.license_id == license_id).with_for_update()).first()
            if r is None:
                return None, False
            if r.revoked:
                return as_record(LicenseRecord, r), False
            now = _now()
            conn.execute(
                update(licenses)
                .where(licenses.c.license_id == license_id)
                .values(revoked=True, revoked_at=now, revoke_reason=reason)
            )
            conn.execute(
                insert(revocations).values(license_id=license_id, model_id=r.model_id, revoked_at=now, reason=reason)
            )
            r = conn.execute(select(licenses).where(licenses.c.license_id == license_id)).first()
        return as_record(LicenseRecord, r), True

    @guarded("listing revocations")
    def list_revocations(self, since: int = 0, model_id: str = "", limit: int = 1000) -> list[RevocationRecord]:
        if since >= self.max_sequence:
            return []
        q = select(revocations).where(revocations.c.seq > since)
        if model_id:
            q = q.where(revocations.c.model_id == model_id)
        with self.engine.connect() as conn:
            return [as_record(RevocationRecord, r) for r in conn.execute(q.order_by(revocations.c.seq).limit(limit))]

    @guarded("reading the revocation list")
    def revocation_snapshot(self, model_id: str = "") -> tuple[int, list[str]]:
        """(version, revoked license ids): the last revocation sequence number over every model, and every
        license revoked up to it (of ``model_id``, or of all). The version only grows, so a list with a
        smaller one is older."""
        with self.engine.connect() as conn:
            version = conn.execute(select(func.max(revocations.c.seq))).scalar() or 0
            q = select(revocations.c.license_id).where(revocations.c.seq <= version)
            if model_id:
                q = q.where(revocations.c.model_id == model_id)
            return int(version), [r[0] for r in conn.execute(q)]


class _WriteTxn:
    """``with store.write() as conn``: one transaction, serialized in-process on SQLite."""

    def __init__(self, store: Store):
        self.store = store
        self.ctx = None

    def __enter__(self) -> Connection:
        if self.store._write_lock is not None:
            self.store._write_lock.acquire()
        try:
            self.ctx = self.store.engine.begin()
            return self.ctx.__enter__()
        except BaseException:
            if self.store._write_lock is not None:
                self.store._write_lock.release()
            raise

    def __exit__(self, *exc: Any) -> bool | None:
        try:
            return self.ctx.__exit__(*exc)
        finally:
            if self.store._write_lock is not None:
                self.store._write_lock.release()


def _now() -> int:
    return int(time.time())
