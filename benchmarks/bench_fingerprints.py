"""Batched fingerprint generation vs a one-user-at-a-time loop of the same algorithm.

Both paths run in this one process on the same model and the same seed images, so the ratio is
measured side by side. Usage:

    .venv/bin/python -m benchmarks.bench_fingerprints [--per-user 1] [--repeats 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from activeguard.credentials.control import ControlConfig
from activeguard.credentials.fingerprints import generate_fingerprints
from activeguard.experiments.core_evaluation import seed_images
from activeguard.models.architectures import train_lenet5
from activeguard.models.data import load_mnist
from benchmarks.common import timed, write_result


def model_step_ms(model: torch.nn.Module, batch: int, repeats: int = 100) -> float:
    """One forward+backward of the model w.r.t. its input: the floor under any generation step."""
    x = torch.rand(batch, 1, 28, 28, requires_grad=True)
    start = time.perf_counter()
    for _ in range(repeats):
        (grad,) = torch.autograd.grad(torch.log_softmax(model(x), 1).sum(), x)
    return (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-user", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fingerprints.json"))
    args = parser.parse_args()

    torch.set_num_threads(2)
    split = load_mnist(seed=0)
    model = train_lenet5(split, epochs=15, seed=0)
    config = ControlConfig()
    users = list(range(config.num_users))
    seeds = seed_images(split.x_test, len(users) * args.per_user, seed=1)

    def batched():
        return generate_fingerprints(model, config, users, seeds, per_user=args.per_user)

    def one_at_a_time():
        return [
            generate_fingerprints(
                model, config, [u], seeds[i * args.per_user : (i + 1) * args.per_user], per_user=args.per_user
            )
            for i, u in enumerate(users)
        ]

    batched_s, loop_s = [], []
    for _ in range(args.repeats):  # interleaved so drift in machine load hits both paths alike
        t, fps = timed(batched)
        batched_s.append(t)
        t, singles = timed(one_at_a_time)
        loop_s.append(t)
    step_1, step_30 = model_step_ms(model, 1), model_step_ms(model, len(users))
    result = {
        "benchmark": "fingerprint generation, 30 users (K=10, C_fp={0.2,0.3,0.4}, eps=0.01), LeNet-5 MNIST",
        "fingerprints": len(users) * args.per_user,
        "repeats": args.repeats,
        "batched_seconds_median": statistics.median(batched_s),
        "loop_seconds_median": statistics.median(loop_s),
        "speedup": statistics.median(loop_s) / statistics.median(batched_s),
        "batched_success": float(fps.success.float().mean()),
        "loop_success": float(torch.cat([s.success for s in singles]).float().mean()),
        # On a CPU the model's cost grows almost linearly with the batch, which caps what batching
        # can save; this is that cap, measured on the same model in the same run.
        "model_step_ms_batch1": step_1,
        "model_step_ms_batch30": step_30,
        "compute_bound_speedup": 30 * step_1 / step_30,
    }
    write_result(result, args.out)


if __name__ == "__main__":
    main()
