"""Shared helpers for the benchmarks."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any


def add_serving_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every TorchServe-vs-TorchServe benchmark takes; ``apply_quick`` after parsing."""
    parser.add_argument("--requests", type=int, default=600, help="measured requests per mode and setting")
    parser.add_argument("--warmup", type=int, default=64, help="unmeasured requests per mode and setting first")
    parser.add_argument(
        "--max-batch-delay", type=int, default=5, help="TorchServe maxBatchDelay, ms (only batch8 waits on it)"
    )
    parser.add_argument(
        "--runs", type=int, default=3, help="measurements per setting on the same servers; ratios are their median"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: one run of 64 requests, 16 warm-up per cell")


def apply_quick(args: argparse.Namespace) -> None:
    if args.quick:
        args.requests, args.warmup, args.runs = 64, 16, 1


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile, q in [0, 1]."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(wall seconds, result) of one call."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def write_result(result: dict[str, Any], out: Path) -> None:
    """Add the torch version, thread count and machine to ``result``, write it to ``out`` as JSON and print it."""
    import torch

    result.update(torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.machine())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def latency_summary(latencies_ms: list[float], wall_s: float) -> dict[str, float]:
    """The usual cell of a latency benchmark: request count, median and p99 (ms), requests per second of wall time."""
    return {
        "requests": len(latencies_ms),
        "p50_ms": statistics.median(latencies_ms),
        "p99_ms": percentile(latencies_ms, 0.99),
        "throughput_rps": len(latencies_ms) / wall_s,
    }


def host_description() -> dict[str, Any]:
    """What ran the benchmark, beyond ``write_result``'s fields: CPU model, logical CPUs, OS, load average."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "system": platform.platform(),
        "python": platform.python_version(),
        "load_average_1_5_15": [round(x, 2) for x in load] if load else None,
    }


class HTTPClients:
    """Kept-alive HTTP/1.1 connections to one server on loopback, one per calling thread.

    ``post`` times one request (send to the end of the answer's body) and raises unless the answer
    has the expected status, so a benchmark never averages errors into its figures.
    """

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 60.0):
        self.host, self.port, self.timeout = host, port, timeout
        self._local = threading.local()
        self._all: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            with self._lock:
                self._all.append(conn)
        return conn

    def post(self, path: str, body: bytes, headers: dict[str, str], expect: int = 200) -> tuple[float, bytes]:
        """(milliseconds, answer body) of one POST on this thread's connection."""
        conn = self._conn()
        start = time.perf_counter()
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        answer = response.read()
        ms = (time.perf_counter() - start) * 1000
        if response.status != expect:
            raise RuntimeError(f"POST {path}: HTTP {response.status} (expected {expect}): {answer[:300]!r}")
        return ms, answer

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()

    def __enter__(self) -> HTTPClients:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def measure_interleaved(
    calls: dict[str, Callable[[int], float]],
    *,
    clients: int,
    requests: int,
    block: int,
    warmup: int = 0,
    seed: int = 0,
    cpu_seconds: Callable[[], float] | None = None,
    more_cpu: dict[str, Callable[[], float]] | None = None,
) -> dict[str, dict[str, float]]:
    """Closed-loop load on several alternatives, interleaved so drift in machine load hits each alike.

    ``calls[name](i)`` makes request number ``i`` and returns its latency in ms. ``clients`` threads
    (1: the calling thread alone, no pool) each send their next request as soon as their last one
    is answered. Each round visits every alternative once, in an order shuffled per round, for a
    block of ``block`` requests; rounds repeat until each alternative has ``requests`` (rounded up
    to whole blocks). ``warmup`` unmeasured requests per alternative come first. Throughput is
    requests over the summed wall time of that alternative's blocks. Returns name → ``latency_summary``;
    with ``cpu_seconds`` (a cumulative CPU clock, e.g. :func:`process_cpu_seconds` of a server), also
    ``cpu_ms_per_request``: that clock's advance during the alternative's blocks, per request; and for
    each ``more_cpu`` clock, ``<name>_cpu_ms_per_request`` alike.
    """
    names = list(calls)
    order = random.Random(seed)
    latencies: dict[str, list[float]] = {n: [] for n in names}
    wall = dict.fromkeys(names, 0.0)
    clocks = {"": cpu_seconds or (lambda: 0.0), **{f"{k}_": v for k, v in (more_cpu or {}).items()}}
    cpu = {key: dict.fromkeys(names, 0.0) for key in clocks}
    with ThreadPoolExecutor(clients) if clients > 1 else _Inline() as pool:
        for name in names:
            list(pool.map(calls[name], range(warmup)))
        for round_ in range(-(-requests // block)):
            order.shuffle(names)  # no alternative always follows another
            for name in names:
                cpu_start, start = {k: c() for k, c in clocks.items()}, time.perf_counter()
                latencies[name] += pool.map(calls[name], range(round_ * block, (round_ + 1) * block))
                wall[name] += time.perf_counter() - start
                for key, c in clocks.items():
                    cpu[key][name] += c() - cpu_start[key]
    summaries = {name: latency_summary(latencies[name], wall[name]) for name in calls}
    for key in clocks:
        if key or cpu_seconds is not None:
            for name, summary in summaries.items():
                summary[f"{key}cpu_ms_per_request"] = 1000 * cpu[key][name] / len(latencies[name])
    return summaries


def process_cpu_seconds(pid: int) -> Callable[[], float]:
    """A clock of the user + system CPU time of process ``pid`` (all its threads), from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")

    def read() -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (fields 14, 15 of stat)

    return read


def process_group_cpu_seconds(pgid: int) -> Callable[[], float]:
    """A clock of the user + system CPU time of every live process in process group ``pgid`` (a
    TorchServe started as its own group: the frontend and its workers), from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")

    def read() -> float:
        total = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:  # gone meanwhile
                continue
            if int(fields[2]) == pgid:
                total += int(fields[11]) + int(fields[12])
        return total / ticks

    return read


class _Inline:
    """``ThreadPoolExecutor``'s ``map`` on the calling thread (a single client, no hand-off between threads)."""

    def map(self, fn: Callable[[int], Any], items: range) -> list[Any]:
        return [fn(i) for i in items]

    def __enter__(self) -> _Inline:
        return self

    def __exit__(self, *exc) -> None:
        pass
