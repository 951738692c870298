"""An owner's existing TorchServe deployment, built as an owner would build it, for the protect tests.

The Fashion-MNIST ResNet of the core issue (the ``fashion-resnet`` workload's quick owner, cached)
scripted with plain ``torch.jit.script`` (no ActiveGuard metadata), archived by plain
``torch-model-archiver`` with the owner's own PNG handler (``tests/owner_files/fashion_handler.py``)
and label names as an extra file. Licenses are real Ed25519 licenses over real fingerprints.
"""

from __future__ import annotations

import io
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from PIL import Image

from activeguard.credentials import licenses
from activeguard.credentials.control import ControlConfig
from activeguard.credentials.fingerprints import generate_fingerprints
from activeguard.credentials.revocations import sign_revocations
from activeguard.experiments.core_evaluation import seed_images
from activeguard.models import inputs, sources, workloads
from activeguard.models.data import Split
from handlers.packaging import torch_model_archiver

OWNER_FILES = Path(__file__).with_name("owner_files")
FASHION_LABELS = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
CONFIG = ControlConfig.signed_default(10)  # what `activeguard protect` uses by default


def png(image: torch.Tensor) -> bytes:
    """A (1, 28, 28) image in [0, 1] as the PNG file a client would upload."""
    pixels = (image[0].numpy() * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def archive(
    store: Path, name: str, serialized: Path, handler: str, extra: list[Path] = (), model_file: Path | None = None
) -> Path:
    """What the owner ran: plain torch-model-archiver."""
    cmd = [torch_model_archiver(), "--model-name", name, "--version", "1.0", "--serialized-file", str(serialized)]
    cmd += ["--handler", handler, "--export-path", str(store), "--force"]
    if extra:
        cmd += ["--extra-files", ",".join(map(str, extra))]
    if model_file is not None:
        cmd += ["--model-file", str(model_file)]
    store.mkdir(parents=True, exist_ok=True)
    subprocess.run(cmd, check=True, capture_output=True)
    return store / f"{name}.mar"


@dataclass
class Licensing:
    """A license server's key and fingerprints for a few users of one model (signed in the test)."""

    model_id: str
    key: Ed25519PrivateKey
    users: list[int]
    fingerprints: torch.Tensor

    @classmethod
    def build(cls, model_id: str, view: inputs.ClientView, seeds: torch.Tensor, users: list[int]) -> Licensing:
        fps = generate_fingerprints(view, CONFIG, users, seed_images(seeds, len(users), 3), bounds=view.spec.bounds)
        assert fps.success.all(), "fingerprints must succeed on the owner's model"
        return cls(model_id, Ed25519PrivateKey.generate(), users, fps.inputs)

    def write_public_key(self, path: Path) -> Path:
        path.write_bytes(licenses.public_key_pem(self.key.public_key()))
        return path

    def write_revocations(self, path: Path, *license_ids: str, version: int = 0) -> Path:
        """The license server's signed revocation list (nothing revoked, at version 0, by default)."""
        path.write_text(sign_revocations(license_ids, version, self.key))
        return path

    def license(self, row: int, user: str) -> licenses.SignedLicense:
        index = self.users[row]
        payload = licenses.make_payload(
            model_id=self.model_id,
            user=user,
            user_index=index,
            fo=CONFIG.fo_of_user(index),
            epsilon=CONFIG.epsilon,
            fingerprint=self.fingerprints[row : row + 1],
            key=self.key,
            validity_seconds=3600,
        )
        return licenses.sign_license(payload, self.key)


def fashion_owner() -> tuple[torch.nn.Module, inputs.InputSpec, Split]:
    """The core issue's Fashion-MNIST ResNet (quick size, cached) and its data."""
    workload = workloads.get("fashion-resnet")
    size = workload.quick
    split = workload.data(0, size)
    owner = workload.owner(0, size, split=split)
    return owner.network.eval(), workload.input_spec(split), split


def write_labels(path: Path) -> Path:
    path.write_text(json.dumps({str(i): name for i, name in enumerate(FASHION_LABELS)}))
    return path


FASHION_USERS = [0, 13, 26]  # FOs (0, 0.2), (4, 0.3), (8, 0.4)


def fashion_deployment(root: Path, test_images: int = 48) -> dict:
    """The owner's deployment under ``root``: the archive, licensing for three users, test images."""
    network, spec, split = fashion_owner()
    scripted = root / "fashion.pt"
    torch.jit.save(torch.jit.script(network), str(scripted))  # the owner's file: no ActiveGuard metadata
    view = inputs.ClientView(network, spec).eval()
    mid = sources.load(scripted, sources.SourceOptions(overrides=inputs.SpecOverrides(shape=spec.shape))).model_id
    licensing = Licensing.build(mid, view, split.x_train[:500], FASHION_USERS)
    labels = write_labels(root / "index_to_name.json")
    plain = archive(root / "plain", "fashion", scripted, str(OWNER_FILES / "fashion_handler.py"), [labels])
    return {
        "root": root,
        "mar": plain,
        "licensing": licensing,
        "images": split.x_test[:test_images],
        "labels": split.y_test[:test_images],
    }
