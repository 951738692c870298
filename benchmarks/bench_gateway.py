"""Gateway → TorchServe vs a client calling TorchServe directly (gRPC, and HTTP), same model, one run.

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
from pathlib import Path

import grpc
import numpy as np
import torch

from activeguard.credentials import licenses, sessions
from activeguard.models.architectures import train_lenet5
from activeguard.models.data import load_mnist
from activeguard_proto.torchserve import inference_pb2, inference_pb2_grpc
from activeguard_proto.v1 import gateway_pb2, gateway_pb2_grpc
from benchmarks.common import (
    HTTPClients,
    host_description,
    measure_interleaved,
    process_cpu_seconds,
    timed,
    write_result,
)
from gateway.process import GatewayProcess
from gateway.tensors import to_tensor
from handlers.packaging import package
from handlers.server import ManagedTorchServe
from tests.serving_fixtures import build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=600, help="requests per path and concurrency level")
    parser.add_argument("--runs", type=int, default=3, help="runs per concurrency level; the goals use their median")
    parser.add_argument(
        "--upstream",
        choices=("http", "grpc"),
        default="http",
        help="the gateway's Predict upstream: TorchServe's HTTP API (the default route setting "
        "http_upstreams) or its gRPC API",
    )
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
                "models": [
                    {
                        "name": "mnist",
                        "model_id": d.model_id,
                        "upstreams": [ts.grpc_target],
                        "http_upstreams": [ts.url] if args.upstream == "http" else [],
                    }
                ],
                "signing_key": str(key_path),
                "license_keys_pem": list(profile.license_public_keys.values()),
                "rate_per_user_per_s": 1e9,
                "max_sessions_per_user": 1000,
            }
            (root / "gw.json").write_text(json.dumps(config))
            gw = GatewayProcess(root / "gw.json", root)
            try:
                results = measure(ts, gw.target, token, x, args.requests, args.runs, gw.proc.pid)
            finally:
                gw.stop()
    out = {
        "benchmark": "gateway vs direct TorchServe gRPC, LeNet-5 MNIST, 1 row per request, loopback",
        "requests_per_cell": args.requests,
        "runs": args.runs,
        "goals": {"clients1": {"added_p50_ms": 1.0}, "clients8": {"throughput_vs_direct": 0.8, "p99_vs_direct": 1.3}},
        "results": results,
        "host": host_description(),
    }
    write_result(out, args.out)


def measure(
    ts: ManagedTorchServe, gateway_target: str, token: str, x: np.ndarray, requests: int, runs: int, gateway_pid: int
) -> dict:
    """Per concurrency level: each run interleaves direct gRPC, direct HTTP and gateway blocks
    (shuffled order); the gateway's CPU clock is read around every block, so its CPU per request is
    charged to the path that caused it (the direct paths' figures are the gateway idling: a check)."""
    buf = io.BytesIO()
    np.save(buf, x)
    direct_channel, gateway_channel = grpc.insecure_channel(ts.grpc_target), grpc.insecure_channel(gateway_target)
    direct = inference_pb2_grpc.InferenceAPIsServiceStub(direct_channel)
    gateway = gateway_pb2_grpc.GatewayStub(gateway_channel)
    direct_request = inference_pb2.PredictionsRequest(
        model_name="mnist", input={"data": buf.getvalue(), "session": token.encode()}
    )
    gateway_request = gateway_pb2.PredictRequest(model="mnist", inputs=to_tensor(x))
    metadata = (("authorization", f"Bearer {token}"),)
    http = HTTPClients(ts.ports.inference)
    http_headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"}
    calls = {
        "direct": lambda _i: 1000 * timed(lambda: direct.Predictions(direct_request, timeout=30))[0],
        "direct_http": lambda _i: http.post("/predictions/mnist", buf.getvalue(), http_headers)[0],
        "gateway": lambda _i: 1000 * timed(lambda: gateway.Predict(gateway_request, metadata=metadata, timeout=30))[0],
    }
    cpu = process_cpu_seconds(gateway_pid)
    results = {}
    for clients in (1, 8):
        per_run = [
            measure_interleaved(
                calls, clients=clients, requests=requests, block=100, warmup=50, seed=run, cpu_seconds=cpu
            )
            for run in range(runs)
        ]
        results[f"clients{clients}"] = {"runs": per_run, "median": medians(per_run)}
    direct_channel.close()
    gateway_channel.close()
    http.close()
    return results


def medians(per_run: list[dict[str, dict[str, float]]]) -> dict[str, float]:
    """The goals' figures, each the median over runs of that run's gateway-vs-direct comparison."""

    def median(fn) -> float:
        return statistics.median(fn(run["direct"], run["gateway"]) for run in per_run)

    def versus_http(fn) -> float:
        return statistics.median(fn(run["direct_http"], run["gateway"]) for run in per_run)

    return {
        "direct_p50_ms": median(lambda d, g: d["p50_ms"]),
        "direct_http_p50_ms": versus_http(lambda d, g: d["p50_ms"]),
        "added_p50_ms_vs_direct_http": versus_http(lambda d, g: g["p50_ms"] - d["p50_ms"]),
        "throughput_vs_direct_http": versus_http(lambda d, g: g["throughput_rps"] / d["throughput_rps"]),
        "gateway_p50_ms": median(lambda d, g: g["p50_ms"]),
        "added_p50_ms": median(lambda d, g: g["p50_ms"] - d["p50_ms"]),
        "throughput_vs_direct": median(lambda d, g: g["throughput_rps"] / d["throughput_rps"]),
        "p99_vs_direct": median(lambda d, g: g["p99_ms"] / d["p99_ms"]),
        "gateway_cpu_ms_per_request": median(lambda d, g: g["cpu_ms_per_request"]),
        "gateway_cpu_ms_per_direct_request": median(lambda d, g: d["cpu_ms_per_request"]),
    }


if __name__ == "__main__":
    main()
