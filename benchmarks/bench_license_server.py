"""IssueLicense latency (p50/p99) with and without pre-generation, and throughput with 8 clients.

Runs a real license server process (SQLite store in a temporary directory) on loopback and calls
it over gRPC. Each measurement uses its own copy of the reference LeNet-5 (a 1e-7 bias shift gives
a distinct model id and the same behaviour), so every model starts with all 30 slots free. Usage:

    .venv/bin/python -m benchmarks.bench_license_server [--clients 8] [--out FILE]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from activeguard.models.architectures import save_model, train_lenet5
from activeguard.models.data import load_mnist
from license_server.client import LicenseClient

ROOT = Path(__file__).resolve().parent.parent


def start_server(data: Path, token: str, register_pool: int = 0) -> tuple[subprocess.Popen, str]:
    """A license server process; ``register_pool`` 0 keeps registrations from filling a pool on their own."""
    ready = data / "ready.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "license_server",
            "serve",
            "--data-dir",
            str(data),
            "--port",
            "0",
            "--metrics-port",
            "-1",
            "--ready-file",
            str(ready),
            "--log-level",
            "WARNING",
            "--register-pool",
            str(register_pool),
        ],
        cwd=ROOT,
        env={**os.environ, "ACTIVEGUARD_ADMIN_TOKEN": token},
    )
    deadline = time.monotonic() + 120
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("license server did not start")
        time.sleep(0.1)
    return proc, f"127.0.0.1:{json.loads(ready.read_text())['port']}"


def percentiles(xs: list[float]) -> dict[str, float]:
    a = np.array(xs) * 1000
    return {
        "n": len(xs),
        "p50_ms": round(float(np.percentile(a, 50)), 2),
        "p99_ms": round(float(np.percentile(a, 99)), 2),
        "mean_ms": round(float(a.mean()), 2),
    }


def first_license_after_registration(data: Path, token: str, paths: list[Path]) -> dict[str, float]:
    """A server as deployed (every registration starts a small pool in the background): a new model of the
    default (ranked) FO space registered, then one license issued at once; median over three models."""
    proc, target = start_server(data, token, register_pool=100)
    try:
        with LicenseClient(target, token) as c:
            register_s, issue_s = [], []
            for path in paths[:3]:
                t0 = time.perf_counter()
                mid = c.register_model(model_path=str(path)).profile.model_id
                t1 = time.perf_counter()
                c.issue(mid, "first", 3600)
                register_s.append(t1 - t0)
                issue_s.append(time.perf_counter() - t1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    return {
        "register_s_median": round(float(np.median(register_s)), 3),
        "first_issue_s_median": round(float(np.median(issue_s)), 3),
        "goal_first_issue_s": 2.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/license_server.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = train_lenet5(load_mnist(seed=0), epochs=15, seed=0)
    token = "agt_bench_" + secrets.token_urlsafe(16)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = []
        for i in range(5):
            m = type(model)(**model.config)
            m.load_state_dict(model.state_dict())
            with torch.no_grad():
                m.fc3.bias += i * 1e-7
            paths.append(tmp / f"m{i}.pt")
            save_model(m, paths[-1])
        proc, target = start_server(tmp / "server", token)
        try:
            with LicenseClient(target, token) as c:
                t = time.perf_counter()
                pre = [
                    c.register_model(model_path=str(paths[i]), pregenerate=True, fo_scheme="paper").profile.model_id
                    for i in (0, 1, 2)
                ]
                pregen_s = (time.perf_counter() - t) / 3
                cold = [c.register_model(model_path=str(paths[i]), fo_scheme="paper").profile.model_id for i in (3, 4)]

                def sequential(mid: str) -> list[float]:
                    out = []
                    for i in range(30):
                        t0 = time.perf_counter()
                        c.issue(mid, f"seq-{i}", 3600)
                        out.append(time.perf_counter() - t0)
                    return out

                lat_pre, lat_cold = sequential(pre[0]), sequential(cold[0])

            def throughput(mids: list[str]) -> dict[str, float]:
                jobs = [(mid, i) for mid in mids for i in range(30)]
                clients = [LicenseClient(target, token) for _ in range(args.clients)]
                t0 = time.perf_counter()
                with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
                    list(pool.map(lambda j: clients[j[1] % args.clients].issue(j[0], f"tp-{j[1]}", 3600), jobs))
                elapsed = time.perf_counter() - t0
                for cl in clients:
                    cl.close()
                return {
                    "licenses": len(jobs),
                    "seconds": round(elapsed, 3),
                    "licenses_per_s": round(len(jobs) / elapsed, 1),
                }

            tp_pre, tp_cold = throughput(pre[1:]), throughput(cold[1:])
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        first = first_license_after_registration(tmp / "fresh", token, paths)
    result = {
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "store": "sqlite",
        "slots_per_model": 30,
        "pregenerate_30_slots_s": round(pregen_s, 3),
        "issue_latency_pregenerated": percentiles(lat_pre),
        "issue_latency_on_demand": percentiles(lat_cold),
        f"throughput_{args.clients}_clients_pregenerated": tp_pre,
        f"throughput_{args.clients}_clients_on_demand": tp_cold,
        "first_license_after_registration": first,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
