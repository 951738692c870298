"""One loader for every model source an owner may hold, and the model as a client reaches it.

Sources (one :class:`ModelSource` each, found by :func:`detect`):

* ``checkpoint``  the project's own weights-only checkpoint (``activeguard train``);
* ``torchscript`` a ``torch.jit.save`` archive;
* ``export``      a ``torch.export.save`` program (``.pt2``), which carries its example inputs;
* ``eager``       TorchServe's eager convention: a state dict plus ``--model-file FILE.py`` and
  ``--model-class NAME`` (as ``torch-model-archiver --model-file --serialized-file`` takes them).

Nothing here unpickles arbitrary objects: state dicts and checkpoints load with
``torch.load(weights_only=True)``, TorchScript and exported programs with their own readers. The
only code that runs is the owner's own model file, as TorchServe runs it.

The model id is sha256 over the state dict's tensors (:func:`activeguard.models.architectures.model_id`), the
same rule for every source, so a model keeps its id when it changes format.

The input spec and the client's view of the network live in :mod:`activeguard.models.inputs`; a
:class:`LoadedModel` carries both.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import math
import pickle
import sys
import zipfile
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from activeguard.models.architectures import (
    ARCHITECTURES,
    CHECKPOINT_FORMAT,
    arch_name,
    build_model,
    input_shape,
    model_id,
)
from activeguard.models.inputs import ClientView, InputSpec, SourceError, SpecOverrides

SPEC_FILE = "activeguard.json"  # the input spec inside a TorchScript or .pt2 archive ("extra file")
TASKS = ("classification", "regression", "generation")


# --- loaded model -------------------------------------------------------------------------------


@dataclass(frozen=True)
class WatermarkLayer:
    """A weight a watermark can go into: a layer's ``weight`` of two or more dimensions (Linear,
    Conv1d/2d/3d and the like)."""

    name: str
    shape: tuple[int, ...]

    @property
    def parameters(self) -> int:
        return math.prod(self.shape)


@dataclass
class LoadedModel:
    """A model from any source, ready for every command."""

    path: Path
    source: ModelSource
    model: ClientView  # what clients reach: use this for fingerprints, audits, serving
    spec: InputSpec
    model_id: str
    task: str  # classification (every source), or regression/generation (project checkpoints)
    num_classes: int | None
    model_file: Path | None = None
    model_class: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def network(self) -> nn.Module:
        return self.model.network

    def watermark_layers(self) -> list[WatermarkLayer]:
        return watermark_layers(self.network)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.network.parameters())

    def save(self, path: str | Path, metadata: dict[str, Any] | None = None) -> str:
        """Write the (possibly changed) network in this model's own format; returns the new model id."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.source.save(self, path, metadata or {})
        return model_id(self.network)

    def record(self) -> dict[str, Any]:
        """Which file and format a result came from (for manifests and reports)."""
        record: dict[str, Any] = {"path": str(self.path), "format": self.source.name, "title": self.source.title}
        if self.model_file is not None:
            record.update(model_file=str(self.model_file), model_class=self.model_class)
        return record

    def describe(self) -> dict[str, Any]:
        """What ``activeguard inspect`` reports."""
        layers = self.watermark_layers()
        return {
            "path": str(self.path),
            "source": self.source.name,
            "source_title": self.source.title,
            "model_id": self.model_id,
            "task": self.task,
            "num_classes": self.num_classes,
            "parameters": self.parameter_count(),
            "input": self.spec.to_dict(),
            "watermark_layers": [{"name": c.name, "shape": list(c.shape), "parameters": c.parameters} for c in layers],
            "default_watermark_layer": default_watermark_layer(self.network) if layers else None,
            "can_embed_watermark": self.source.trainable and bool(layers),
            **({"model_file": str(self.model_file), "model_class": self.model_class} if self.model_file else {}),
        }


def watermark_layers(network: nn.Module) -> list[WatermarkLayer]:
    """Every layer weight of two or more dimensions, in definition order (what ``watermark embed`` accepts)."""
    return [
        WatermarkLayer(name, tuple(p.shape))
        for name, p in network.named_parameters()
        if p.dim() >= 2 and name.rsplit(".", 1)[-1] == "weight"
    ]


def default_watermark_layer(network: nn.Module) -> str:
    """The convolution weight (three or more dimensions) with the most parameters, else the largest
    matrix (a Linear layer's); the first such, in definition order."""
    layers = watermark_layers(network)
    if not layers:
        raise SourceError("the model has no layer weight of two or more dimensions to carry a watermark")
    convs = [c for c in layers if len(c.shape) >= 3]
    return max(convs or layers, key=lambda c: c.parameters).name


# --- sources ------------------------------------------------------------------------------------

