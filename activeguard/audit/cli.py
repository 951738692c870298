"""``activeguard audit``: ownership audits of suspect models.

    activeguard audit fingerprint ipguard|cem|tafa --model owner.pt --out owner.agfp [--points N]
    activeguard audit ipguard|cem|tafa --fingerprint owner.agfp --suspect PATH_OR_URL [--threshold T]
    activeguard audit watermark --model suspect.pt --key owner.agkey

A suspect is a local checkpoint or a TorchServe-style endpoint
(``http://host:8080/predictions/<name>``, see :mod:`activeguard.audit.remote`). Exit codes, as
the rest of the CLI: 0 the suspect is judged a copy of the owner's model (ownership verified),
1 it is not, 2 a usage or input error (missing or empty file, unreachable or garbled endpoint,
a suspect with another input shape or output size).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from activeguard import cli as base
from activeguard.audit import decisions

METHOD_TITLES = {"ipguard": "IPGuard", "cem": "CEM (conferrable adversarial examples)", "tafa": "TAFA (reconstruction)"}
SCORE_NAMES = {"ipguard": "matching rate", "cem": "CAEAcc", "tafa": "TAFA score"}


def _stage(args: argparse.Namespace, message: str) -> None:
    """A progress line for a person at a terminal (never in JSON or piped output)."""
    if base._progress(args):
        print(message, file=sys.stderr, flush=True)


# --- activeguard audit fingerprint ---------------------------------------------------------------

def _owner(args: argparse.Namespace):
    from activeguard.models import arch_name, input_shape, load_model

    owner = load_model(args.model)
    num_classes = owner.config.get("num_classes")
    task = {"fc-generator": "generation", "mlp-regressor": "regression"}.get(arch_name(owner), "classification")
    if num_classes is None and task == "classification":
        raise base.UsageError(f"{args.model}: cannot tell the number of classes of this model")
    return owner, tuple(input_shape(owner)), num_classes, task


def _training_data(args: argparse.Namespace, shape: tuple[int, ...], num_classes: int | None):
    from activeguard.data import load_dataset

    if num_classes is None:
        raise base.UsageError(f"{args.model} is not a classifier: {args.kind} fingerprints need one "
                              "(use 'activeguard audit fingerprint tafa' for regressors and generators)")
    split = load_dataset(args.dataset, seed=args.seed)
    if tuple(split.input_shape) != shape or split.num_classes != num_classes:
        raise base.UsageError(f"--dataset {args.dataset} has inputs {tuple(split.input_shape)} and "
                              f"{split.num_classes} classes, but {args.model} takes {shape} and has {num_classes}")
    return split


def cmd_fingerprint(args: argparse.Namespace) -> int:
    import torch

    from activeguard.audit import conferrable, files, ipguard, tafa
    from activeguard.models import model_id

    if args.points < 1:
        raise base.UsageError(f"--points must be at least 1, got {args.points}")
    owner, shape, num_classes, task = _owner(args)
    meta: dict[str, Any] = {"owner_model": str(args.model), "owner_model_id": model_id(owner),
                            "input_shape": list(shape), "num_classes": num_classes, "task": task,
                            "seed": args.seed, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    start = time.perf_counter()
    if args.kind == "ipguard":
        split = _training_data(args, shape, num_classes)
        _stage(args, f"searching {args.points} IPGuard-{args.method} boundary points…")
        fp = ipguard.generate(owner, args.points, method=args.method, x_train=split.x_train, seed=args.seed, k=args.k)
        meta.update(dataset=args.dataset, method=args.method, k=fp.k)
    elif args.kind == "cem":
        split = _training_data(args, shape, num_classes)
        if args.surrogates < 1 or args.references < 1:
            raise base.UsageError("CEM needs at least one surrogate and one reference model")
        _stage(args, f"training {args.surrogates} surrogate and {args.references} reference models "
                     f"({args.epochs} epochs each) on {args.dataset}…")
        surrogates, references = conferrable.train_ensemble(
            owner, split.x_train, split.y_train, n_surrogates=args.surrogates, n_references=args.references,
            epochs=args.epochs, seed=args.seed + 100)
        _stage(args, f"searching conferrable examples ({args.steps} steps)…")
        x0 = split.x_test[: min(len(split.x_test), 4 * args.points)]
        fp = conferrable.generate(owner, surrogates, references, x0, n=args.points, steps=args.steps, seed=args.seed)
        meta.update(dataset=args.dataset, surrogates=args.surrogates, references=args.references,
                    passed_threshold=fp.passed)
    else:
        image = len(shape) == 3
        output = (lambda x: torch.softmax(owner(x), 1)) if task == "classification" else None
        _stage(args, f"searching {args.points} region-boundary points (no training data)…")
        fp = tafa.generate(owner, args.points, shape, output=output, solver=args.solver, seed=args.seed,
                           **({"bounds": (0.0, 1.0), "init": "uniform"} if image else {}))
        meta.update(output="softmax" if output else "raw", solver=fp.solver)
    seconds = time.perf_counter() - start
    try:
        files.save(fp, args.out, meta)
    except OSError as exc:
        raise base.UsageError(f"cannot write {args.out}: {exc.strerror or exc}") from exc
    payload = {"fingerprint": str(args.out), "kind": args.kind, "points": len(fp.points), "seconds": seconds,
               **{k: v for k, v in meta.items() if k not in ("created",)}}
    note = ""
    if args.kind == "cem" and fp.passed < len(fp.points):
        note = f"\n  only {fp.passed} reached conferrability {fp.threshold}; the rest are the best-scoring others"
    _emit_fp = lambda: (f"wrote {args.kind} fingerprint {args.out}: {len(fp.points)} points in {seconds:.1f} s\n"
                        f"  owner model id {meta['owner_model_id']}" + note)
    base._emit(args, payload, _emit_fp)
    return base.EXIT_OK


# --- activeguard audit ipguard|cem|tafa ----------------------------------------------------------

def _score(method: str, fp: Any, suspect, meta: dict[str, Any], args: argparse.Namespace) -> tuple[float, dict]:
    """(score in [0, 1], evidence) of one suspect against one fingerprint."""
    from activeguard.audit import conferrable, ipguard, tafa
    from activeguard.audit.remote import probabilities

    num_classes = meta.get("num_classes")
    if method in ("ipguard", "cem"):
        fn = ipguard.verify if method == "ipguard" else conferrable.caeacc
        score = fn(fp, suspect, num_classes=num_classes)
        total = len(fp.labels)
        return score, {"matched": int(round(score * total)), "total": total}
    statistic = args.statistic or tafa.DEFAULT_STATISTIC
    call = (lambda x: probabilities(suspect(x), suspect.name)) if meta.get("output") == "softmax" else suspect
    return tafa.verify(fp, call, statistic), {"points": len(fp.points), "statistic": statistic}


def cmd_verify(args: argparse.Namespace) -> int:
    from activeguard.audit import files
    from activeguard.audit.remote import open_suspect

    method = args.audit_command
    threshold = decisions.THRESHOLDS[method] if args.threshold is None else args.threshold
    if not 0.0 <= threshold <= 1.0:
        raise base.UsageError(f"--threshold must be in [0, 1], got {threshold}")
    if args.batch_size < 1 or args.timeout <= 0:
        raise base.UsageError("--batch-size must be at least 1 and --timeout positive")
    loaded = files.load(args.fingerprint, kind=method)
    start = time.perf_counter()
    with open_suspect(args.suspect, timeout_s=args.timeout, batch_size=args.batch_size) as suspect:
        score, evidence = _score(method, loaded.fingerprint, suspect, loaded.meta, args)
    verified = score >= threshold
    payload = {"method": method, "fingerprint": str(args.fingerprint), "suspect": str(args.suspect),
               "owner_model_id": loaded.meta.get("owner_model_id"), "verified": verified,
               "verdict": "copy of the owner's model" if verified else "not shown to be a copy",
               "score": score, "score_name": SCORE_NAMES[method], "threshold": threshold, **evidence,
               "seconds": time.perf_counter() - start}
    if "matched" in evidence:
        detail = f"{evidence['matched']}/{evidence['total']} fingerprint points give the owner's label"
    else:
        detail = f"{evidence['points']} boundary points, {evidence['statistic']} statistic"

    def human() -> str:
        head = "OWNERSHIP VERIFIED" if verified else "not verified"
        cmp = ">=" if verified else "<"
        return (f"{head}: {METHOD_TITLES[method]} {SCORE_NAMES[method]} {score:.3f} {cmp} threshold {threshold:.2f}"
                f" ({detail})\n  suspect {args.suspect}")

    base._emit(args, payload, human)
    return base.EXIT_OK if verified else base.EXIT_NEGATIVE


# --- parser --------------------------------------------------------------------------------------

def register(sub: argparse._SubParsersAction) -> None:
    """Add ``activeguard audit …`` to the top-level subcommands."""
    audit = sub.add_parser(
        "audit", help="audit a suspect model for ownership: black-box fingerprints or the watermark",
        description="Judge whether a suspect model is a copy of yours. Black-box methods need only the "
                    "suspect's outputs, from a local checkpoint or an HTTP endpoint "
                    "(POST http://host:port/predictions/<name> with {\"inputs\": [...]}): first make a "
                    "fingerprint of your model, then audit suspects against it.",
        epilog="Exit codes: 0 ownership verified (the suspect is judged a copy), 1 not verified, "
               "2 usage or input error.")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")

    fp_parser = audit_sub.add_parser("fingerprint", help="make a fingerprint of your model to audit suspects with",
                                     description="Make a black-box fingerprint of the owner's model and save it "
                                                 "(one file, loaded without unpickling code).")
    fp_sub = fp_parser.add_subparsers(dest="kind", required=True, metavar="KIND")
    kinds = {
        "ipguard": "IPGuard: points near the classification boundary (needs training data)",
        "cem": "conferrable adversarial examples: trains a local surrogate/reference ensemble first",
        "tafa": "TAFA reconstruction: ReLU region-boundary points, no training data, any task",
    }
    for kind, text in kinds.items():
        p = fp_sub.add_parser(kind, help=text, description=text + ".")
        p.add_argument("--model", required=True, type=Path, help="the owner's checkpoint")
        p.add_argument("--out", required=True, type=Path, help="fingerprint file to write (e.g. owner.agfp)")
        p.add_argument("--points", type=int, default=100, help="fingerprint points (default 100)")
        if kind != "tafa":
            p.add_argument("--dataset", default="mnist", choices=["mnist", "fashion-mnist", "digits8x8"],
                           help="the owner's training data (default mnist)")
        if kind == "ipguard":
            p.add_argument("--method", default="TL", choices=["TL", "TR", "RL", "RR"],
                           help="initialization (T: training examples, R: noise) and target label "
                                "(L: least likely, R: random); default TL, the paper's best")
            p.add_argument("--k", type=float, default=decisions.IPGUARD_K,
                           help=f"logit margin of each point over the runner-up (default {decisions.IPGUARD_K:g}; "
                                "larger k loses uniqueness: independent models start to match)")
        elif kind == "cem":
            p.add_argument("--surrogates", type=int, default=3, help="surrogate models to train (default 3)")
            p.add_argument("--references", type=int, default=3, help="reference models to train (default 3)")
            p.add_argument("--epochs", type=int, default=3, help="training epochs per ensemble model (default 3)")
            p.add_argument("--steps", type=int, default=200, help="optimization steps (default 200)")
        else:
            p.add_argument("--solver", default="auto", choices=["auto", "lp", "gradient"],
                           help="linear programming (small MLPs) or projected gradient (default auto)")
        base._add_common(p)
        p.set_defaults(func=cmd_fingerprint)

    for method in ("ipguard", "cem", "tafa"):
        p = audit_sub.add_parser(
            method, help=f"audit a suspect with your {METHOD_TITLES[method]} fingerprint",
            description=f"Query the suspect at the fingerprint's points and compare with the owner's model: "
                        f"the {SCORE_NAMES[method]} is the score, and the suspect is judged a copy when the score "
                        f"is at least the threshold.",
            epilog="Exit codes: 0 ownership verified, 1 not verified, 2 usage or input error.")
        p.add_argument("--fingerprint", required=True, type=Path,
                       help=f"file written by 'activeguard audit fingerprint {method}'")
        p.add_argument("--suspect", required=True, metavar="PATH_OR_URL",
                       help="a checkpoint, or an endpoint such as http://127.0.0.1:8080/predictions/mnist")
        p.add_argument("--threshold", type=float, default=None,
                       help=f"decision threshold on the score, in [0, 1] (default {decisions.THRESHOLDS[method]:g}, "
                            "measured by 'activeguard evaluate audit')")
        if method == "tafa":
            p.add_argument("--statistic", choices=["distance", "bending"], default=None,
                           help="output distance or second difference at the points (default: the library's)")
        p.add_argument("--timeout", type=float, default=30.0, help="seconds per HTTP request (default 30)")
        p.add_argument("--batch-size", type=int, default=64, help="rows per HTTP request (default 64)")
        base._add_common(p, seed=False)
        p.set_defaults(func=cmd_verify)

    p = audit_sub.add_parser("watermark", help="white-box: extract your digit watermark (same as 'watermark verify')",
                             description="Extract the digit watermark from a suspect's weights with your key "
                                         "(the same check as 'activeguard watermark verify').",
                             epilog="Exit codes: 0 ownership verified, 1 not verified, 2 usage or input error.")
    p.add_argument("--model", required=True, type=Path, help="the suspect's checkpoint")
    p.add_argument("--key", required=True, type=Path, help="the encrypted watermark key (.agkey)")
    base._add_passphrase(p)
    base._add_common(p, seed=False)
    p.set_defaults(func=base.cmd_watermark_verify)
