"""`activeguard package` and `activeguard protect`: one protected `.mar` from a bare model or an owner's archive.

Both end in :func:`protect_loaded`: an archive (the owner's, or a plain one torch-model-archiver
builds for a bare model) gets ActiveGuard's handler as its entry point and a protection profile;
everything else in it is kept. The model stays in its own format (a checkpoint, a TorchScript
archive, an exported program, or a state dict plus its model file, as TorchServe's eager convention
archives them), so what TorchServe serves is byte for byte what the owner gave; the profile says
how to load it and, for an owner's archive, which handler to compose with.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from activeguard.guard.profile import MODEL_CODE_FILE, PROFILE_FILE, Profile
from activeguard.models import inputs, sources
from handlers import archives
from handlers.composition import handler_module_name

HANDLER_FILE = Path(__file__).with_name("activeguard_handler.py")
# The serialized file's name inside the archive: TorchServe's own "model.pt" (also its name for
# TorchScript), ".pt2" for exported programs. The handler reads it from the manifest.
SERIALIZED_NAMES = {"export": "model.pt2"}
DEFAULT_SERIALIZED_NAME = "model.pt"


def torch_model_archiver() -> str:
    """TorchServe's archiver: on PATH, or beside this Python (a venv not activated)."""
    return shutil.which("torch-model-archiver") or str(Path(sys.executable).with_name("torch-model-archiver"))


def serialized_name(source: str) -> str:
    return SERIALIZED_NAMES.get(source, DEFAULT_SERIALIZED_NAME)


def classes_of(loaded: sources.LoadedModel) -> int:
    """The number of classes of a classifier; ValueError for a regression or generative model."""
    if loaded.num_classes is None:
        raise ValueError(f"{loaded.path} is a {loaded.task} model; the control layer protects classifiers")
    return loaded.num_classes


def profile_for(loaded: sources.LoadedModel, profile: Profile) -> Profile:
    """``profile`` completed with how to load ``loaded`` (source, input spec, model class), once it fits.

    A profile that names another model id, another input or another number of classes is refused
    (ValueError): the handler would then protect a model the profile does not describe.
    """
    path = loaded.path
    if loaded.model_id != profile.model_id:
        raise ValueError(f"profile is for model {profile.model_id[:16]}…, but {path} is {loaded.model_id[:16]}…")
    if profile.input_spec is not None and profile.spec != loaded.spec:
        raise ValueError(f"profile input spec {profile.spec.to_dict()} differs from {path}'s {loaded.spec.to_dict()}")
    if tuple(profile.input_shape) != loaded.spec.shape:
        raise ValueError(f"profile input shape {tuple(profile.input_shape)} differs from {path}'s {loaded.spec.shape}")
    if profile.num_classes != classes_of(loaded):
        raise ValueError(f"profile says {profile.num_classes} classes, but {path} answers {loaded.num_classes}")
    return replace(
        profile, source=loaded.source.name, input_spec=loaded.spec.to_dict(), model_class=loaded.model_class
    ).validated()


def package(
    model_path: Path,
    profile: Profile,
    name: str,
    store: Path,
    version: str = "1.0",
    handler: Path = HANDLER_FILE,
    *,
    options: sources.SourceOptions | None = None,
) -> Path:
    """Load ``model_path`` (any source; ``options`` for the eager convention or the input spec) and
    write ``store/name.mar``; see :func:`package_model`. A profile that states its input spec settles
    what the file does not say, unless ``options`` has spec overrides of its own."""
    options = options or sources.SourceOptions()
    if profile.input_spec is not None and options.overrides == inputs.SpecOverrides():
        options = replace(options, overrides=inputs.SpecOverrides.pinned(profile.spec))
    loaded = sources.load(model_path, options)
    return package_model(loaded, profile, name, store, version, handler)


