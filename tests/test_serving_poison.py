"""Hostile requests share TorchServe batches with licensed ones: no licensed answer may suffer.

Each poison kind below once made ``Guard.handle`` raise, which failed every request of its batch.
They go in over HTTP (as curl would send them) and over TorchServe's own gRPC API, concurrently
with 60 licensed requests, into a server that batches up to 8 requests.
"""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from activeguard_proto.torchserve import inference_pb2, inference_pb2_grpc
from tests.serving_fixtures import header_value, json_body, post

pytestmark = pytest.mark.slow

LICENSED = 60


def npy_header_only(rows: int) -> bytes:
    """A 128-byte .npy whose header declares ``rows`` × 1 × 28 × 28 float32 and carries no data."""
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, 1, 28, 28), }}"
    header += " " * (117 - len(header)) + "\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode()


def poison_http(mnist) -> list[tuple[bytes, dict[str, str]]]:
    x = mnist.x_test[:1].tolist()
    js = {"Content-Type": "application/json"}
    return [
        (json.dumps({"inputs": x, "license": None}).encode(), js),
        (json.dumps({"inputs": x, "license": 12345}).encode(), js),
        (json.dumps({"inputs": x, "license": {"payload": []}}).encode(), js),
        (b"[" * 100_000 + b"]" * 100_000, js),
        (('{"inputs": ' + "[" * 5000 + "]" * 5000 + "}").encode(), js),
        (npy_header_only(10**13), {"Content-Type": "application/octet-stream"}),
        (bytes(random.Random(1).randbytes(512)), {"Content-Type": "application/octet-stream"}),
        (json_body(mnist.x_test[:1]), {**js, "X-ActiveGuard-License": ""}),
        (json_body(mnist.x_test[:1]), {**js, "Authorization": "Bearer \x01garbage"}),
    ]


def poison_grpc(mnist) -> list[dict[str, bytes]]:
    x = json_body(mnist.x_test[:1])
    return [
        {"data": x, "license": b""},
        {"data": x, "session": b""},
        {"data": x, "explain": b"\xff\xfe"},
        {"data": npy_header_only(10**13), "license": b"x"},
        {"data": b"[" * 50_000},
        {"license": b"no data at all"},
    ]


def test_poison_requests_never_fail_licensed_ones(server, deployment, lenet, mnist):
    url = f"{server.url}/predictions/guarded"
    x = mnist.x_test[:4]
    with torch.no_grad():
        real = torch.softmax(lenet(x), 1)
    lic = {"Content-Type": "application/json", "X-ActiveGuard-License": header_value(deployment.license(0))}
    http_poison, grpc_poison = poison_http(mnist), poison_grpc(mnist)
    channel = grpc.insecure_channel(server.grpc_target)
    stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)

    def licensed(_):
        return post(url, json_body(x), lic)

    def hostile(i):
        if i % 2:
            body, headers = http_poison[i // 2 % len(http_poison)]
            return post(url, body, headers)
        try:
            reply = stub.Predictions(
                inference_pb2.PredictionsRequest(model_name="guarded", input=grpc_poison[i // 2 % len(grpc_poison)]),
                timeout=60,
            )
            return 200, json.loads(reply.prediction)
        except grpc.RpcError as err:
            return err.code().name, {}

    jobs = [("licensed", i) for i in range(LICENSED)] + [("hostile", i) for i in range(3 * LICENSED // 2)]
    random.Random(0).shuffle(jobs)
    try:
        with ThreadPoolExecutor(16) as pool:
            results = list(
                pool.map(lambda job: (job[0], (licensed if job[0] == "licensed" else hostile)(job[1])), jobs)
            )
    finally:
        channel.close()
    good = [(status, body) for kind, (status, body) in results if kind == "licensed"]
    correct = sum(
        status == 200 and torch.allclose(torch.tensor(body["outputs"]), real, atol=1e-5) for status, body in good
    )
    print(
        f"\npoison test: {correct}/{LICENSED} licensed requests answered correctly beside "
        f"{len(results) - LICENSED} hostile ones"
    )
    assert correct == LICENSED
    for kind, (status, body) in results:  # and each hostile request got its own answer, not a 5xx
        if kind == "hostile":
            assert status in (200, 400, 403) or status in ("INVALID_ARGUMENT",), (status, body)
