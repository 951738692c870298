"""`activeguard package`: build a `.mar` with torch-model-archiver from weights and a profile."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from activeguard.models import load_model, model_id
from activeguard.protection import PROFILE_FILE, Profile

HANDLER_FILE = Path(__file__).with_name("activeguard_handler.py")


def package(
    model_path: Path, profile: Profile, name: str, store: Path, version: str = "1.0", handler: Path = HANDLER_FILE
) -> Path:
    """Write ``store/name.mar``; refuse a profile whose model id does not match the weights.

    ``handler`` is swappable only so benchmarks can package a plain handler beside ours.
    """
    actual = model_id(load_model(model_path))
    if actual != profile.model_id:
        raise ValueError(f"profile is for model {profile.model_id[:16]}…, but {model_path} is {actual[:16]}…")
    store.mkdir(parents=True, exist_ok=True)
    archiver = shutil.which("torch-model-archiver") or str(Path(sys.executable).with_name("torch-model-archiver"))
    with tempfile.TemporaryDirectory() as tmp:
        staged_model = Path(tmp) / "model.pt"
        shutil.copyfile(model_path, staged_model)
        profile_file = Path(tmp) / PROFILE_FILE
        profile_file.write_text(profile.to_json())
        cmd = [
            archiver,
            "--model-name",
            name,
            "--version",
            version,
            "--serialized-file",
            str(staged_model),
            "--handler",
            str(handler),
            "--extra-files",
            str(profile_file),
            "--export-path",
            str(store),
            "--force",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"torch-model-archiver failed: {proc.stderr.strip()[-2000:]}")
    return store / f"{name}.mar"
