"""Registered models in memory: loaded once from their recorded source, checked against their model id.

Any model source :mod:`activeguard.models.sources` reads (checkpoint, TorchScript, exported program,
state dict + model file) is registered by path or by upload and loaded again from what the store
recorded; a file that changed under its path is refused, never silently served.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from activeguard.credentials.control import PAPER_EPSILON, ControlConfig, configured
from activeguard.credentials.fingerprints import natural_users
from activeguard.credentials.fo_space import FO
from activeguard.models import inputs, sources
from license_server.checkpoints import (
    STORED_SUFFIXES,
    model_code_file,
    registered_classifier,
    staged_model_code,
    stored_suffix,
)
from license_server.config import ServerConfig
from license_server.errors import InvalidRequest, IssuanceError, NotFound, PreconditionFailed
from license_server.slots import SlotAllocator, SlotBook
from license_server.store import LicenseRecord, ModelRecord, Store
from license_server.validation import check_model_code, check_register, parse_input_spec, shown


@dataclass
class LoadedModel:
    """A registered model in memory: ``module`` is the model as a client reaches it (``inputs.ClientView``)."""

    row: ModelRecord
    module: torch.nn.Module
    spec: inputs.InputSpec
    slots: SlotBook

    @property
    def config(self) -> ControlConfig:
        return self.slots.config


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


class ModelRegistry:
    """Owns the loaded models of one server (and, per model id, its FO space for describing licenses)."""

    def __init__(self, config: ServerConfig, store: Store, allocator: SlotAllocator):
        self.cfg = config
        self.store = store
        self.allocator = allocator
        self._models: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()
        self._controls: dict[str, ControlConfig] = {}  # model id -> FO space, for describing licenses

    @property
    def models_dir(self) -> Path:
        return self.cfg.data_dir / "models"

    def get(self, model_id: str) -> LoadedModel:
        """The registered model, loaded once and checked against its model id (the file may have changed)."""
        with self._lock:
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
        self.allocator.publish(loaded.slots)
        return loaded

    def register(self, req: Registration) -> tuple[LoadedModel, bool]:
        """(the model, whether it is new): register a classifier of any source and its protection profile,
        or find it again."""
        encoding = check_register(req.model_path, req.checkpoint, req.name, req.expected_model_id, req.encoding)
        check_model_code(req.model_file_text, req.model_class)
        spec = parse_input_spec(req.input_spec)
        overrides = inputs.SpecOverrides.pinned(spec) if spec else inputs.SpecOverrides()
        with staged_model_code(self.models_dir, req.model_file_text) as code:
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
        with self._lock:
            m = self._models.get(mid)
        if m is None:
            fresh = self._loaded(row, model)
            with self._lock:
                m = self._models.setdefault(mid, fresh)
        self.allocator.publish(m.slots)
        return m, created

    def fo_of(self, r: LicenseRecord) -> FO:
        """A license's whole FO, from its model's FO space (built once per model)."""
        config = self._controls.get(r.model_id)
        if config is None:
            row = self.store.get_model(r.model_id)
            if row is None:
                return FO(r.fo_class, r.fo_confidence)
            config = self._controls.setdefault(r.model_id, row.control)
        return config.fo_of_user(r.user_index)

    def _loaded(self, row: ModelRecord, model: sources.LoadedModel) -> LoadedModel:
        """The model with its slots: issued and pre-generated ones read once from the store, and for a
        dense FO space the FOs uniform noise reaches (seeded, so every server blocks the same ones)."""
        config = row.control
        book = SlotBook(
            model_id=row.model_id,
            config=config,
            all_slots=[(t, j) for t in range(row.num_classes) for j in range(config.per_class)],
        )
        if config.space.dense:
            natural = natural_users(model.model, config, model.spec.shape, model.spec.bounds)
            book.blocked = {book.slot_of(u) for u in natural}
        book.taken = self.store.taken_slots(row.model_id)
        book.pool = self.store.pregenerated_slots(row.model_id) - book.taken
        return LoadedModel(row=row, module=model.model, spec=model.spec, slots=book)

    def _options(self, row: ModelRecord) -> sources.SourceOptions:
        """How to load a registered model again: its recorded code (eager convention) and input spec."""
        code = model_code_file(self.models_dir, row.model_file_text) if row.model_file_text else None
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
        self.models_dir.mkdir(parents=True, exist_ok=True)
        unnamed = self.models_dir / f"upload-{threading.get_ident()}-{time.time_ns()}"
        unnamed.write_bytes(data)
        tmp = unnamed.rename(unnamed.with_name(unnamed.name + stored_suffix(unnamed, options)))
        try:
            model = registered_classifier(tmp, f"the uploaded checkpoint ({len(data)} bytes)", options)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        path = self.models_dir / f"{model.model_id}{STORED_SUFFIXES[model.source.name]}"
        tmp.replace(path)
        return path, model