def package_model(
    loaded: sources.LoadedModel,
    profile: Profile,
    name: str,
    store: Path,
    version: str = "1.0",
    handler: Path = HANDLER_FILE,
) -> Path:
    """Write ``store/name.mar`` holding the model file as given; refuse a profile that does not fit it.

    A bare model becomes a plain archive (torch-model-archiver, ActiveGuard's tensor handler), which
    is then protected as any owner's archive is (:func:`protect_loaded`). ``handler`` is swappable
    only so benchmarks can package a plain handler beside ours (then nothing is protected).
    """
    profile = profile_for(loaded, profile)
    with tempfile.TemporaryDirectory() as tmp:
        plain = archive_model(loaded, name, Path(tmp), version, handler)
        if handler != HANDLER_FILE:
            store.mkdir(parents=True, exist_ok=True)
            return Path(shutil.copyfile(plain, store / plain.name))
        return protect_loaded(archives.MarArchive.read(plain), loaded, replace(profile, owner_handler=None), store)


def archive_model(loaded: sources.LoadedModel, name: str, store: Path, version: str, handler: Path) -> Path:
    """A plain TorchServe archive of ``loaded`` (the file as given, plus its code for the eager convention)."""
    store.mkdir(parents=True, exist_ok=True)
    archiver = torch_model_archiver()
    with tempfile.TemporaryDirectory() as tmp:
        staged_model = Path(tmp) / serialized_name(loaded.source.name)
        shutil.copyfile(loaded.path, staged_model)
        cmd = [archiver, "--model-name", name, "--version", version, "--serialized-file", str(staged_model)]
        cmd += ["--handler", str(handler), "--export-path", str(store), "--force"]
        if loaded.model_file is not None:  # TorchServe's eager convention: the network's code beside its weights
            staged_code = Path(tmp) / MODEL_CODE_FILE
            shutil.copyfile(loaded.model_file, staged_code)
            cmd += ["--model-file", str(staged_code)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"torch-model-archiver failed: {proc.stderr.strip()[-2000:]}")
    return store / f"{name}.mar"


def protect_loaded(
    archive: archives.MarArchive, loaded: sources.LoadedModel, profile: Profile, store: Path, name: str | None = None
) -> Path:
    """Write ``store/NAME.mar``: ``archive`` with everything the owner put in it kept, ActiveGuard's
    handler as the entry point (composing ``profile.owner_handler`` when set) and the profile."""
    profile = profile_for(loaded, profile)
    name = name or archive.model_name
    protected = archive.protected(
        HANDLER_FILE.name, HANDLER_FILE.read_bytes(), {PROFILE_FILE: profile.to_json().encode()}, name
    )
    store.mkdir(parents=True, exist_ok=True)
    return protected.write(store / f"{name}.mar")


def protect(
    mar: Path,
    profile_settings: Callable[[sources.LoadedModel], Profile],
    store: Path,
    overrides: inputs.SpecOverrides | None = None,
    name: str | None = None,
) -> tuple[Path, Profile]:
    """Protect an owner's ``.mar`` (their model, handler, extra files and manifest settings kept).

    The model is loaded from the archive as TorchServe would find it (serialized file, plus the
    manifest's model file for the eager convention) to learn its id, classes and input spec;
    ``profile_settings`` turns that into the profile (keys, policy, C_fp).
    """
    archive = archives.MarArchive.read(mar)
    owner = archive.handler
    if archive.is_protected:
        raise ValueError(f"{mar} is already protected by ActiveGuard; protect the owner's original archive")
    handler_module_name(owner)  # a function entry point cannot be composed: refuse before any work
    if Path(owner).name == HANDLER_FILE.name:
        raise ValueError(f"the owner's handler is named {HANDLER_FILE.name}, ActiveGuard's own; rename it")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            loaded = archive.load_model(Path(tmp), overrides or inputs.SpecOverrides())
        except inputs.SourceError as exc:  # name the archive's entry, not the folder it was unpacked into
            raise inputs.SourceError(str(exc).replace(f"{tmp}/", f"{mar.name}: ")) from None
        profile = replace(profile_settings(loaded), owner_handler=owner)
        return protect_loaded(archive, loaded, profile, store, name), profile
