"""Handler overhead inside a real TorchServe: plain BaseHandler vs ActiveGuard (session, license).

All three archives serve the same LeNet-5 from one TorchServe, and requests are interleaved
round-robin across the modes so machine load hits each alike. Usage:

    .venv/bin/python -m benchmarks.bench_serving [--requests 300] [--out FILE]
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from activeguard.credentials import sessions
from activeguard.models.architectures import train_lenet5
from activeguard.models.data import load_mnist
from benchmarks.common import percentile
from handlers.packaging import package
from handlers.server import ManagedTorchServe
from tests.serving_fixtures import build, header_value, json_body

PLAIN_HANDLER = Path(__file__).with_name("plain_handler.py")


def timed_post(conn: http.client.HTTPConnection, path: str, body: bytes, headers: dict[str, str]) -> tuple[float, int]:
    """One request on a kept-alive connection: (milliseconds, status)."""
    start = time.perf_counter()
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **headers})
    response = conn.getresponse()
    response.read()
    return (time.perf_counter() - start) * 1000, response.status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="requests per mode and batch size")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serving.json"))
    args = parser.parse_args()

    torch.set_num_threads(2)
    split = load_mnist(seed=0)
    model = train_lenet5(split, epochs=5, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        d = build(model, split.x_test, Path(tmp), users=[4])
        profile = d.profile(policy="reject")
        package(d.model_path, profile, "plain", d.store, handler=PLAIN_HANDLER)
        package(d.model_path, profile, "guarded", d.store)
        token, _ = sessions.issue_session(
            d.gateway_key, user="bench", user_index=4, license_id="L", model_id=d.model_id, ttl_seconds=3600
        )
        modes = {
            "plain": ("plain", {}),
            "session": ("guarded", {"Authorization": f"Bearer {token}"}),
            "license": ("guarded", {"X-ActiveGuard-License": header_value(d.license(0))}),
        }
        results = {}
        with ManagedTorchServe(d.store, {"plain": "plain.mar", "guarded": "guarded.mar"}) as ts:
            conns = {m: http.client.HTTPConnection("127.0.0.1", ts.ports.inference, timeout=60) for m in modes}
            order = random.Random(0)
            for batch in (1, 32):
                body = json_body(split.x_test[:batch])
                latencies: dict[str, list[float]] = {m: [] for m in modes}
                for round_ in range(20 + args.requests):  # 20 warm-up rounds, then measured ones
                    names = list(modes)
                    order.shuffle(names)  # no mode always follows another
                    for mode in names:
                        model_name, headers = modes[mode]
                        ms, status = timed_post(conns[mode], f"/predictions/{model_name}", body, headers)
                        assert status == 200, (mode, status)
                        if round_ >= 20:
                            latencies[mode].append(ms)
                for mode, values in latencies.items():
                    results[f"{mode}_batch{batch}"] = {
                        "p50_ms": statistics.median(values),
                        "p99_ms": percentile(values, 0.99),
                        "throughput_rows_per_s": batch * len(values) / (sum(values) / 1000),
                    }
            for conn in conns.values():
                conn.close()
        for batch in (1, 32):
            base = results[f"plain_batch{batch}"]["p50_ms"]
            for mode in ("session", "license"):
                results[f"{mode}_batch{batch}"]["p50_ratio_vs_plain"] = results[f"{mode}_batch{batch}"]["p50_ms"] / base
    out = {
        "benchmark": "TorchServe handler overhead, LeNet-5 MNIST, sequential kept-alive HTTP requests on loopback, modes shuffled per round",
        "requests_per_cell": args.requests,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