TASKS = ("classification", "regression", "generation")


@dataclass(frozen=True)
class SourceOptions:
    """How to load: the eager convention's model file and class, and the input spec flags."""

    model_file: Path | None = None
    model_class: str | None = None
    overrides: SpecOverrides = SpecOverrides()
    # Used where the file says nothing, or only its row shape (an audit queries a bare suspect as the owner).
    fallback: InputSpec | None = None
    # What the model does, where the file cannot say (TorchScript, .pt2, state dicts): None means what
    # the file says, else "classification"; TAFA also fingerprints "regression" and "generation" models.
    task: str | None = None


@dataclass
class RawModel:
    """What a source reads from disk, before the input spec is settled."""

    network: nn.Module
    spec: InputSpec | None  # what the file itself says about its input, if anything
    spec_complete: bool = True  # False: ``spec`` is only the row shape (e.g. a .pt2's example inputs)
    task: str = "classification"
    batch_limit: int | None = None
    fixed_mode: bool = False
    extras: dict[str, Any] = field(default_factory=dict)


class ModelSource(ABC):
    """One on-disk model format."""

    name: ClassVar[str]
    title: ClassVar[str]
    trainable: ClassVar[bool]  # whether a watermark can be embedded (fine-tuning) in this format

    @abstractmethod
    def load(self, path: Path, options: SourceOptions) -> RawModel:
        """Read the file; raise :class:`SourceError` with a clear reason when it is not this format's."""

    @abstractmethod
    def save(self, loaded: LoadedModel, path: Path, metadata: dict[str, Any]) -> None:
        """Write ``loaded.network`` in this format, carrying the input spec where the format can."""


def _spec_text(spec: InputSpec) -> str:
    return json.dumps({"input": spec.to_dict()})


def _carried_spec(text: str | bytes, path: Path) -> InputSpec | None:
    if not text:
        return None
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SourceError(f"{path}: its {SPEC_FILE} is not JSON ({exc})") from None
    return InputSpec.from_dict(data.get("input")) if isinstance(data, dict) and data.get("input") else None


class CheckpointSource(ModelSource):
    name, title, trainable = "checkpoint", "ActiveGuard checkpoint", True

    def load(self, path: Path, options: SourceOptions) -> RawModel:
        ckpt = _torch_load(path)
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
                raise SourceError(_needs_model_file(path))
            raise SourceError(f"{path} is neither an ActiveGuard checkpoint nor a state dict")
        try:
            network = build_model(ckpt["arch"], **ckpt["config"])
            network.load_state_dict(ckpt["state_dict"])
        except (KeyError, TypeError, RuntimeError, ValueError) as exc:
            raise SourceError(f"{path}: damaged ActiveGuard checkpoint ({_first_line(exc)})") from None
        metadata = ckpt.get("metadata") or {}
        carried = metadata.get("input_spec")
        arch = ckpt["arch"]
        task = {"mlp-regressor": "regression", "fc-generator": "generation"}.get(arch, "classification")
        spec = InputSpec.from_dict(carried) if carried else InputSpec(input_shape(network))
        return RawModel(network.eval(), spec, carried is not None, task, extras={"arch": arch, "metadata": metadata})

    def save(self, loaded: LoadedModel, path: Path, metadata: dict[str, Any]) -> None:
        from activeguard.models.architectures import save_model

        save_model(loaded.network, path, {**metadata, "input_spec": loaded.spec.to_dict()})


class TorchScriptSource(ModelSource):
    name, title, trainable = "torchscript", "TorchScript (torch.jit.save)", True

    def load(self, path: Path, options: SourceOptions) -> RawModel:
        extra = {SPEC_FILE: ""}
        try:
            network = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        except Exception as exc:  # torch raises RuntimeError and friends for damaged archives
            raise SourceError(f"{path}: not a readable TorchScript archive ({_first_line(exc)})") from None
        return RawModel(network.eval(), _carried_spec(extra[SPEC_FILE], path))

    def save(self, loaded: LoadedModel, path: Path, metadata: dict[str, Any]) -> None:
        torch.jit.save(loaded.network, str(path), _extra_files={SPEC_FILE: _spec_text(loaded.spec)})


