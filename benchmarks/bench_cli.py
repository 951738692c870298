"""How long the ``activeguard`` command line takes to answer, each command in a fresh process.

Commands that should answer at once (help texts, the offline license header) must not pay for torch,
grpc, scikit-learn or matplotlib. Each row is the median wall-clock time of ``--runs`` fresh
processes (``python -m activeguard.cli.app ...`` with this checkout first on ``PYTHONPATH``), run in
turn so that drift in the machine's load hits every row alike; ``import torch`` alone is the
yardstick. ``--baseline DIR`` measures the same commands from another checkout (e.g. one made with
``git archive``) in the same rounds, for a before/after comparison.

    .venv/bin/python -m benchmarks.bench_cli [--runs 7] [--baseline DIR] [--out benchmarks/results/cli.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import host_description, write_result

ROOT = Path(__file__).resolve().parent.parent


def make_license(directory: Path) -> Path:
    """A throwaway signed license (random key, noise fingerprint) for ``license header``."""
    import torch
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from activeguard.credentials import licenses
    from activeguard.credentials.control import ControlConfig

    key, config = Ed25519PrivateKey.generate(), ControlConfig()
    payload = licenses.make_payload(
        model_id="0" * 64,
        user="bench",
        user_index=0,
        fo=config.fo_of_user(0),
        epsilon=config.epsilon,
        fingerprint=torch.rand(1, 1, 28, 28),
        key=key,
        validity_seconds=3600,
    )
    return licenses.write_license(licenses.sign_license(payload, key), directory / "bench.aglicense")


def commands(license_file: Path) -> dict[str, list[str]]:
    cli = [sys.executable, "-m", "activeguard.cli.app"]
    return {
        "activeguard --help": [*cli, "--help"],
        "activeguard audit fingerprint ipguard --help": [*cli, "audit", "fingerprint", "ipguard", "--help"],
        "activeguard license header FILE": [*cli, "license", "header", str(license_file)],
        "activeguard serve --help": [*cli, "serve", "--help"],
        "import torch": [sys.executable, "-c", "import torch"],
    }


def run_once(argv: list[str], code: Path = ROOT) -> float:
    """Wall seconds of one fresh process running ``argv`` with the checkout ``code`` first on the path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(code), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, env=env, cwd=code)  # -m puts the cwd first on the path
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.decode()[-500:]}")
    return seconds


def summary(times: list[float]) -> dict[str, float]:
    return {
        "median_s": round(statistics.median(times), 3),
        "min_s": round(min(times), 3),
        "max_s": round(max(times), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="fresh processes per command (default 7)")
    parser.add_argument("--baseline", type=Path, help="another checkout to measure the same commands from")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cli.json"))
    args = parser.parse_args()
    checkouts = {"this": ROOT} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    with tempfile.TemporaryDirectory() as tmp:
        argvs = commands(make_license(Path(tmp)))
        cells = [(c, name) for c in checkouts for name in argvs if c == "this" or name != "import torch"]
        for checkout, name in cells:  # warm the file cache: the first run of anything reads from disk
            run_once(argvs[name], checkouts[checkout])
        times: dict[tuple[str, str], list[float]] = {cell: [] for cell in cells}
        for _ in range(args.runs):
            for checkout, name in cells:
                times[checkout, name].append(run_once(argvs[name], checkouts[checkout]))
    result = {"runs": args.runs, "commands": {name: summary(times["this", name]) for name in argvs}}
    if args.baseline:
        result["baseline"] = {
            "checkout": str(args.baseline),
            "commands": {name: summary(times["baseline", name]) for name in argvs if name != "import torch"},
        }
    write_result({**result, "host": host_description()}, args.out)


if __name__ == "__main__":
    main()
