"""Builds a licensed deployment for the serving tests: keys, fingerprints, licenses, .mar files."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from ts.torch_handler.unit_tests.test_utils.mock_context import MockContext

from activeguard.credentials import licenses
from activeguard.credentials.control import ControlConfig
from activeguard.credentials.fingerprints import generate_fingerprints
from activeguard.credentials.header import encode_license_header
from activeguard.credentials.revocations import sign_revocations
from activeguard.experiments.core_evaluation import seed_images
from activeguard.guard.profile import Profile
from activeguard.models.architectures import save_model
from handlers.activeguard_handler import MODEL_FILE

CONFIG = ControlConfig()


@dataclass
class Deployment:
    store: Path
    model_path: Path
    model_id: str
    server_key: Ed25519PrivateKey
    gateway_key: Ed25519PrivateKey
    revocation_file: Path
    fingerprints: torch.Tensor  # one per user in `users`
    users: list[int]
    revocation_version: int = 0

    def revoke(self, *license_ids: str) -> None:
        """Write the license server's signed revocation list with these ids (a newer version each time)."""
        self.revocation_version += 1
        write_revocations(self.revocation_file, self.server_key, license_ids, self.revocation_version)

    def profile(self, **kw) -> Profile:
        pub = self.server_key.public_key()
        return Profile(
            model_id=self.model_id,
            input_shape=(1, 28, 28),
            license_public_keys={licenses.key_id(pub): licenses.public_key_pem(pub).decode()},
            gateway_public_key=licenses.public_key_pem(self.gateway_key.public_key()).decode(),
            revocation_file=str(self.revocation_file),
            # the fixture signs its list once and the session's TorchServe lives for the whole run (a license
            # server or gateway re-signs it every sync): the list must not go stale mid-suite
            revocation_max_age_s=kw.pop("revocation_max_age_s", 86400.0),
            **kw,
        )

    def license(
        self,
        row: int = 0,
        *,
        user: str = "alice",
        validity: int = 3600,
        mid: str | None = None,
        key: Ed25519PrivateKey | None = None,
    ) -> str:
        key = key or self.server_key
        index = self.users[row]
        payload = licenses.make_payload(
            model_id=mid or self.model_id,
            user=user,
            user_index=index,
            fo=CONFIG.fo_of_user(index),
            epsilon=CONFIG.epsilon,
            fingerprint=self.fingerprints[row : row + 1],
            key=key,
            validity_seconds=validity,
        )
        return licenses.sign_license(payload, key).to_text()


def build(model: torch.nn.Module, x_seed: torch.Tensor, root: Path, users: list[int]) -> Deployment:
    model_path = root / "model.pt"
    mid = save_model(model, model_path)
    fps = generate_fingerprints(model, CONFIG, users, seed_images(x_seed, len(users), 3))
    assert fps.success.all()
    deployment = Deployment(
        root / "store",
        model_path,
        mid,
        Ed25519PrivateKey.generate(),
        Ed25519PrivateKey.generate(),
        root / "revocations.agrevocations",
        fps.inputs,
        users,
    )
    write_revocations(deployment.revocation_file, deployment.server_key, (), 0)  # nothing revoked yet
    return deployment


def write_revocations(path: Path, key: Ed25519PrivateKey, license_ids, version: int) -> None:
    """A signed revocation list, as the license server (or the gateway, for it) writes one."""
    path.write_text(sign_revocations(license_ids, version, key))


def header_value(license_text: str) -> str:
    return encode_license_header(license_text)


def post(url: str, body: bytes, headers: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as err:
        raw = err.read()
        try:
            return err.code, json.loads(raw)
        except ValueError:
            return err.code, {"raw": raw.decode(errors="replace")}


def json_body(x: torch.Tensor) -> bytes:
    return json.dumps({"inputs": x.tolist()}).encode()


class BatchContext(MockContext):
    """MockContext plus what ``handle`` uses: per-request headers and response statuses."""

    def __init__(self, model_dir, headers: list[dict[str, str]] | None = None, gpu_id: str | None = None):
        super().__init__(model_pt_file=MODEL_FILE, model_dir=str(model_dir), model_file=None, gpu_id=gpu_id)
        if gpu_id is not None:
            self.system_properties["gpu_id"] = gpu_id  # MockContext drops it without CUDA; TorchServe does not
        self.headers = headers or []
        self.statuses: dict[int, tuple[int, str]] = {}

    def get_all_request_header(self, idx: int) -> dict[str, str]:
        return self.headers[idx] if idx < len(self.headers) else {}

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        self.statuses[idx] = (code, phrase)
