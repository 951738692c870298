"""What the answer watermark and the extraction monitor cost a licensed client (issue 33, item 6).

The reference LeNet-5 (MNIST, trained here: 5 epochs) is packaged three times with ActiveGuard's
tensor handler and served by ONE TorchServe (one worker per model, the same settings):

* ``off``: licensed, no answer watermark, no monitor (the baseline);
* ``watermark``: the answer watermark on (band ln 3, its journal fsync'd per batch that holds a record);
* ``watermark+monitor``: the watermark and the extraction monitor (policy ``alert``: every row is
  sketched and tested, nothing refused), with usage entries in the journal.

Every request is one natural MNIST test digit (JSON) with the same license header, over kept-alive
HTTP on loopback; the digits cycle through the 1,000 test digits, so the monitor's state grows to
its bounds as in service. Two settings, as in bench_protect: ``batch1`` (batchSize 1, one client)
and ``batch8`` (batchSize 8, 8 closed-loop clients). Modes are interleaved in blocks, in an order
shuffled per round. Reported: p50, p99 and throughput per mode, and on/off ratios (median over
``--runs``), against the goal p50 <= 1.05x. Usage:

    .venv/bin/python -m benchmarks.bench_extraction_costs [--requests 600] [--runs 3] [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from activeguard.models.architectures import train_lenet5
from activeguard.models.data import load_mnist
from activeguard.runtime.private_files import write_private
from activeguard.watermark.answers import KEY_FORMAT
from benchmarks.common import (
    HTTPClients,
    add_serving_arguments,
    apply_quick,
    host_description,
    measure_interleaved,
    write_result,
)
from handlers.server import ManagedTorchServe
from tests.serving_fixtures import build, header_value, json_body

GOAL = 1.05  # p50 with the watermark and monitor on / off
MODES = ("off", "watermark", "watermark+monitor")
SETTINGS = {"batch1": (1, 1), "batch8": (8, 8)}  # name: (TorchServe batchSize, concurrent clients)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_serving_arguments(parser)
    parser.add_argument(
        "--no-serving", action="store_true", help="only the in-process measurement (the guard without TorchServe)"
    )
    parser.add_argument("--out", type=Path, help="default benchmarks/results/extraction_costs.json (-quick)")
    args = parser.parse_args()
    apply_quick(args)
    out = args.out or Path(f"benchmarks/results/extraction_costs{'-quick' if args.quick else ''}.json")
    host = host_description()

    with tempfile.TemporaryDirectory(prefix="bench-extraction-") as tmp:
        root = Path(tmp)
        mnist = load_mnist(seed=0)
        torch.manual_seed(0)
        model = train_lenet5(mnist, epochs=5, seed=0)
        deployment = build(model, mnist.x_test, root, users=[4])
        key = root / "answer.agkey"
        write_private(key, json.dumps({"format": KEY_FORMAT, "secret": "5a" * 32}).encode())
        watermark = dict(answer_watermark_margin=math.log(3), answer_key_file=str(key))
        profiles = {
            "off": deployment.profile(),
            "watermark": deployment.profile(**watermark, answer_journal_dir=str(root / "journal-w")),
            "watermark+monitor": deployment.profile(
                **watermark, answer_journal_dir=str(root / "journal-wm"), extraction_monitor="alert"
            ),
        }
        from handlers.packaging import package

        names = {}
        for mode, profile in profiles.items():
            names[mode] = mode.replace("+", "-")
            package(deployment.model_path, profile, names[mode], deployment.store)
        bodies = [json_body(x[None]) for x in mnist.x_test]
        license_header = header_value(deployment.license(0))
        headers = {"Content-Type": "application/json", "X-ActiveGuard-License": license_header}
        in_process = measure_in_process(model, profiles, bodies, license_header, args)
        results: dict[str, dict] = {}
        for setting, (batch_size, clients) in SETTINGS.items() if not args.no_serving else ():
            models = {names[m]: f"{names[m]}.mar" for m in MODES}
            with ManagedTorchServe(
                deployment.store, models, batch_size=batch_size, max_batch_delay_ms=args.max_batch_delay
            ) as ts:
                with HTTPClients(ts.ports.inference) as http:
                    calls = {mode: request_fn(http, names[mode], bodies, headers) for mode in MODES}
                    runs = [
                        measure_interleaved(
                            calls, clients=clients, requests=args.requests, block=8 * clients, warmup=args.warmup
                        )
                        for _ in range(args.runs)
                    ]
            results[setting] = {
                "torchserve": {"batchSize": batch_size, "maxBatchDelay_ms": args.max_batch_delay},
                "clients": clients,
                "runs": runs,
            }
        records = {  # journal entries written by kind (TorchServe and in-process together)
            mode: _journal_lines(root / f"journal-{suffix}")
            for mode, suffix in (("watermark", "w"), ("watermark+monitor", "wm"))
        }

    ratios = {setting: {mode: ratio(results[setting]["runs"], mode) for mode in MODES[1:]} for setting in results}
    result = {
        "benchmark": "extraction costs: the reference MNIST LeNet-5 with ActiveGuard's tensor handler, licensed, "
        "answer watermark and extraction monitor off vs on; one digit per HTTP request, kept-alive, loopback",
        "quick": args.quick,
        "definitions": {
            "off": "licensed; no answer watermark, no extraction monitor",
            "watermark": "the answer watermark on (band ln 3), its journal",
            "watermark+monitor": "the answer watermark and the extraction monitor (policy alert) on, usage journalled",
            "p50_ratio": "median over the runs of the mode's p50 / off's p50 in the same setting and run",
        },
        "runs": args.runs,
        "requests_per_cell": args.requests,
        "warmup_per_cell": args.warmup,
        "goal_p50_ratio": GOAL,
        "results": results,
        "ratios": ratios,
        "goal_met": all(r["met"] for per_setting in ratios.values() for r in per_setting.values()),
        "journal_lines": records,
        "in_process": in_process,
        "host": host | {"load_average_after": host_description()["load_average_1_5_15"]},
    }
    write_result(result, out)


def measure_in_process(model, profiles: dict, bodies: list[bytes], license_header: str, args) -> dict:
    """The guard alone (no TorchServe, no HTTP): one single-row request per ``Guard.handle`` call, modes
    interleaved in blocks of 32, shuffled per round; p50 per request and the ratio to ``off``. One torch
    thread, so that the figure is the guard's work and not two threads contending for shared cores."""
    from activeguard.guard.guard import Guard
    from activeguard.guard.outcomes import Request

    torch.set_num_threads(1)
    guards = {mode: Guard(model, profile) for mode, profile in profiles.items()}

    def call_fn(mode: str) -> Callable[[int], float]:
        guard = guards[mode]

        def call(i: int) -> float:
            start = time.perf_counter()
            outcome = guard.handle([Request(bodies[i % len(bodies)], license=license_header)])[0]
            ms = (time.perf_counter() - start) * 1000
            if outcome.status != 200:
                raise RuntimeError(f"{mode}: {outcome.reason}")
            return ms

        return call

    requests = max(args.requests, 1000) if not args.quick else args.requests
    cells = measure_interleaved(
        {mode: call_fn(mode) for mode in MODES}, clients=1, requests=requests, block=32, warmup=args.warmup
    )
    return {
        "requests_per_mode": requests,
        "torch_threads": 1,
        "cells": cells,
        "p50_ratio": {mode: cells[mode]["p50_ms"] / cells["off"]["p50_ms"] for mode in MODES[1:]},
        "added_p50_ms": {mode: cells[mode]["p50_ms"] - cells["off"]["p50_ms"] for mode in MODES[1:]},
    }