class ExportedProgramSource(ModelSource):
    name, title, trainable = "export", "exported program (torch.export.save, .pt2)", False

    def load(self, path: Path, options: SourceOptions) -> RawModel:
        extra = {SPEC_FILE: ""}
        try:
            with open(path, "rb") as handle:  # a file object: torch.export.load wants a .pt2 suffix on paths
                program = torch.export.load(handle, extra_files=extra)
        except Exception as exc:
            raise SourceError(f"{path}: not a readable torch.export program ({_first_line(exc)})") from None
        args, kwargs = program.example_inputs or ((), {})
        if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor):
            raise SourceError(
                f"{path}: the program takes {len(args)} positional and {len(kwargs)} keyword inputs; "
                "ActiveGuard protects models that take one tensor of rows"
            )
        example = args[0]
        spec = _carried_spec(extra[SPEC_FILE], path) or InputSpec(tuple(int(d) for d in example.shape[1:]))
        batch = _static_batch(program)
        return RawModel(
            program.module(), spec, batch_limit=batch, fixed_mode=True, extras={"example_batch": int(example.shape[0])}
        )

    def save(self, loaded: LoadedModel, path: Path, metadata: dict[str, Any]) -> None:
        raise SourceError(
            "an exported program cannot be re-saved after its weights change; embed the watermark in the "
            "eager or TorchScript model and export that"
        )


def _static_batch(program: Any) -> int | None:
    """The fixed batch size of a program exported without a dynamic batch dimension, else None."""
    user_inputs = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            value = node.meta.get("val")
            dim = value.shape[0] if value is not None and value.dim() else None
            return int(dim) if isinstance(dim, int) else None
    return None


class EagerSource(ModelSource):
    """TorchServe's eager convention; the state dict holds tensors only (a weights-only load)."""

    name, title, trainable = "eager", "state dict + model file (TorchServe eager)", True

    def load(self, path: Path, options: SourceOptions) -> RawModel:
        if options.model_file is None:
            raise SourceError(_needs_model_file(path))
        state = _torch_load(path)
        if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise SourceError(f"{path} is not a state dict (a mapping of parameter names to tensors)")
        cls = load_model_class(options.model_file, options.model_class)
        try:
            network = cls()
        except Exception as exc:
            raise SourceError(
                f"{cls.__name__}() failed: {_first_line(exc)} (the class must build with no arguments)"
            ) from None
        try:
            network.load_state_dict(state)
        except RuntimeError as exc:
            raise SourceError(f"{path} does not fit {cls.__name__}: {_first_line(exc)}") from None
        return RawModel(network.eval(), None, extras={"model_class": cls.__name__})

    def save(self, loaded: LoadedModel, path: Path, metadata: dict[str, Any]) -> None:
        torch.save({k: v.detach().cpu().clone() for k, v in loaded.network.state_dict().items()}, path)


