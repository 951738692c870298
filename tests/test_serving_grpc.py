"""The same handler over TorchServe's gRPC API: credentials travel in the `input` map."""

from __future__ import annotations

import json

import grpc
import pytest
import torch

from activeguard.credentials import sessions
from activeguard.models.architectures import predict
from activeguard_proto.torchserve import inference_pb2, inference_pb2_grpc
from tests.serving_fixtures import json_body

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.grpc_target) as channel:
        yield inference_pb2_grpc.InferenceAPIsServiceStub(channel)


def predict_grpc(stub, model: str, **inputs: bytes) -> dict:
    reply = stub.Predictions(inference_pb2.PredictionsRequest(model_name=model, input=inputs), timeout=30)
    return json.loads(reply.prediction)


def test_license_in_input_map_gets_the_real_model(stub, deployment, lenet, mnist):
    x = mnist.x_test[:64]
    out = predict_grpc(stub, "guarded", data=json_body(x), license=deployment.license(0, user="erin").encode())
    assert set(out) == {"outputs"}  # the user learns nothing but outputs
    assert torch.tensor(out["outputs"]).argmax(1).tolist() == predict(lenet, x).argmax(1).tolist()


def test_session_in_input_map(stub, deployment, mnist):
    token, _ = sessions.issue_session(
        deployment.gateway_key,
        user="frank",
        user_index=17,
        license_id="L-f",
        model_id=deployment.model_id,
        ttl_seconds=60,
    )
    out = predict_grpc(stub, "strict", data=json_body(mnist.x_test[:2]), session=token.encode())
    assert out["activeguard"]["user"] == "frank"  # a gateway-signed token gets the decision explained


def test_refusals_are_in_the_body_over_grpc(stub, deployment, mnist):
    # over gRPC TorchServe returns OK with the body; the outcome is read from it
    x = json_body(mnist.x_test[:2])
    assert predict_grpc(stub, "strict", data=x)["reason"] == "no_credentials"
    assert (
        predict_grpc(stub, "strict", data=x, license=deployment.license(0, mid="e" * 64).encode())["reason"]
        == "wrong_model"
    )
    assert predict_grpc(stub, "strict", data=b"{nope")["reason"] == "malformed_input"
    out = predict_grpc(stub, "guarded", data=x)
    assert set(out) == {"outputs"} and len(out["outputs"]) == 2  # random policy: silent, still answers
    explain, _ = sessions.issue_session(
        deployment.gateway_key,
        user="g",
        user_index=0,
        license_id="L-g",
        model_id=deployment.model_id,
        ttl_seconds=60,
        purpose=sessions.EXPLAIN,
    )
    out = predict_grpc(stub, "guarded", data=x, explain=explain.encode())
    assert out["activeguard"] == {"authorized": False, "reason": "no_credentials"}  # only the gateway is told
    forged = explain[:-4] + ("AAAA" if not explain.endswith("AAAA") else "BBBB")
    assert set(predict_grpc(stub, "guarded", data=x, explain=forged.encode())) == {"outputs"}
