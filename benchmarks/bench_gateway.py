"""Proxy mode, direct mode and plain TorchServe side by side: same model, same TorchServe, one run.

Five paths, each one row per request on loopback, interleaved in blocks (order shuffled per round)
so drift in machine load hits each alike:

* ``gateway`` (**proxy mode**): the client calls the gateway's Predict with its session; the
  gateway forwards to TorchServe (HTTP by default, ``--upstream``);
* ``direct_mode`` (**direct mode**): ``gateway.client.DirectClient``, the protected archive called
  straight over HTTP with the gateway's session token (``Authorization: Bearer``), ``.npy`` body,
  the JSON answer parsed into numpy; the handler checks the session;
* ``plain``: the owner's plain archive (benchmarks/plain_handler.py, no ActiveGuard at all), same
  model, same ``.npy`` body over the same kind of kept-alive connection, answer parsed alike;
* ``direct`` / ``direct_http``: the protected archive with the session, raw gRPC (``input`` map) /
  raw HTTP with nothing parsed: the references proxy mode has been compared with since issue 20.

The session is issued with the gateway's key exactly as its Authenticate would (no license server
runs here). ``results.clientsN.median`` holds the proxy-mode figures as before plus
``direct_mode_added_p50_ms`` (direct mode p50 - plain p50) and ``direct_mode_throughput_vs_direct``
(direct-mode throughput / plain TorchServe throughput), each the median over runs. Usage:

    .venv/bin/python -m benchmarks.bench_gateway [--requests 600] [--runs 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import torch

from activeguard.credentials import licenses, sessions
from activeguard.models.architectures import train_lenet5
from activeguard.models.data import load_mnist
from activeguard_proto.torchserve import inference_pb2, inference_pb2_grpc
from activeguard_proto.v1 import gateway_pb2, gateway_pb2_grpc
from benchmarks.bench_serving import PLAIN_HANDLER
from benchmarks.common import (
    HTTPClients,
    host_description,
    measure_interleaved,
    process_cpu_seconds,
    process_group_cpu_seconds,
    timed,
    write_result,
)
from gateway.client import DirectClient
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

    host = host_description()  # the load average before the run
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
            d.profile(policy="reject", revocation_max_age_s=24 * 3600),  # the list is written once, never refreshed
            gateway_public_key=licenses.public_key_pem(gateway_key.public_key()).decode(),
        )
        package(d.model_path, profile, "mnist", d.store)
        package(d.model_path, profile, "plain", d.store, handler=PLAIN_HANDLER)  # the owner's plain archive
        token, _ = sessions.issue_session(
            gateway_key, user="bench", user_index=4, license_id="L", model_id=d.model_id, ttl_seconds=3600
        )
        models = {"mnist": "mnist.mar", "plain": "plain.mar"}
        with ManagedTorchServe(d.store, models, batch_size=8, max_batch_delay_ms=2) as ts:
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
        "benchmark": "proxy mode (gateway) vs direct mode (session, then TorchServe) vs plain TorchServe, "
        "LeNet-5 MNIST, 1 row per request, loopback",
        "requests_per_cell": args.requests,
        "runs": args.runs,
        "goals": {
            "clients1": {"added_p50_ms": 1.0, "direct_mode_added_p50_ms": 0.3},
            "clients8": {"throughput_vs_direct": 0.8, "p99_vs_direct": 1.3, "direct_mode_throughput_vs_direct": 0.95},
        },
        "definitions": {
            "direct_mode_added_p50_ms": "direct mode p50 - plain TorchServe p50 (the owner's archive without "
            "ActiveGuard), median over runs",
            "direct_mode_throughput_vs_direct": "direct-mode throughput / plain TorchServe throughput, median over runs",
            "added_p50_ms, throughput_vs_direct, p99_vs_direct": "proxy mode vs the protected archive over raw gRPC "
            "with the session (as before)",
        },
        "results": results,
        "host": host,
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
    direct_mode = DirectClient(FixedSession(token), ts.url)
    plain_headers = {"Content-Type": "application/octet-stream"}

    def plain(_i: int) -> float:  # what a client of the owner's plain archive does: send .npy, read the answer
        start = time.perf_counter()
        np.save(out := io.BytesIO(), np.ascontiguousarray(x, dtype=np.float32))
        _, answer = http.post("/predictions/plain", out.getvalue(), plain_headers)
        np.asarray(json.loads(answer)["outputs"], dtype=np.float32)
        return 1000 * (time.perf_counter() - start)

    calls = {
        "direct": lambda _i: 1000 * timed(lambda: direct.Predictions(direct_request, timeout=30))[0],
        "direct_http": lambda _i: http.post("/predictions/mnist", buf.getvalue(), http_headers)[0],
        "gateway": lambda _i: 1000 * timed(lambda: gateway.Predict(gateway_request, metadata=metadata, timeout=30))[0],
        "direct_mode": lambda _i: 1000 * timed(lambda: direct_mode.predict("mnist", x))[0],
        "plain": plain,
    }
    cpu = process_cpu_seconds(gateway_pid)
    torchserve_cpu = {"torchserve": process_group_cpu_seconds(ts.process.pid)}  # frontend and workers
    results = {}
    for clients in (1, 8):
        per_run = [
            measure_interleaved(
                calls,
                clients=clients,
                requests=requests,
                block=100,
                warmup=50,
                seed=run,
                cpu_seconds=cpu,
                more_cpu=torchserve_cpu,
            )
            for run in range(runs)
        ]
        results[f"clients{clients}"] = {"runs": per_run, "median": medians(per_run)}
    direct_channel.close()
    gateway_channel.close()
    http.close()
    direct_mode.close()
    return results


class FixedSession:
    """The session source ``DirectClient`` asks for a token: here one the gateway's key signed up front."""

    def __init__(self, token: str):
        self.token = token

    def session(self, model: str) -> str:
        return self.token

    def forget(self, model: str) -> None:
        pass


def medians(per_run: list[dict[str, dict[str, float]]]) -> dict[str, float]:
    """The goals' figures, each the median over runs of that run's gateway-vs-direct comparison."""

    def median(fn) -> float:
        return statistics.median(fn(run["direct"], run["gateway"]) for run in per_run)

    def versus_http(fn) -> float:
        return statistics.median(fn(run["direct_http"], run["gateway"]) for run in per_run)

    def direct_mode(fn) -> float:
        return statistics.median(fn(run["plain"], run["direct_mode"]) for run in per_run)

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
        "plain_p50_ms": direct_mode(lambda p, m: p["p50_ms"]),
        "direct_mode_p50_ms": direct_mode(lambda p, m: m["p50_ms"]),
        "direct_mode_added_p50_ms": direct_mode(lambda p, m: m["p50_ms"] - p["p50_ms"]),
        "direct_mode_throughput_vs_direct": direct_mode(lambda p, m: m["throughput_rps"] / p["throughput_rps"]),
        "direct_mode_p99_vs_plain": direct_mode(lambda p, m: m["p99_ms"] / p["p99_ms"]),
        # TorchServe's CPU (frontend and workers) per request: less swayed by other load than wall time
        "plain_torchserve_cpu_ms_per_request": direct_mode(lambda p, m: p["torchserve_cpu_ms_per_request"]),
        "direct_mode_torchserve_cpu_ms_per_request": direct_mode(lambda p, m: m["torchserve_cpu_ms_per_request"]),
        "direct_mode_torchserve_cpu_vs_plain": direct_mode(
            lambda p, m: m["torchserve_cpu_ms_per_request"] / p["torchserve_cpu_ms_per_request"]
        ),
    }


if __name__ == "__main__":
    main()
