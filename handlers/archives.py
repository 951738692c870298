"""TorchServe model archives (`.mar`, torch-model-archiver's default zip format) read and rewritten.

A protected archive is the owner's archive with two files added (ActiveGuard's handler and the
protection profile) and one manifest field changed (``model.handler``): every other entry and
manifest setting (model file, serialized file, extra files, requirements, model config, runtime)
stays as torch-model-archiver wrote it, so the archive registers and runs like any other.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

from activeguard.guard.profile import PROFILE_FILE
from activeguard.models import inputs, sources

MANIFEST = "MAR-INF/MANIFEST.json"
MAX_ARCHIVE_BYTES = 8 * 1024**3  # what this reads into memory; larger archives are refused


@dataclass(frozen=True)
class MarArchive:
    manifest: dict[str, Any]
    entries: dict[str, bytes]  # archive path -> contents, manifest excluded, in archive order

    @classmethod
    def read(cls, path: str | Path) -> MarArchive:
        path = Path(path)
        if not zipfile.is_zipfile(path):
            raise ValueError(
                f"{path} is not a TorchServe archive (.mar zip); build one with torch-model-archiver "
                "(--archive-format default)"
            )
        with zipfile.ZipFile(path) as zf:
            infos = [i for i in zf.infolist() if not i.is_dir()]
            if sum(i.file_size for i in infos) > MAX_ARCHIVE_BYTES:
                raise ValueError(f"{path} unpacks to more than {MAX_ARCHIVE_BYTES // 1024**3} GiB")
            for info in infos:
                parts = PurePosixPath(info.filename).parts
                if info.filename.startswith("/") or ".." in parts:
                    raise ValueError(f"{path} holds an unsafe path {info.filename!r}")
            if MANIFEST not in zf.namelist():
                raise ValueError(f"{path} has no {MANIFEST}: not a torch-model-archiver archive")
            manifest = json.loads(zf.read(MANIFEST))
            entries = {i.filename: zf.read(i) for i in infos if i.filename != MANIFEST}
        archive = cls(manifest, entries)
        if not archive.model.get("handler"):
            raise ValueError(f"{path}'s manifest names no handler")
        return archive

    @property
    def model(self) -> dict[str, Any]:
        return self.manifest.get("model") or {}

    @property
    def model_name(self) -> str:
        return str(self.model.get("modelName") or "model")

    @property
    def handler(self) -> str:
        return str(self.model["handler"])

    @property
    def is_protected(self) -> bool:
        return PROFILE_FILE in self.entries

    def load_model(self, workdir: Path, overrides: inputs.SpecOverrides) -> sources.LoadedModel:
        """The archived model as TorchServe finds it: the serialized file, and the manifest's model
        file for the eager convention (unpacked into ``workdir``)."""
        serialized = self.model.get("serializedFile")
        if not serialized:
            raise ValueError("the archive has no serialized model file (--serialized-file)")
        for name, data in self.entries.items():
            target = workdir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        model_file = self.model.get("modelFile") or None
        options = sources.SourceOptions(workdir / model_file if model_file else None, None, overrides)
        return sources.load(workdir / serialized, options)

    def protected(self, handler_name: str, handler_code: bytes, extra: dict[str, bytes], name: str) -> MarArchive:
        """This archive with ActiveGuard's handler as the entry point, ``extra`` files added, renamed ``name``."""
        model = dict(self.model, handler=handler_name, modelName=name)
        entries = dict(self.entries)
        entries[handler_name] = handler_code
        entries.update(extra)
        return replace(self, manifest=dict(self.manifest, model=model), entries=entries)

    def write(self, path: Path) -> Path:
        tmp = path.with_suffix(".mar.tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(MANIFEST, json.dumps(self.manifest, indent=4))
            for name, data in self.entries.items():
                zf.writestr(name, data)
        return tmp.replace(path)