def load_model_class(model_file: Path, class_name: str | None) -> type[nn.Module]:
    """Import the owner's model file (as TorchServe does) and return its network class."""
    model_file = Path(model_file)
    if not model_file.is_file():
        raise SourceError(f"model file {model_file} does not exist")
    module_name = f"activeguard_owner_model_{abs(hash(str(model_file.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, model_file)
    if spec is None or spec.loader is None:
        raise SourceError(f"{model_file} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise SourceError(f"{model_file} failed to import: {type(exc).__name__}: {_first_line(exc)}") from None
    classes = {
        name: obj
        for name, obj in vars(module).items()
        if inspect.isclass(obj) and issubclass(obj, nn.Module) and obj.__module__ == module_name
    }
    if class_name is None:
        if len(classes) != 1:
            found = ", ".join(sorted(classes)) or "none"
            raise SourceError(
                f"{model_file} defines {len(classes)} nn.Module classes ({found}): name one with --model-class"
            )
        return next(iter(classes.values()))
    obj = getattr(module, class_name, None)
    if not (inspect.isclass(obj) and issubclass(obj, nn.Module)):
        found = ", ".join(sorted(classes)) or "none"
        raise SourceError(f"{model_file} has no nn.Module class {class_name!r} (classes there: {found})")
    return obj


SOURCES: dict[str, ModelSource] = {
    s.name: s for s in (CheckpointSource(), TorchScriptSource(), ExportedProgramSource(), EagerSource())
}


def _needs_model_file(path: Path) -> str:
    return f"{path} is a state dict: give the network's code with --model-file FILE.py [--model-class NAME]"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _last_line(exc: BaseException) -> str:
    """TorchScript puts its traceback first and the reason last."""
    text = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return text[-1][:300] if text else type(exc).__name__


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if isinstance(exc, pickle.UnpicklingError) or "weights_only" in str(exc).lower():
            raise SourceError(
                f"{path} is a pickled Python object (e.g. torch.save(model)); it is not loaded because "
                "unpickling runs arbitrary code. Save model.state_dict() (with --model-file), TorchScript "
                "or torch.export instead"
            ) from None
        raise SourceError(f"{path} is not a readable PyTorch file ({_first_line(exc)})") from None


def detect(path: Path, options: SourceOptions = SourceOptions()) -> ModelSource:
    """Which source a file is, from its archive layout (and --model-file for the eager convention)."""
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        raise SourceError(
            f"{path} is not a PyTorch model file (expected a torch.save, torch.jit.save or torch.export.save archive)"
        ) from None
    parts = [n.split("/", 1)[1] if "/" in n else n for n in names]
    if any(p.startswith("code/") for p in parts):
        return SOURCES["torchscript"]
    if any(p.startswith("models/") and p.endswith(".json") for p in parts) or "archive_format" in parts:
        return SOURCES["export"]
    if options.model_file is not None:
        return SOURCES["eager"]
    return SOURCES["checkpoint"]


def load(path: str | Path, options: SourceOptions = SourceOptions()) -> LoadedModel:
    """Load any supported model file, settle its input spec and check it is a usable classifier."""
    path = Path(path)
    source = detect(path, options)
    raw = source.load(path, options)
    carried = raw.spec
    if options.fallback is not None and (carried is None or not raw.spec_complete):
        carried = replace(options.fallback, shape=carried.shape) if carried else options.fallback
    spec = options.overrides.apply(carried, str(path))
    view = ClientView(raw.network, spec, raw.batch_limit, raw.fixed_mode).eval()
    task = options.task or raw.task
    if task not in TASKS:
        raise SourceError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    num_classes = _probe(view, task, path)
    extras = dict(raw.extras)
    return LoadedModel(
        path=path,
        source=source,
        model=view,
        spec=spec,
        model_id=model_id(raw.network.state_dict()),
        task=task,
        num_classes=num_classes,
        model_file=Path(options.model_file) if source.name == "eager" else None,
        model_class=extras.pop("model_class", None),
        extras=extras,
    )


@torch.no_grad()
def _probe(view: ClientView, task: str, path: Path) -> int | None:
    """Run two random rows through the model: it must take the spec's shape and, if a classifier,
    answer one score vector of at least two classes per row."""
    rows = view.spec.random_rows(2, torch.Generator().manual_seed(0))
    try:
        out = view.scores(rows)
    except Exception as exc:
        raise SourceError(
            f"{path}: the model cannot take inputs of shape {view.spec.shape} ({_last_line(exc)}); "
            "give the right --input-shape"
        ) from None
    if not isinstance(out, torch.Tensor):
        raise SourceError(
            f"{path} returns {type(out).__name__}, not a tensor: ActiveGuard protects classifiers that "
            "answer one score vector per row"
        )
    if task != "classification":
        return None
    if out.dim() != 2 or out.shape[0] != 2 or out.shape[1] < 2:
        raise SourceError(
            f"{path} is not a classifier: it answers shape {tuple(out.shape)} for 2 rows "
            "(expected (2, classes) with at least 2 classes)"
        )
    if not torch.isfinite(out).all():
        raise SourceError(f"{path} answers NaN or infinite scores on inputs in its range {list(view.spec.bounds)}")
    if view.spec.outputs == "probabilities":
        sums = out.sum(1)
        if (out < -1e-6).any() or not torch.allclose(sums, torch.ones_like(sums), atol=1e-3):
            raise SourceError(
                f"{path}: --outputs probabilities, but its rows sum to {sums.tolist()} (are they logits?)"
            )
    return int(out.shape[1])


def save_all_formats(
    network: nn.Module, spec: InputSpec, directory: Path, stem: str, model_file_source: str
) -> dict[str, Path]:
    """Write one network as checkpoint (if registered), TorchScript, .pt2 and state dict + model file.

    ``model_file_source`` is the Python text of the model file for the eager convention.
    """
    directory.mkdir(parents=True, exist_ok=True)
    network = network.eval()
    paths: dict[str, Path] = {}
    if type(network) in ARCHITECTURES.values():
        from activeguard.models.architectures import save_model

        paths["checkpoint"] = directory / f"{stem}.pt"
        save_model(network, paths["checkpoint"], {"input_spec": spec.to_dict(), "arch": arch_name(network)})
    paths["torchscript"] = directory / f"{stem}.ts"
    torch.jit.save(torch.jit.script(network), str(paths["torchscript"]), _extra_files={SPEC_FILE: _spec_text(spec)})
    example = spec.random_rows(2, torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(network, (example,), dynamic_shapes=({0: batch},))
    paths["export"] = directory / f"{stem}.pt2"
    torch.export.save(program, str(paths["export"]), extra_files={SPEC_FILE: _spec_text(spec)})
    paths["state_dict"] = directory / f"{stem}.state.pt"
    torch.save({k: v.detach().cpu().clone() for k, v in network.state_dict().items()}, paths["state_dict"])
    paths["model_file"] = directory / f"{stem}_model.py"
    paths["model_file"].write_text(model_file_source)
    return paths
