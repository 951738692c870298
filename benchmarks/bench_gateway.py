"""Gateway → TorchServe vs a client calling TorchServe's gRPC API directly, same model, one run.

Both paths carry a session token (direct: in TorchServe's ``input`` map; gateway: in call
metadata), so the difference is the gateway's own hop. Blocks of requests alternate between the
paths so drift in machine load hits both. Usage:

    .venv/bin/python -m benchmarks.bench_gateway [--requests 600] [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import torch

from activeguard import licenses, sessions
from activeguard.data import load_mnist
from activeguard.models import train_lenet5
from activeguard_proto.torchserve import inference_pb2, inference_pb2_grpc
from activeguard_proto.v1 import gateway_pb2, gateway_pb2_grpc
from benchmarks.common import percentile
from gateway.process import GatewayProcess
from gateway.tensors import to_tensor
from handlers.packaging import package
from handlers.server import ManagedTorchServe
from tests.serving_fixtures import build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=600, help="requests per path and concurrency level")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gateway.json"))
    args = parser.parse_args()

    torch.set_num_threads(1)
    split = load_mnist(seed=0)
    model = train_lenet5(split, epochs=3, seed=0)
    x = split.x_test[:1].numpy()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        d = build(model, split.x_test, root, users=[4])
        key_path = root / "gateway.key"
        licenses.generate_signing_key(key_path)
        gateway_key = licenses.load_signing_key(key_path)
        profile = dataclasses.replace(
            d.profile(policy="reject"), gateway_public_key=licenses.public_key_pem(gateway_key.public_key()).decode()
        )
        package(d.model_path, profile, "mnist", d.store)
        token, _ = sessions.issue_session(
            gateway_key, user="bench", user_index=4, license_id="L", model_id=d.model_id, ttl_seconds=3600
        )
        with ManagedTorchServe(d.store, {"mnist": "mnist.mar"}, batch_size=8, max_batch_delay_ms=2) as ts:
            config = {
                "models": [{"name": "mnist", "model_id": d.model_id, "upstreams": [ts.grpc_target]}],
                "signing_key": str(key_path),
                "license_keys_pem": list(profile.license_public_keys.values()),
                "rate_per_user_per_s": 1e9,
                "max_sessions_per_user": 1000,
            }
            (root / "gw.json").write_text(json.dumps(config))
            gw = GatewayProcess(root / "gw.json", root)
            try:
                results = measure(ts.grpc_target, gw.target, token, x, args.requests)
            finally:
                gw.stop()
    out = {
        "benchmark": "gateway vs direct TorchServe gRPC, LeNet-5 MNIST, 1 row per request, loopback",
        "requests_per_cell": args.requests,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


def measure(direct_target: str, gateway_target: str, token: str, x: np.ndarray, requests: int) -> dict:
    buf = io.BytesIO()
    np.save(buf, x)
    direct_channel, gateway_channel = grpc.insecure_channel(direct_target), grpc.insecure_channel(gateway_target)
    direct = inference_pb2_grpc.InferenceAPIsServiceStub(direct_channel)
    gateway = gateway_pb2_grpc.GatewayStub(gateway_channel)
    direct_request = inference_pb2.PredictionsRequest(
        model_name="mnist", input={"data": buf.getvalue(), "session": token.encode()}
    )
    gateway_request = gateway_pb2.PredictRequest(model="mnist", inputs=to_tensor(x))
    metadata = (("authorization", f"Bearer {token}"),)
    calls = {
        "direct": lambda: direct.Predictions(direct_request, timeout=30),
        "gateway": lambda: gateway.Predict(gateway_request, metadata=metadata, timeout=30),
    }

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1000

    results = {}
    for clients in (1, 8):
        latencies: dict[str, list[float]] = {name: [] for name in calls}
        wall: dict[str, float] = {name: 0.0 for name in calls}
        block = 100
        with ThreadPoolExecutor(clients) as pool:
            for fn in calls.values():  # warm-up
                list(pool.map(lambda _, fn=fn: timed(fn), range(50)))
            for _ in range(requests // block):
                for name, fn in calls.items():
                    start = time.perf_counter()
                    latencies[name] += list(pool.map(lambda _, fn=fn: timed(fn), range(block)))
                    wall[name] += time.perf_counter() - start
        for name in calls:
            results[f"{name}_clients{clients}"] = {
                "p50_ms": statistics.median(latencies[name]),
                "p99_ms": percentile(latencies[name], 0.99),
                "throughput_rps": len(latencies[name]) / wall[name],
            }
        d, g = results[f"direct_clients{clients}"], results[f"gateway_clients{clients}"]
        g["added_p50_ms"] = g["p50_ms"] - d["p50_ms"]
        g["throughput_vs_direct"] = g["throughput_rps"] / d["throughput_rps"]
    direct_channel.close()
    gateway_channel.close()
    return results


if __name__ == "__main__":
    main()
