"""``activeguard audit``: ownership audits of suspect models.

    activeguard audit fingerprint METHOD --model MODEL [model flags] --out owner.agfp [--data D] [--points N]
    activeguard audit METHOD --fingerprint owner.agfp --suspect PATH_OR_URL [--threshold T]
    activeguard audit watermark --model suspect.pt --key owner.agkey

The owner's model is any source :mod:`activeguard.models.sources` loads (checkpoint, TorchScript,
exported program, state dict + ``--model-file``); the fingerprint file records its input spec.
A suspect is a local model file of any source (fed with its own spec, else the owner's) or a
TorchServe-style endpoint (``http://host:8080/predictions/<name>``, see
:mod:`activeguard.audit.remote`). Exit codes, as
the rest of the CLI: 0 the suspect is judged a copy of the owner's model (ownership verified),
1 it is not, 2 a usage or input error (missing or empty file, unreachable or garbled endpoint,
a suspect with another input shape or output size).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from activeguard.audit import base
from activeguard.cli.app import add_owner_argument, cmd_watermark_verify
from activeguard.cli.support import (
    EXIT_NEGATIVE,
    EXIT_OK,
    UsageError,
    add_common,
    add_data_argument,
    add_evaluation_suite,
    add_model_arguments,
    add_passphrase,
    emit,
    load_model_argument,
    model_data,
    progress_enabled,
    stage,
)
from activeguard.models.sources import TASKS

DEFAULT_DATA = "mnist"
MODEL_HELP_TAIL = "checkpoint, TorchScript, exported program .pt2, or a state dict with --model-file"


# --- activeguard audit fingerprint METHOD --------------------------------------------------------


def _training_data(args: argparse.Namespace, loaded: Any):
    """``--data`` for the owner's model: rows of its shape, labels within its classes, values in its range."""
    if loaded.num_classes is None:
        data_free = [name for name, m in base.methods().items() if not m.needs_data]
        raise UsageError(
            f"{args.model} is not a classifier ({loaded.task}): {args.kind} fingerprints need one "
            f"(use 'activeguard audit fingerprint {'|'.join(data_free)}' for regressors and generators)"
        )
    return model_data(args.data, loaded, args.seed)


