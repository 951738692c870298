"""``activeguard audit``: ownership audits of suspect models.

    activeguard audit fingerprint METHOD --model owner.pt --out owner.agfp [--points N]
    activeguard audit METHOD --fingerprint owner.agfp --suspect PATH_OR_URL [--threshold T]
    activeguard audit watermark --model suspect.pt --key owner.agkey

A suspect is a local checkpoint or a TorchServe-style endpoint
(``http://host:8080/predictions/<name>``, see :mod:`activeguard.audit.remote`). Exit codes, as
the rest of the CLI: 0 the suspect is judged a copy of the owner's model (ownership verified),
1 it is not, 2 a usage or input error (missing or empty file, unreachable or garbled endpoint,
a suspect with another input shape or output size).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from activeguard.audit import base
from activeguard.cli import cmd_watermark_verify
from activeguard.cli_support import (
    EXIT_NEGATIVE,
    EXIT_OK,
    UsageError,
    add_common,
    add_evaluation_suite,
    add_passphrase,
    emit,
    progress_enabled,
    stage,
)

DATASETS = ["mnist", "fashion-mnist", "digits8x8"]


# --- activeguard audit fingerprint METHOD --------------------------------------------------------


def _owner(args: argparse.Namespace) -> base.Owner:
    from activeguard.models import arch_name, input_shape, load_model

    model = load_model(args.model)
    num_classes = model.config.get("num_classes")
    task = {"fc-generator": "generation", "mlp-regressor": "regression"}.get(arch_name(model), "classification")
    if num_classes is None and task == "classification":
        raise UsageError(f"{args.model}: cannot tell the number of classes of this model")
    return base.Owner(model, tuple(input_shape(model)), num_classes, task)


def _training_data(args: argparse.Namespace, owner: base.Owner):
    from activeguard.data import load_dataset

    shape, num_classes = owner.input_shape, owner.num_classes
    if num_classes is None:
        data_free = [name for name, m in base.methods().items() if not m.needs_data]
        raise UsageError(
            f"{args.model} is not a classifier: {args.kind} fingerprints need one "
            f"(use 'activeguard audit fingerprint {'|'.join(data_free)}' for regressors and generators)"
        )
    split = load_dataset(args.dataset, seed=args.seed)
    if tuple(split.input_shape) != shape or split.num_classes != num_classes:
        raise UsageError(
            f"--dataset {args.dataset} has inputs {tuple(split.input_shape)} and "
            f"{split.num_classes} classes, but {args.model} takes {shape} and has {num_classes}"
        )
    return split


def _params(method: base.AuditMethod, args: argparse.Namespace) -> base.Params:
    try:
        return method.params_type(**{f.name: getattr(args, f.name) for f in dataclasses.fields(method.params_type)})
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def cmd_fingerprint(args: argparse.Namespace) -> int:
    from activeguard.audit import files
    from activeguard.models import model_id

    method = base.get(args.kind)
    params = _params(method, args)
    owner = _owner(args)
    meta: dict[str, Any] = {
        "owner_model": str(args.model),
        "owner_model_id": model_id(owner.model),
        "input_shape": list(owner.input_shape),
        "num_classes": owner.num_classes,
        "task": owner.task,
        "seed": args.seed,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    data = _training_data(args, owner) if method.needs_data else None
    start = time.perf_counter()
    fp = method.generate(owner, params, data, seed=args.seed, stage=lambda msg: stage(args, msg))
    seconds = time.perf_counter() - start
    if method.needs_data:
        meta["dataset"] = args.dataset
    meta.update(method.describe(fp, params))
    try:
        files.save(fp, args.out, meta)
    except OSError as exc:
        raise UsageError(f"cannot write {args.out}: {exc.strerror or exc}") from exc
    payload = {
        "fingerprint": str(args.out),
        "kind": args.kind,
        "points": len(fp.points),
        "seconds": seconds,
        **{k: v for k, v in meta.items() if k not in ("created",)},
    }
    note = method.note(fp)
    emit(
        args,
        payload,
        lambda: (
            f"wrote {args.kind} fingerprint {args.out}: {len(fp.points)} points in {seconds:.1f} s\n"
            f"  owner model id {meta['owner_model_id']}" + (f"\n  {note}" if note else "")
        ),
    )
    return EXIT_OK


# --- activeguard audit METHOD --------------------------------------------------------------------


def cmd_verify(args: argparse.Namespace) -> int:
    from activeguard.audit import files
    from activeguard.audit.remote import open_suspect

    method = base.get(args.audit_command)
    threshold = method.threshold if args.threshold is None else args.threshold
    if not 0.0 <= threshold <= 1.0:
        raise UsageError(f"--threshold must be in [0, 1], got {threshold}")
    if args.batch_size < 1 or args.timeout <= 0:
        raise UsageError("--batch-size must be at least 1 and --timeout positive")
    loaded = files.load(args.fingerprint, kind=method.name)
    start = time.perf_counter()
    with open_suspect(args.suspect, timeout_s=args.timeout, batch_size=args.batch_size) as suspect:
        score = method.score(
            loaded.fingerprint, suspect, num_classes=loaded.meta.get("num_classes"), **method.score_options(args)
        )
    verified = score.value >= threshold
    payload = {
        "method": method.name,
        "fingerprint": str(args.fingerprint),
        "suspect": str(args.suspect),
        "owner_model_id": loaded.meta.get("owner_model_id"),
        "verified": verified,
        "verdict": "copy of the owner's model" if verified else "not shown to be a copy",
        "score": score.value,
        "score_name": method.score_name,
        "threshold": threshold,
        **score.evidence,
        "seconds": time.perf_counter() - start,
    }

    def human() -> str:
        head = "OWNERSHIP VERIFIED" if verified else "not verified"
        cmp = ">=" if verified else "<"
        return (
            f"{head}: {method.title} {method.score_name} {score.value:.3f} {cmp} threshold {threshold:.2f}"
            f" ({method.explain(score)})\n  suspect {args.suspect}"
        )

    emit(args, payload, human)
    return EXIT_OK if verified else EXIT_NEGATIVE


# --- activeguard evaluate audit ------------------------------------------------------------------


def cmd_evaluate(args: argparse.Namespace) -> int:
    from activeguard.audit.evaluate import run_audit_evaluation

    result = run_audit_evaluation(args.out, quick=args.quick, seed=args.seed, progress=progress_enabled(args))
    if args.json:
        print(json.dumps(result, indent=2, default=float))
    else:
        print(Path(args.out, "audit.md").read_text())
    return EXIT_OK


# --- parser --------------------------------------------------------------------------------------


def _add_params(p: argparse.ArgumentParser, params_type: type[base.Params]) -> None:
    """One flag per parameter field: its default, type, choices and help come from the dataclass."""
    for f in dataclasses.fields(params_type):
        extra = {k: v for k, v in f.metadata.items() if k != "help"}
        p.add_argument(
            f"--{f.name.replace('_', '-')}",
            type=type(f.default),
            default=f.default,
            help=f.metadata["help"].format(default=f.default),
            **extra,
        )


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``activeguard audit …`` and the ``audit`` evaluation suite (entry point ``activeguard.commands``)."""
    add_evaluation_suite("audit", "IPGuard/CEM/TAFA tables", cmd_evaluate)
    methods = base.methods()
    audit = sub.add_parser(
        "audit",
        help="audit a suspect model for ownership: black-box fingerprints or the watermark",
        description="Judge whether a suspect model is a copy of yours. Black-box methods need only the "
        "suspect's outputs, from a local checkpoint or an HTTP endpoint "
        '(POST http://host:port/predictions/<name> with {"inputs": [...]}): first make a '
        "fingerprint of your model, then audit suspects against it.",
        epilog="Exit codes: 0 ownership verified (the suspect is judged a copy), 1 not verified, "
        "2 usage or input error.",
    )
    audit_sub = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")

    fp_parser = audit_sub.add_parser(
        "fingerprint",
        help="make a fingerprint of your model to audit suspects with",
        description="Make a black-box fingerprint of the owner's model and save it "
        "(one file, loaded without unpickling code).",
    )
    fp_sub = fp_parser.add_subparsers(dest="kind", required=True, metavar="KIND")
    for name, method in methods.items():
        p = fp_sub.add_parser(name, help=method.help, description=method.help + ".")
        p.add_argument("--model", required=True, type=Path, help="the owner's checkpoint")
        p.add_argument("--out", required=True, type=Path, help="fingerprint file to write (e.g. owner.agfp)")
        if method.needs_data:
            p.add_argument(
                "--dataset",
                default=DATASETS[0],
                choices=DATASETS,
                help=f"the owner's training data (default {DATASETS[0]})",
            )
        _add_params(p, method.params_type)
        add_common(p)
        p.set_defaults(func=cmd_fingerprint)

    for name, method in methods.items():
        p = audit_sub.add_parser(
            name,
            help=f"audit a suspect with your {method.title} fingerprint",
            description=f"Query the suspect at the fingerprint's points and compare with the owner's model: "
            f"the {method.score_name} is the score, and the suspect is judged a copy when the score "
            f"is at least the threshold.",
            epilog="Exit codes: 0 ownership verified, 1 not verified, 2 usage or input error.",
        )
        p.add_argument(
            "--fingerprint", required=True, type=Path, help=f"file written by 'activeguard audit fingerprint {name}'"
        )
        p.add_argument(
            "--suspect",
            required=True,
            metavar="PATH_OR_URL",
            help="a checkpoint, or an endpoint such as http://127.0.0.1:8080/predictions/mnist",
        )
        p.add_argument(
            "--threshold",
            type=float,
            default=None,
            help=f"decision threshold on the score, in [0, 1] (default {method.threshold:g}, "
            "measured by 'activeguard evaluate audit')",
        )
        method.add_score_arguments(p)
        p.add_argument("--timeout", type=float, default=30.0, help="seconds per HTTP request (default 30)")
        p.add_argument("--batch-size", type=int, default=64, help="rows per HTTP request (default 64)")
        add_common(p, seed=False)
        p.set_defaults(func=cmd_verify)

    p = audit_sub.add_parser(
        "watermark",
        help="white-box: extract your digit watermark (same as 'watermark verify')",
        description="Extract the digit watermark from a suspect's weights with your key "
        "(the same check as 'activeguard watermark verify').",
        epilog="Exit codes: 0 ownership verified, 1 not verified, 2 usage or input error.",
    )
    p.add_argument("--model", required=True, type=Path, help="the suspect's checkpoint")
    p.add_argument("--key", required=True, type=Path, help="the encrypted watermark key (.agkey)")
    add_passphrase(p)
    add_common(p, seed=False)
    p.set_defaults(func=cmd_watermark_verify)  # the core's check, reached from here
