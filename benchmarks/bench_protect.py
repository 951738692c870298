"""Protect what you already serve: the owner's archive vs its protected copy, same model and handler, one run.

The owner's archive is the one the protect tests build (tests/protect_fixtures.py): the Fashion-MNIST
ResNet as plain TorchScript with the owner's PNG-in, label-out handler (tests/owner_files/
fashion_handler.py), made by plain torch-model-archiver. ``activeguard protect`` writes the protected
copy (policy ``reject``, a license key and a gateway key). Three modes, every request one 28x28 PNG
over HTTP with a kept-alive connection on loopback:

* ``unprotected``: the owner's archive, no credentials;
* ``license``: the protected archive, the ``X-ActiveGuard-License`` header on every request (its
  signature is checked once per worker and its expiry and revocation per request; its fingerprint
  rides in the same forward pass as the first request, after which the worker remembers it passed);
* ``session``: the protected archive, ``Authorization: Bearer <gateway session token>`` on every
  request (signature check only, no fingerprint). ActiveGuard answers a session with the gateway's
  envelope (its decision beside the owner's answer, base64) rather than the owner's bare answer.

Two settings, each served by ONE TorchServe holding both archives with the same settings (one
worker per model):

* ``batch1``: TorchServe batchSize 1; one client sending requests one after another (no batch
  wait: with batchSize 1 TorchServe sends each request to the worker at once);
* ``batch8``: TorchServe batchSize 8, maxBatchDelay ``--max-batch-delay`` ms (default 5); 8 concurrent
  closed-loop clients (threads, each with its own connection, each sending its next request as
  soon as its last is answered), so the worker's batches hold up to 8 requests, one image each.

Modes are interleaved in blocks, in an order shuffled per round, so drift in machine load hits
each alike. Reported per mode and setting: p50 and p99 latency (ms, as the client sees it) and
throughput (requests/s); and protected/unprotected p50 against the goals of issue 14 (session
<= 1.05x, license <= 1.25x), as the median of ``--runs`` measurements on the same servers. Usage:

    .venv/bin/python -m benchmarks.bench_protect [--requests 600] [--runs 3] [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from activeguard.cli.app import main as activeguard_main
from activeguard.credentials import licenses, sessions
from activeguard.credentials.header import encode_license_header
from benchmarks.common import (
    HTTPClients,
    add_serving_arguments,
    apply_quick,
    host_description,
    measure_interleaved,
    write_result,
)
from handlers.server import ManagedTorchServe
from tests.protect_fixtures import fashion_deployment, png

GOALS = {"session": 1.05, "license": 1.25}  # protected p50 / unprotected p50, issue 14
MODES = ("unprotected", "license", "session")
SETTINGS = {"batch1": (1, 1), "batch8": (8, 8)}  # name: (TorchServe batchSize, concurrent clients)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_serving_arguments(parser)
    parser.add_argument("--images", type=int, default=64, help="distinct test images the clients cycle through")
    parser.add_argument("--out", type=Path, help="default benchmarks/results/protect.json (protect-quick.json)")
    args = parser.parse_args()
    apply_quick(args)
    out = args.out or Path(f"benchmarks/results/protect{'-quick' if args.quick else ''}.json")
    host = host_description()  # the load average before the run

    with tempfile.TemporaryDirectory(prefix="bench-protect-") as tmp:
        root, store = Path(tmp), Path(tmp) / "store"
        images, credentials = build_archives(root, store, args.images)
        bodies = [png(x) for x in images]
        results: dict[str, dict] = {}
        for setting, (batch_size, clients) in SETTINGS.items():
            delay = args.max_batch_delay
            models = {"fashion": "fashion.mar", "guarded": "guarded.mar"}
            with ManagedTorchServe(store, models, batch_size=batch_size, max_batch_delay_ms=delay) as ts:
                with HTTPClients(ts.ports.inference) as http:
                    calls = {mode: request_fn(http, mode, bodies, credentials) for mode in MODES}
                    runs = [
                        measure_interleaved(
                            calls, clients=clients, requests=args.requests, block=8 * clients, warmup=args.warmup
                        )
                        for _ in range(args.runs)
                    ]
            results[setting] = {
                "torchserve": {"batchSize": batch_size, "maxBatchDelay_ms": delay, "workers_per_model": 1},
                "clients": clients,
                "runs": runs,
            }

    ratios = {
        setting: {mode: median_ratio(results[setting]["runs"], mode, GOALS[mode]) for mode in GOALS}
        for setting in SETTINGS
    }
    result = {
        "benchmark": "protect: owner's TorchServe archive vs its protected copy, Fashion-MNIST ResNet (TorchScript) "
        "with the owner's PNG handler, one 28x28 PNG per HTTP request, kept-alive connections on loopback",
        "quick": args.quick,
        "definitions": {
            "unprotected": "the owner's archive, no credentials",
            "license": "protected archive, X-ActiveGuard-License header on every request (signature once per "
            "worker, expiry and revocation per request, fingerprint with the license's first request)",
            "session": "protected archive, Authorization: Bearer <gateway session token> on every request",
            "batch1": "TorchServe batchSize 1; one client, requests one after another (each is a batch of 1)",
            "batch8": "TorchServe batchSize 8 and the maxBatchDelay given; 8 concurrent closed-loop clients, each "
            "with its own connection, one image per request, so batches hold up to 8 requests",
            "throughput_rps": "requests answered per second of wall time over that mode's blocks",
            "p50_ratio": "median over the runs of protected p50 / unprotected p50 in the same setting and run",
        },
        "runs": args.runs,
        "requests_per_cell": args.requests,
        "warmup_per_cell": args.warmup,
        "distinct_images": len(bodies),
        "interleaving": "blocks of 8 x clients requests per mode, mode order shuffled per round",
        "goals_p50_ratio": GOALS,
        "results": results,
        "ratios": ratios,
        "all_goals_met": all(r["met"] for per_setting in ratios.values() for r in per_setting.values()),
        "host": host | {"load_average_after": host_description()["load_average_1_5_15"]},
    }
    write_result(result, out)


def build_archives(root: Path, store: Path, n_images: int) -> tuple[torch.Tensor, dict[str, dict[str, str]]]:
    """The owner's archive and its protected copy in ``store``; (test images, credential headers per mode)."""
    owner = fashion_deployment(root, n_images)
    licensing, model_id = owner["licensing"], owner["licensing"].model_id
    store.mkdir(parents=True, exist_ok=True)
    owner_mar = Path(shutil.copyfile(owner["mar"], store / "fashion.mar"))

    gateway_key = Ed25519PrivateKey.generate()
    gateway_pub = root / "gateway.pub.pem"
    gateway_pub.write_bytes(licenses.public_key_pem(gateway_key.public_key()))
    flags = ["--out-dir", str(store), "--name", "guarded", "--policy", "reject", "--input-shape", "1,28,28"]
    flags += ["--license-key", str(licensing.write_public_key(root / "license.pub.pem"))]
    flags += ["--gateway-key", str(gateway_pub)]
    if activeguard_main(["protect", str(owner_mar), *flags]) != 0:
        raise RuntimeError("activeguard protect failed")

    token, _ = sessions.issue_session(
        gateway_key,
        user="bench",
        user_index=licensing.users[0],
        license_id="bench",
        model_id=model_id,
        ttl_seconds=24 * 3600,
    )
    credentials = {
        "unprotected": {},
        "license": {"X-ActiveGuard-License": encode_license_header(licensing.license(0, "bench").to_text())},
        "session": {"Authorization": f"Bearer {token}"},
    }
    return owner["images"], credentials


