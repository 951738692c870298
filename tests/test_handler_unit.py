"""The TorchServe handler glue on TorchServe's own MockContext: no server, a second or two."""

from __future__ import annotations

import json

import pytest
import torch

from activeguard.guard.profile import PROFILE_FILE
from activeguard.models.architectures import save_model
from handlers.activeguard_handler import LICENSE_HEADER, MODEL_FILE, ActiveGuardHandler, serving_device
from tests.serving_fixtures import BatchContext, header_value, json_body


@pytest.fixture()
def model_dir(tmp_path, deployment, lenet):
    save_model(lenet, tmp_path / MODEL_FILE)
    (tmp_path / PROFILE_FILE).write_text(deployment.profile(policy="reject").to_json())
    return tmp_path


def test_device_follows_gpu_id_like_base_handler(monkeypatch):
    assert serving_device(None) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert serving_device("0") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert serving_device("1") == torch.device("cuda:1")
    assert serving_device(None) == torch.device("cpu")


def test_initialize_keeps_base_handler_attributes_and_decides_each_request(model_dir, deployment, lenet, mnist):
    headers = [{"X-ActiveGuard-License": header_value(deployment.license(0))}, {}, {}, {LICENSE_HEADER: "%%"}]
    context = BatchContext(model_dir, headers, gpu_id="0")
    handler = ActiveGuardHandler()
    handler.initialize(context)
    assert handler.initialized and handler.context is context and handler.manifest == context.manifest
    assert handler.device == serving_device("0") and next(handler.model.parameters()).device == handler.device
    x = mnist.x_test[:3]
    rows = [{"body": json_body(x)}, {"body": json_body(x)}, {"data": b"{broken"}, {"body": json_body(x)}]
    bodies = [json.loads(b) for b in handler.handle(rows, context)]
    with torch.no_grad():
        real = torch.softmax(lenet(x), 1)
    assert torch.allclose(torch.tensor(bodies[0]["outputs"]), real, atol=1e-5) and 0 not in context.statuses
    assert context.statuses[1] == (403, "no_credentials") and "outputs" not in bodies[1]
    assert context.statuses[2] == (400, "malformed_input")
    assert context.statuses[3] == (403, "malformed_license")


def test_weights_that_do_not_match_the_profile_are_refused(model_dir, mnist):
    from activeguard.models.architectures import train_lenet5

    save_model(train_lenet5(mnist, epochs=0, seed=3), model_dir / MODEL_FILE)
    with pytest.raises(RuntimeError, match="model id"):
        ActiveGuardHandler().initialize(BatchContext(model_dir))