def request_fn(http: HTTPClients, model: str, bodies: list[bytes], headers: dict[str, str]) -> Callable[[int], float]:
    """Request ``i``: test digit ``i`` (cycling) to ``model``; its latency in ms (an answer with outputs, or it raises)."""
    path = f"/predictions/{model}"

    def call(i: int) -> float:
        ms, answer = http.post(path, bodies[i % len(bodies)], headers)
        if b'"outputs"' not in answer:
            raise RuntimeError(f"{model}: not an answer: {answer[:300]!r}")
        return ms

    return call


def ratio(runs: list[dict[str, dict]], mode: str) -> dict:
    per_run = {
        key: [run[mode][key] / run["off"][key] for run in runs] for key in ("p50_ms", "p99_ms", "throughput_rps")
    }
    medians = {key: statistics.median(values) for key, values in per_run.items()}
    return {
        "p50_ratio": medians["p50_ms"],
        "p99_ratio": medians["p99_ms"],
        "throughput_ratio": medians["throughput_rps"],
        "p50_ratio_per_run": per_run["p50_ms"],
        "goal": GOAL,
        "met": medians["p50_ms"] <= GOAL,
    }


def _journal_lines(directory: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for path in directory.glob("*"):
        for line in path.read_bytes().splitlines():
            kind = json.loads(line).get("kind", "?")
            counts[kind] = counts.get(kind, 0) + 1
    return counts


if __name__ == "__main__":
    main()