def _params(method: base.AuditMethod, args: argparse.Namespace) -> base.Params:
    try:
        return method.params_type(**{f.name: getattr(args, f.name) for f in dataclasses.fields(method.params_type)})
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def cmd_fingerprint(args: argparse.Namespace) -> int:
    from activeguard.audit import files

    method = base.get(args.kind)
    params = _params(method, args)
    loaded = load_model_argument(args)
    owner = base.Owner.from_loaded(loaded)
    meta: dict[str, Any] = {
        "owner_model": str(args.model),
        "owner_model_id": loaded.model_id,
        "owner_source": loaded.record(),
        "input_spec": loaded.spec.to_dict(),
        "input_shape": list(owner.input_shape),
        "num_classes": owner.num_classes,
        "task": owner.task,
        "seed": args.seed,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    needs_data = method.requires_data(params)
    data = _training_data(args, loaded) if needs_data else None
    start = time.perf_counter()
    fp = method.generate(owner, params, data, seed=args.seed, stage=lambda msg: stage(args, msg))
    seconds = time.perf_counter() - start
    if needs_data:
        meta["data"] = args.data
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


def _check_transport(args: argparse.Namespace) -> None:
    if args.batch_size < 1 or args.timeout <= 0:
        raise UsageError("--batch-size must be at least 1 and --timeout positive")


def _black_box(fingerprint: Path, threshold: float | None, args: argparse.Namespace, kind: str | None = None) -> dict:
    """One method's judgement of ``args.suspect`` with one fingerprint file (of ``kind``, when given):
    score, threshold (the method's own by default), evidence."""
    from activeguard.audit import files
    from activeguard.audit.remote import open_suspect

    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise UsageError(f"--threshold must be in [0, 1], got {threshold}")
    loaded = files.load(fingerprint, kind=kind)
    method = base.get(loaded.kind)
    threshold = method.threshold_for(loaded.fingerprint) if threshold is None else threshold
    start = time.perf_counter()
    with open_suspect(
        args.suspect,
        timeout_s=args.timeout,
        batch_size=args.batch_size,
        model_file=args.suspect_model_file,
        model_class=args.suspect_model_class,
        owner_spec=loaded.input_spec,
        task=loaded.meta.get("task"),  # a regressor's suspect is loaded as one, not probed as a classifier
    ) as suspect:
        score = method.score(
            loaded.fingerprint, suspect, num_classes=loaded.meta.get("num_classes"), **method.score_options(args)
        )
    verified = score.value >= threshold
    return {
        "method": method.name,
        "fingerprint": str(fingerprint),
        "suspect": str(args.suspect),
        "owner_model_id": loaded.meta.get("owner_model_id"),
        "verified": verified,
        "verdict": "copy of the owner's model" if verified else "not shown to be a copy",
        "score": score.value,
        "score_name": method.score_name,
        "threshold": threshold,
        "explanation": method.explain(score),
        **score.evidence,
        "seconds": time.perf_counter() - start,
    }


def cmd_verify(args: argparse.Namespace) -> int:
    method = base.get(args.audit_command)
    _check_transport(args)
    payload = _black_box(args.fingerprint, args.threshold, args, kind=method.name)
    verified, threshold = payload["verified"], payload["threshold"]

    def human() -> str:
        head = "OWNERSHIP VERIFIED" if verified else "not verified"
        cmp = ">=" if verified else "<"
        return (
            f"{head}: {method.title} {method.score_name} {payload['score']:.3f} {cmp} threshold {threshold:.2f}"
            f" ({payload['explanation']})\n  suspect {args.suspect}"
        )

    emit(args, payload, human)
    return EXIT_OK if verified else EXIT_NEGATIVE


def _watermark(args: argparse.Namespace) -> dict:
    """The white-box check of ``audit all``: the suspect must be a local file."""
    from activeguard.cli.app import check_watermark
    from activeguard.models import sources

    if str(args.suspect).startswith(("http://", "https://")):
        return {"method": "watermark", "skipped": "the suspect is an endpoint: the watermark needs its weights"}
    suspect = sources.load(args.suspect, sources.SourceOptions(args.suspect_model_file, args.suspect_model_class))
    result = check_watermark(suspect.model, args)
    return {
        "method": "watermark",
        "verified": result.success,
        "verdict": "copy of the owner's model" if result.success else "not shown to be a copy",
        "score": result.chance_probability,
        "score_name": "chance probability (lower is stronger)",
        "threshold": result.threshold,
        "explanation": result.explanation(),
        "digits_matched": result.matched,
        "digits": result.total,
        "aligned_to_owner": result.aligned,
    }


def cmd_all(args: argparse.Namespace) -> int:
    """Every method the owner has material for, one combined verdict: a copy when any method says so
    (each method's threshold is set so that it accuses no model of the negative set)."""

    _check_transport(args)
    if not args.fingerprint and args.key is None:
        raise UsageError("give at least one --fingerprint (black-box) or --key (watermark)")
    rows = [_black_box(path, None, args) for path in args.fingerprint]
    if args.key is not None:
        rows.append(_watermark(args))
    judged = [r for r in rows if "verified" in r]
    copy = any(r["verified"] for r in judged)
    payload = {
        "suspect": str(args.suspect),
        "verified": copy,
        "verdict": "copy of the owner's model" if copy else "not shown to be a copy",
        "rule": "a copy when any method's score passes its threshold",
        "methods": rows,
    }

    def human() -> str:
        lines = [f"{'OWNERSHIP VERIFIED' if copy else 'not verified'}: {args.suspect}"]
        for r in rows:
            if "skipped" in r:
                lines.append(f"  {r['method']:<12} skipped: {r['skipped']}")
                continue
            mark = "COPY " if r["verified"] else "clear"
            lines.append(
                f"  {r['method']:<12} {mark} {r['score_name']} {r['score']:.3g} (threshold {r['threshold']:g}): "
                f"{r['explanation']}"
            )
        return "\n".join(lines)

    emit(args, payload, human)
    return EXIT_OK if copy else EXIT_NEGATIVE


# --- activeguard evaluate audit ------------------------------------------------------------------


def _print_evaluation(args: argparse.Namespace, run: Callable[..., dict[str, Any]], report: str) -> int:
    """Run one ``activeguard evaluate`` suite and print its ``report`` file (or the result as JSON)."""
    result = run(args.out, quick=args.quick, seed=args.seed, progress=progress_enabled(args), workload=args.workload)
    if args.json:
        print(json.dumps(result, indent=2, default=float))
    else:
        print(Path(args.out, report).read_text())
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    from activeguard.experiments.audit_evaluation import run_audit_evaluation

    return _print_evaluation(args, run_audit_evaluation, "audit.md")


def cmd_evaluate_tafa(args: argparse.Namespace) -> int:
    from activeguard.experiments.audit_evaluation import run_tafa_evaluation

    return _print_evaluation(args, run_tafa_evaluation, "tafa.md")


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


def _add_suspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--suspect",
        required=True,
        metavar="PATH_OR_URL",
        help="a model file (checkpoint, TorchScript, .pt2, or a state dict with --suspect-model-file), or an "
        "endpoint such as http://127.0.0.1:8080/predictions/mnist; a file that does not carry its input "
        "spec is fed as the fingerprint records the owner's",
    )
    p.add_argument(
        "--suspect-model-file",
        type=Path,
        metavar="FILE.py",
        help="Python file defining the suspect's network, for a state dict suspect",
    )
    p.add_argument(
        "--suspect-model-class",
        metavar="NAME",
        help="the network class in --suspect-model-file (default: its only nn.Module class)",
    )


