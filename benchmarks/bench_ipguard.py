"""IPGuard: n fingerprint points in one batched optimization vs a per-point loop of the same algorithm.

Both paths run in this one process on the same LeNet-5, the same training-example starts and the
same k, interleaved so drift in machine load hits both alike. Usage:

    .venv/bin/python -m benchmarks.bench_ipguard [--points 100] [--repeats 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from activeguard.audit import ipguard
from activeguard.models.architectures import train_lenet5
from activeguard.models.data import load_mnist
from benchmarks.common import timed, write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=100)
    parser.add_argument("--method", default="TL", choices=sorted(ipguard.METHODS))
    parser.add_argument("--k", type=float, default=ipguard.DEFAULT_K)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ipguard.json"))
    args = parser.parse_args()

    torch.set_num_threads(2)
    split = load_mnist(seed=0)
    model = train_lenet5(split, epochs=15, seed=0)
    kwargs = dict(k=args.k, method=args.method, x_train=split.x_train, seed=0)

    batched_s, loop_s = [], []
    for _ in range(args.repeats):
        t, batched = timed(lambda: ipguard.generate(model, args.points, **kwargs))
        batched_s.append(t)
        t, looped = timed(lambda: ipguard.generate_loop(model, args.points, **kwargs))
        loop_s.append(t)
    result = {
        "benchmark": f"IPGuard-{args.method} fingerprint extraction, {args.points} points, k={args.k:g}, LeNet-5 MNIST",
        "repeats": args.repeats,
        "batched_seconds_median": statistics.median(batched_s),
        "loop_seconds_median": statistics.median(loop_s),
        "speedup": statistics.median(loop_s) / statistics.median(batched_s),
        # the two paths must find equally good points: every point reaches margin k on the owner
        "batched_min_margin": float(ipguard.margins(model, batched.points).min()),
        "loop_min_margin": float(ipguard.margins(model, looped.points).min()),
        "batched_mean_iterations": float(batched.iterations.float().mean()),
        "loop_mean_iterations": float(looped.iterations.float().mean()),
    }
    write_result(result, args.out)


if __name__ == "__main__":
    main()
