"""What every ``activeguard`` command group shares: exit codes, errors, output, common flags.

The core CLI (:mod:`activeguard.cli`) and each plugin command group (``activeguard.commands``
entry points: audit, serving, gateway, license server, demo) import this module, never each
other, so there is no import cycle and the core never imports a plugin.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_NEGATIVE, EXIT_USAGE = 0, 1, 2
PASSPHRASE_ENV = "ACTIVEGUARD_WM_PASSPHRASE"


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


def emit(args: argparse.Namespace, payload: dict[str, Any], human: Callable[[], str]) -> None:
    """JSON for automation (``--json``), else the human text (built only when needed)."""
    print(json.dumps(payload, indent=2) if args.json else human())


def progress_enabled(args: argparse.Namespace) -> bool:
    """Progress bars only for a person watching a terminal, never in JSON or piped output."""
    return not args.json and sys.stderr.isatty()


def stage(args: argparse.Namespace, message: str) -> None:
    """A progress line for a person at a terminal (never in JSON or piped output)."""
    if progress_enabled(args):
        print(message, file=sys.stderr, flush=True)


def parse_users(text: str, total: int) -> list[int]:
    """'all', '3', '0-9' or '1,4,7-9' → user indices."""
    if text == "all":
        return list(range(total))
    users: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            users.extend(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise UsageError(f"--users {text!r}: use 'all', a number, a range like 0-9, or a comma list") from None
    return users


def parse_floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"{text!r} is not a comma-separated list of numbers") from None


def parse_digits(text: str) -> list[int]:
    if not text.isdigit():
        raise UsageError(f"--digits {text!r}: give the watermark as a string of digits 0-9, e.g. 1234567890210")
    return [int(ch) for ch in text]


def read_passphrase(args: argparse.Namespace, confirm: bool = False) -> str:
    """From --passphrase-file, the environment, or a prompt; never from the command line (ps shows it)."""
    if args.passphrase_file:
        return Path(args.passphrase_file).read_text().rstrip("\n")
    if os.environ.get(args.passphrase_env):
        return os.environ[args.passphrase_env]
    if sys.stdin.isatty():
        first = getpass.getpass("watermark key passphrase: ")
        if confirm and getpass.getpass("repeat passphrase: ") != first:
            raise UsageError("the passphrases differ")
        return first
    raise UsageError(f"no passphrase: set ${args.passphrase_env} or pass --passphrase-file")


def add_common(
    p: argparse.ArgumentParser,
    seed: bool = True,
    seed_help: str = "random seed for data split and optimization (default 0)",
) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of text")
    if seed:
        p.add_argument("--seed", type=int, default=0, help=seed_help)


def add_passphrase(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--passphrase-env",
        default=PASSPHRASE_ENV,
        metavar="VAR",
        help=f"environment variable holding the key passphrase (default {PASSPHRASE_ENV})",
    )
    p.add_argument("--passphrase-file", metavar="PATH", help="read the key passphrase from this file instead")


@dataclass(frozen=True)
class EvaluationSuite:
    """One ``activeguard evaluate SUITE``: ``run(args)`` returns the exit code."""

    help: str
    run: Callable[[argparse.Namespace], int]


# ``activeguard evaluate`` offers whatever is registered here: the core adds "core", the audit
# plugin adds "audit", so the core's parser never imports the audits.
EVALUATION_SUITES: dict[str, EvaluationSuite] = {}


def add_evaluation_suite(name: str, help: str, run: Callable[[argparse.Namespace], int]) -> None:
    EVALUATION_SUITES[name] = EvaluationSuite(help, run)
