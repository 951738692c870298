"""Bring your own model, serving half of the core: a classifier the project has never seen goes
through `license register`, the license server and `activeguard package` into a real TorchServe.

The network (conv + BatchNorm, trained for about a second on scikit-learn's 8x8 digits) exists only
as source text in this file. Its clients send raw digit values in [0, 16]; the network expects them
normalized, so the input spec (range and normalization) must travel with the model everywhere:
fingerprints are generated in that range and the handler normalizes before the network. It is saved
as a bare TorchScript archive (the spec given by flags), as an exported program and as a state dict
plus model file (both of which carry the spec), and served in all three formats by one TorchServe.
"""

from __future__ import annotations

import json

import grpc
import pytest
import torch

from activeguard.credentials import licenses as lic
from activeguard.credentials.control import ControlConfig
from activeguard.guard.profile import PROFILE_FILE, Profile
from activeguard.models import inputs, sources
from activeguard.models.architectures import train
from activeguard.models.data import load_digits8x8
from handlers.activeguard_handler import ActiveGuardHandler
from handlers.packaging import package, serialized_name
from handlers.server import ManagedTorchServe
from license_server.client import LicenseClient, to_signed
from license_server.config import ServerConfig
from license_server.process import in_process
from license_server.store import SCHEMA_VERSION, Store
from tests.processes import TOKEN
from tests.serving_fixtures import BatchContext, header_value, json_body, post

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MODEL_CODE = """
import torch
from torch import nn


class DigitsNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        return self.head(torch.flatten(self.features(x), 1))
"""
SPEC = inputs.InputSpec((1, 8, 8), 0.0, 16.0, mean=(4.88,), std=(6.02,))
SPEC_FLAGS = ["--input-shape", "1,8,8", "--input-range", "0,16", "--normalize", "4.88/6.02"]
USERS = ("alice", "bob", "carol")


@pytest.fixture(scope="module")
def byom(tmp_path_factory) -> dict:
    """The owner's files: bare TorchScript, .pt2, state dict + model file; the clients' test rows."""
    root = tmp_path_factory.mktemp("byom")
    (root / "digits_model.py").write_text(MODEL_CODE)
    cls = sources.load_model_class(root / "digits_model.py", "DigitsNet")
    split = load_digits8x8(seed=0)
    x_train, x_test = split.x_train * 16, split.x_test * 16  # raw digit values, as clients send them
    torch.manual_seed(0)
    network = cls()
    norm = lambda x: (x - SPEC.mean[0]) / SPEC.std[0]  # noqa: E731 - what the network was trained on
    train(network, norm(x_train), split.y_train, epochs=8, batch_size=64, lr=1e-2, seed=0)
    paths = sources.save_all_formats(network, SPEC, root, "digits", MODEL_CODE)
    paths["bare"] = root / "digits-bare.ts"
    torch.jit.save(torch.jit.script(network), str(paths["bare"]))  # carries no input spec
    twin = cls().eval()  # the same architecture, independently initialized: another model id
    twin_path = root / "twin.ts"
    torch.jit.save(
        torch.jit.script(twin), str(twin_path), _extra_files={sources.SPEC_FILE: json.dumps({"input": SPEC.to_dict()})}
    )
    view = inputs.ClientView(network.eval(), SPEC).eval()
    with torch.no_grad():
        accuracy = float((view(x_test).argmax(1) == split.y_test).float().mean())
    assert accuracy > 0.8, accuracy
    return {"paths": paths, "twin": twin_path, "x": x_test[:40], "view": view, "root": root}


@pytest.fixture(scope="module")
def licensed(byom, tmp_path_factory, monkeypatch_module) -> dict:
    """A real license server: the model registered in three formats (one id), three users licensed."""
    from license_server.cli import license_main

    paths = byom["paths"]
    data_dir = tmp_path_factory.mktemp("license-server")
    config = ServerConfig(data_dir=data_dir, port=0, metrics_port=None, max_workers=4)
    with in_process(config, TOKEN) as server, LicenseClient(f"127.0.0.1:{server.port}", TOKEN, timeout=300) as c:
        monkeypatch_module.setenv("ACTIVEGUARD_ADMIN_TOKEN", TOKEN)
        monkeypatch_module.setenv("ACTIVEGUARD_LICENSE_SERVER", f"127.0.0.1:{server.port}")
        # the CLI loads the bare TorchScript with the spec flags and registers exactly that
        assert license_main(["register", "--model", str(paths["bare"]), *SPEC_FLAGS, "--name", "digits"]) == 0
        mid = sources.load(paths["export"]).model_id
        # the same weights as an uploaded exported program and as a state dict + model file: one model
        pt2 = c.register_model(checkpoint=paths["export"].read_bytes())
        eager = c.register_model(
            model_path=str(paths["state_dict"]),
            model_file_text=MODEL_CODE,
            model_class="DigitsNet",
            input_spec=json.dumps(SPEC.to_dict()),
        )
        assert (pt2.profile.model_id, eager.profile.model_id, pt2.created, eager.created) == (mid, mid, False, False)
        assert inputs.InputSpec.from_dict(json.loads(eager.input_spec)) == SPEC and eager.source == "torchscript"
        # a state dict without its code is refused with a reason, not an internal error
        with pytest.raises(grpc.RpcError) as refused:
            c.register_model(model_path=str(paths["state_dict"]))
        assert "model_file_text" in refused.value.details()
        issued = [c.issue(mid, user, 3600) for user in USERS]
        keys = c.verification_keys()
        public = data_dir / "license.pub.pem"
        public.write_bytes(lic.public_key_pem(next(iter(keys.values()))))
        stored = Store(config.database_url).get_model(mid)
    assert stored.source == "torchscript" and stored.input_shape == (1, 8, 8)
    return {"model_id": mid, "licenses": [to_signed(m).to_text() for m in issued], "public_key": public}


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def served(byom, licensed, tmp_path_factory):
    """One TorchServe, the model archived in three formats: TorchScript via the CLI (reject), .pt2 (random), eager."""
    from activeguard.cli.app import main

    paths, store = byom["paths"], tmp_path_factory.mktemp("store")
    key = str(licensed["public_key"])
    common = ["--store", str(store), "--license-key", key]
    assert (
        main(["package", "--model", str(paths["bare"]), *SPEC_FLAGS, "--name", "ts", "--policy", "reject", *common])
        == 0
    )
    pem = licensed["public_key"].read_text()
    signed = ControlConfig.signed_default(10)  # the license server's default FO space, as registered
    profile = Profile(
        model_id=licensed["model_id"],
        input_shape=SPEC.shape,
        input_spec=SPEC.to_dict(),
        confidences=signed.confidences,
        runner_up_confidences=signed.runner_up_confidences,
        policy="random",
        license_public_keys={lic.key_id(lic.load_public_key(key)): pem},
    )
    package(paths["export"], profile, "pt2", store)
    eager = sources.SourceOptions(paths["model_file"], "DigitsNet")
    package(paths["state_dict"], profile, "eager", store, options=eager)
    with ManagedTorchServe(store, {n: f"{n}.mar" for n in ("ts", "pt2", "eager")}, batch_size=4) as ts:
        yield ts