def request_fn(
    http: HTTPClients, mode: str, bodies: list[bytes], credentials: dict[str, dict[str, str]]
) -> Callable[[int], float]:
    """Request ``i`` of ``mode``: image ``i`` (cycling), that mode's model and credentials; its latency in ms.

    The answer must be the owner's (a label and a confidence), not only a 200; a session's answer is
    the gateway's envelope (ActiveGuard's decision beside the owner's answer, base64), checked inside.
    """
    path = "/predictions/fashion" if mode == "unprotected" else "/predictions/guarded"
    headers = {"Content-Type": "image/png", **credentials[mode]}

    def call(i: int) -> float:
        ms, answer = http.post(path, bodies[i % len(bodies)], headers)
        if mode == "session":
            envelope = json.loads(answer)
            if not envelope.get("activeguard", {}).get("authorized"):
                raise RuntimeError(f"session not authorized: {answer[:300]!r}")
            answer = base64.b64decode(envelope["payload_b64"])
        if b'"label"' not in answer:
            raise RuntimeError(f"{mode}: not the owner's answer: {answer[:300]!r}")
        return ms

    return call


def median_ratio(runs: list[dict[str, dict]], mode: str, goal: float) -> dict:
    """Protected/unprotected per run (p50, p99, throughput) and their medians; the goal is on the p50 median."""
    per_run = {
        key: [run[mode][key] / run["unprotected"][key] for run in runs]
        for key in ("p50_ms", "p99_ms", "throughput_rps")
    }
    medians = {key: statistics.median(values) for key, values in per_run.items()}
    return {
        "p50_ratio": medians["p50_ms"],
        "p99_ratio": medians["p99_ms"],
        "throughput_ratio": medians["throughput_rps"],
        "p50_ratio_per_run": per_run["p50_ms"],
        "goal": goal,
        "met": medians["p50_ms"] <= goal,
    }


if __name__ == "__main__":
    main()