def _add_transport_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per HTTP request (default 30)")
    p.add_argument("--batch-size", type=int, default=64, help="rows per HTTP request (default 64)")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``activeguard audit …`` and the ``audit`` evaluation suite (entry point ``activeguard.commands``)."""
    add_evaluation_suite("audit", "IPGuard/CEM/TAFA tables", cmd_evaluate)
    add_evaluation_suite(
        "tafa", "TAFA's three scenarios alone (no IPGuard margin sweep, no CEM ensemble to train)", cmd_evaluate_tafa
    )
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
        data_note = (
            "Uses the owner's data (--data), checked against the model's input shape, classes and range."
            if method.needs_data
            else "No --data: points are searched from random inputs in the model's input range."
        )
        p = fp_sub.add_parser(name, help=method.help, description=f"{method.help}. {data_note}")
        add_model_arguments(
            p, help="the owner's model (" + MODEL_HELP_TAIL + "); its input spec is stored in the fingerprint"
        )
        p.add_argument("--out", required=True, type=Path, help="fingerprint file to write (e.g. owner.agfp)")
        if method.needs_data:
            add_data_argument(p, default=DEFAULT_DATA, note=method.data_note)
            p.add_argument("--dataset", dest="data", help=argparse.SUPPRESS)  # the flag's old name
        else:
            p.add_argument(
                "--task",
                choices=list(TASKS),
                default=None,
                help="what the model does, where its file cannot say (TorchScript, .pt2, state dict): "
                "regression and generation models answer raw outputs, compared as they are "
                "(default: what the file says, else classification)",
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
        _add_suspect_arguments(p)
        p.add_argument(
            "--threshold",
            type=float,
            default=None,
            help=f"decision threshold on the score, in [0, 1] (default {method.threshold_help()}: the "
            "smallest that accuses none of the negative set of 'activeguard evaluate audit')",
        )
        method.add_score_arguments(p)
        _add_transport_arguments(p)
        add_common(p, seed=False)
        p.set_defaults(func=cmd_verify)

    p = audit_sub.add_parser(
        "all",
        help="every method you have a fingerprint or key for, one combined verdict",
        description="Audit one suspect with every black-box fingerprint given (each with its method's "
        "measured threshold) and, for a local suspect, the watermark; the suspect is judged a copy when "
        "any method says so. --json lists each method's score, threshold and evidence.",
        epilog="Exit codes: 0 ownership verified, 1 not verified, 2 usage or input error.",
    )
    p.add_argument(
        "--fingerprint", action="append", default=[], type=Path, help="a fingerprint file (repeat for each method)"
    )
    _add_suspect_arguments(p)
    p.add_argument("--key", type=Path, help="your encrypted watermark key (.agkey): adds the white-box check")
    add_owner_argument(p)
    add_passphrase(p)
    for method in methods.values():
        method.add_score_arguments(p)
    _add_transport_arguments(p)
    add_common(p, seed=False)
    p.set_defaults(func=cmd_all)

    p = audit_sub.add_parser(
        "watermark",
        help="white-box: extract your digit watermark (same as 'watermark verify')",
        description="Extract the digit watermark from a suspect's weights with your key "
        "(the same check as 'activeguard watermark verify').",
        epilog="Exit codes: 0 ownership verified, 1 not verified, 2 usage or input error.",
    )
    add_model_arguments(p, help="the suspect's model (" + MODEL_HELP_TAIL + ")")
    p.add_argument("--key", required=True, type=Path, help="the encrypted watermark key (.agkey)")
    add_owner_argument(p)
    add_passphrase(p)
    add_common(p, seed=False)
    p.set_defaults(func=cmd_watermark_verify)  # the core's check, reached from here
