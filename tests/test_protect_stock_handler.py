"""Protect an archive that uses TorchServe's stock ``base_handler`` on an eager model.

The owner's deployment: the reference LeNet-5 as a state dict plus a model file (TorchServe's eager
convention), archived with ``--handler base_handler``, and a config.properties that turns on
TorchServe's JSON envelope (clients send ``{"instances": [...]}`` and get ``{"predictions": [...]}``).
``activeguard serve`` keeps that config; the protected archive answers licensed clients exactly as
the unprotected one does, and unlicensed ones with random predictions of the same form.
"""

from __future__ import annotations

import json

import pytest
import torch

from activeguard.cli.app import main
from activeguard.credentials.header import encode_license_header
from handlers.server import ManagedTorchServe
from tests.protect_fixtures import Licensing, archive
from tests.serving_fixtures import post

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MODEL_FILE = '''"""The owner's network code (TorchServe's eager convention: one class, built with no arguments)."""

from activeguard.models.architectures import LeNet5


class Net(LeNet5):
    pass
'''


@pytest.fixture(scope="module")
def stock(lenet, mnist, tmp_path_factory):
    root = tmp_path_factory.mktemp("stock")
    weights = root / "lenet_state.pt"
    torch.save(lenet.state_dict(), weights)
    (root / "net.py").write_text(MODEL_FILE)
    plain = archive(root / "plain", "digits", weights, "base_handler", model_file=root / "net.py")
    from activeguard.models import inputs, sources

    loaded = sources.load(
        weights, sources.SourceOptions(root / "net.py", overrides=inputs.SpecOverrides(shape=(1, 28, 28)))
    )
    licensing = Licensing.build(loaded.model_id, loaded.model, mnist.x_train[:300], [5, 20])
    pub = licensing.write_public_key(root / "license.pub.pem")
    store = root / "store"
    store.mkdir()
    (store / "digits.mar").write_bytes(plain.read_bytes())
    assert (
        main(
            [
                "protect",
                str(plain),
                "--out-dir",
                str(store),
                "--name",
                "guarded",
                "--license-key",
                str(pub),
                "--input-shape",
                "1,28,28",
            ]
        )
        == 0
    )
    config = root / "config.properties"
    config.write_text("# the owner's deployment\nservice_envelope=json\ninference_address=http://0.0.0.0:8080\n")
    models = {"digits": "digits.mar", "guarded": "guarded.mar"}
    with ManagedTorchServe(store, models, batch_size=4, owner_config=config) as ts:
        yield {"ts": ts, "licensing": licensing, "x": mnist.x_test[:24], "y": mnist.y_test[:24]}


def predict(ts, model: str, rows: torch.Tensor, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    """TorchServe's JSON envelope: one instance per request."""
    return post(f"{ts.url}/predictions/{model}", json.dumps({"instances": rows.tolist()}).encode(), headers)


def test_the_owners_config_is_kept_but_the_server_stays_on_loopback(stock):
    config = (stock["ts"].workdir / "config.properties").read_text()
    assert "service_envelope=json" in config
    assert "0.0.0.0" not in config and f"inference_address=http://127.0.0.1:{stock['ts'].ports.inference}" in config


def test_licensed_clients_get_the_stock_handlers_predictions(stock):
    ts, licensing = stock["ts"], stock["licensing"]
    headers = {"X-ActiveGuard-License": encode_license_header(licensing.license(0, "alice").to_text())}
    for x in stock["x"][:8]:
        status, plain = predict(ts, "digits", x[None])
        assert status == 200 and len(plain["predictions"]) == 1 and len(plain["predictions"][0]) == 10
        status, guarded = predict(ts, "guarded", x[None], headers)
        assert status == 200
        assert torch.allclose(torch.tensor(guarded["predictions"]), torch.tensor(plain["predictions"]), atol=1e-4)


def test_unlicensed_clients_get_random_predictions_of_the_same_form(stock):
    ts, x, y = stock["ts"], stock["x"], stock["y"]
    answers = []
    for row in x:
        status, body = predict(ts, "guarded", row[None])
        assert status == 200 and len(body["predictions"]) == 1 and len(body["predictions"][0]) == 10
        answers.append(torch.tensor(body["predictions"][0]).argmax())
    accuracy = float((torch.stack(answers) == y).float().mean())
    assert accuracy < 0.4, accuracy  # the real model is ~97% accurate on these digits; chance is 0.1


def test_a_license_in_the_envelopes_body_covers_every_instance_of_its_request(stock):
    """TorchServe's JSON envelope drops all but the instances; the license beside them still counts,
    for each instance of a request with several, and a request without one stays unlicensed."""
    ts, licensing, x = stock["ts"], stock["licensing"], stock["x"][:3]
    status, plain = predict(ts, "digits", x)
    assert status == 200 and len(plain["predictions"]) == 3
    body = json.dumps({"instances": x.tolist(), "license": licensing.license(1, "bob").to_text()}).encode()
    status, guarded = post(f"{ts.url}/predictions/guarded", body)
    assert status == 200
    assert torch.allclose(torch.tensor(guarded["predictions"]), torch.tensor(plain["predictions"]), atol=1e-4)
    headers = {"X-ActiveGuard-License": encode_license_header(licensing.license(0, "alice").to_text())}
    status, by_header = predict(ts, "guarded", x, headers)  # several instances, the license in the header
    assert status == 200 and torch.allclose(
        torch.tensor(by_header["predictions"]), torch.tensor(plain["predictions"]), atol=1e-4
    )