def test_licensed_users_get_the_real_model_in_every_format(served, byom, licensed):
    x = byom["x"]
    with torch.no_grad():
        real = torch.softmax(byom["view"](x), 1)
    for model in ("ts", "pt2", "eager"):
        for user, text in zip(USERS, licensed["licenses"]):
            status, body = post(
                f"{served.url}/predictions/{model}", json_body(x), {"X-ActiveGuard-License": header_value(text)}
            )
            assert status == 200 and set(body) == {"outputs"}, (model, user, body)
            assert torch.allclose(torch.tensor(body["outputs"]), real, atol=1e-4), (model, user)


def test_unlicensed_requests_get_the_profiles_answer(served, byom):
    x = byom["x"]
    status, body = post(f"{served.url}/predictions/ts", json_body(x))
    assert (status, body.get("reason")) == (403, "no_credentials")
    status, body = post(f"{served.url}/predictions/pt2", json_body(x))
    with torch.no_grad():
        real = torch.softmax(byom["view"](x), 1)
    fake = torch.tensor(body["outputs"])
    assert status == 200 and fake.shape == real.shape and not torch.allclose(fake, real, atol=1e-2)
    status, body = post(f"{served.url}/predictions/eager", json_body(torch.zeros(2, 1, 28, 28)))
    assert (status, body.get("reason")) == (400, "malformed_input") and "(N, 1, 8, 8)" in body["error"]


def test_a_model_that_does_not_match_the_profile_is_refused(byom, licensed, tmp_path):
    """At packaging time, and by the handler should an archive hold other weights than its profile names."""
    paths, mid = byom["paths"], licensed["model_id"]
    profile = Profile(model_id=mid, input_shape=SPEC.shape)
    with pytest.raises(ValueError, match="profile is for model"):
        package(byom["twin"], profile, "twin", tmp_path / "store")

    model_dir = tmp_path / "archive"
    model_dir.mkdir()
    (model_dir / serialized_name("torchscript")).write_bytes(byom["twin"].read_bytes())
    good = Profile(model_id=mid, input_shape=SPEC.shape, source="torchscript", input_spec=SPEC.to_dict())
    (model_dir / PROFILE_FILE).write_text(good.to_json())
    with pytest.raises(RuntimeError, match="model id"):
        ActiveGuardHandler().initialize(BatchContext(model_dir))
    (model_dir / serialized_name("torchscript")).write_bytes(paths["torchscript"].read_bytes())
    handler = ActiveGuardHandler()
    handler.initialize(BatchContext(model_dir))  # the right weights start
    assert handler.initialized and handler.guard.profile.spec == SPEC


def test_a_version_1_license_database_is_migrated(tmp_path):
    """Schema 2 adds how to load each model, schema 3 the ranked FO space's grid (schema 4 only adds tables:
    tests/test_journal_ingest.py); a database written by
    a schema-1 server gains every column, and its models stay in the paper's FO space."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    store = Store(url)
    added = ("source", "model_class", "model_file_text", "input_spec", "runner_up_confidences")
    with store.engine.begin() as conn:
        for column in added:
            conn.exec_driver_sql(f"ALTER TABLE ag_models DROP COLUMN {column}")
        conn.exec_driver_sql("UPDATE ag_schema_version SET version = 1")
        conn.exec_driver_sql(
            "INSERT INTO ag_models (model_id, name, num_classes, confidences, epsilon, input_shape, encoding, "
            "model_path, created_at) VALUES ('m1', 'old', 10, '[0.2, 0.3, 0.4]', 0.01, '[1, 28, 28]', 'float32', "
            "'/nowhere.pt', 0)"
        )
    store.close()
    store = Store(url)
    try:
        assert store.schema_version() == SCHEMA_VERSION == 4
        with store.engine.connect() as conn:
            columns = {row[1] for row in conn.exec_driver_sql("PRAGMA table_info(ag_models)")}
        assert set(added) <= columns
        old = store.get_model("m1")
        assert old.runner_up_confidences == () and old.capacity == 30 and old.control.space.scheme == "paper"
    finally:
        store.close()
