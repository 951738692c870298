"""``activeguard audit``: ownership audits of suspect models.

    activeguard audit fingerprint METHOD --model MODEL [model flags] --out owner.agfp [--data D] [--points N]
    activeguard audit METHOD --fingerprint owner.agfp --suspect PATH_OR_URL [--threshold T]
    activeguard audit watermark --model suspect.pt --key owner.agkey

The owner's model is any source :mod:`activeguard.models.sources` loads (checkpoint, TorchScript,
exported program, state dict + ``--model-file``); the fingerprint file records its input spec.
A suspect is a local model file of any source (fed with its own spec, else the owner's) or an
endpoint: ``http://host:8080/predictions/<name>``, any other JSON API (``--request-template``,
``--response-path``, ``--header``), or TorchServe's gRPC API (``grpc://host:7070/<name>``); see
:mod:`activeguard.audit.remote` and :mod:`activeguard.audit.endpoints`. Exit codes, as
the rest of the CLI: 0 the suspect is judged a copy of the owner's model (ownership verified),
1 it is not, 2 a usage or input error (missing or empty file, unreachable or garbled endpoint,
a suspect with another input shape or output size).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from activeguard.cli.app import add_owner_argument, cmd_watermark_verify
from activeguard.cli.extraction import add_extraction_parser, cmd_extraction
from activeguard.cli.support import (
    DEFAULT_REFERENCES,
    EXIT_NEGATIVE,
    EXIT_OK,
    TASKS,
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

if TYPE_CHECKING:
    from activeguard.audit import base
    from activeguard.audit.endpoints import EndpointApi

EXIT_CODES = (
    "Exit codes: 0 copy (ownership verified), 1 not a copy, 2 usage or input error, 3 inconclusive "
    "(uncalibrated, too few references, the method's premise fails, or above every reference without "
    "significance)."
)
CALIBRATION_NOTE = """
Calibration: with --data, N (--train-references) models of the owner's own architecture (fresh weights, other 80%
subsets of the data, other seeds and training recipes) are trained and scored; with --reference, your own
models of the same task are scored too. Their scores are the fingerprint's null, and audits call a
suspect a copy only when an independent model would score as high with chance at most --alpha. Cost:
each reference trains about as long as the owner did on this data (8 LeNet-5s on the 4,000 bundled
MNIST digits: about a minute on 2 cores); they are cached by content in $ACTIVEGUARD_CACHE. Without
references the fingerprint is uncalibrated: audits report its score and never accuse.
"""
MODEL_HELP_TAIL = "checkpoint, TorchScript, exported program .pt2, or a state dict with --model-file"


# --- activeguard audit fingerprint METHOD --------------------------------------------------------


def _owner_data(args: argparse.Namespace, loaded: Any, method: base.AuditMethod, params: base.Params):
    """``--data`` for the owner's model (rows of its shape, labels within its classes, values in its range),
    or None when none was given and the method can do without."""
    if getattr(args, "data", None) is None:
        if method.requires_data(params):
            raise UsageError(f"{args.kind} fingerprints with these settings need the owner's data: give --data")
        return None
    if loaded.task == "generation":
        raise UsageError(
            "a generator's references cannot be trained here (that needs its own adversarial training): "
            "give models of the same task with --reference instead of --data"
        )
    if loaded.task == "classification" and loaded.num_classes is None:
        raise UsageError(f"{args.model} gives no class scores: it cannot be fingerprinted as a classifier")
    if method.requires_data(params) and loaded.task != "classification":
        data_free = [name for name, flags in METHOD_FLAGS.items() if not flags.needs_data]
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


def _references(
    args: argparse.Namespace, owner: Any, loaded: Any, data: Any, stack: contextlib.ExitStack, api: EndpointApi
) -> list:
    """The fingerprint's references: trained from ``--data`` (``--train-references N``) and supplied (``--reference``,
    endpoints spoken through ``api``)."""
    from activeguard.audit.references import ReferenceError, trained_references
    from activeguard.audit.remote import open_suspect

    references = []
    if data is not None and args.train_references > 0:
        try:
            references += trained_references(
                owner,
                data,
                args.train_references,
                seed=args.seed,
                progress=lambda m: stage(args, m),
            )
        except ReferenceError as exc:
            raise UsageError(str(exc)) from None
    for path in args.reference:
        suspect = stack.enter_context(
            open_suspect(
                str(path),
                timeout_s=args.timeout,
                batch_size=args.batch_size,
                api=api,
                model_file=args.reference_model_file,
                model_class=args.reference_model_class,
                owner_spec=loaded.spec,
                task=loaded.task,
            )
        )
        references.append(_supplied(path, suspect))
    return references


def _supplied(path: Any, suspect: Any):
    from activeguard.audit.references import Reference

    return Reference(f"reference {path}", suspect, "supplied with --reference")


def cmd_fingerprint(args: argparse.Namespace) -> int:
    from activeguard.audit import base, files
    from activeguard.audit.fingerprinting import ReferenceScoreError, make_fingerprint
    from activeguard.audit.references import positive_copies

    method = base.get(args.kind)
    params = _params(method, args)
    _check_transport(args)
    api = _endpoint_api(args, [str(r) for r in args.reference], "--reference")  # checked before any training
    loaded = load_model_argument(args)
    owner = base.Owner.from_loaded(loaded)
    data = _owner_data(args, loaded, method, params)
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        references = _references(args, owner, loaded, data, stack, api)
        positives = positive_copies(owner, data, seed=args.seed) if references else []
        try:
            made = make_fingerprint(
                method, owner, params, data, references, positives, seed=args.seed, stage=lambda m: stage(args, m)
            )
        except ReferenceScoreError as exc:
            raise UsageError(str(exc)) from None
    seconds = time.perf_counter() - start
    fp = made.fingerprint
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
        "references": made.references,
    }
    if data is not None:
        meta["data"] = args.data
    meta.update(method.describe(fp, made.params))
    try:
        files.save(fp, args.out, meta, made.calibration)
    except OSError as exc:
        raise UsageError(f"cannot write {args.out}: {exc.strerror or exc}") from exc
    calibration = _calibration_summary(made.calibration)
    payload = {
        "fingerprint": str(args.out),
        "kind": args.kind,
        "points": len(fp.points),
        "seconds": seconds,
        "calibration": calibration,
        **{k: v for k, v in meta.items() if k not in ("created",)},
    }
    note = method.note(fp)
    emit(args, payload, lambda: _fingerprint_text(args, fp, meta, note, seconds, made.calibration))
    return EXIT_OK


def _calibration_summary(calibration: Any) -> dict[str, Any] | None:
    if calibration is None:
        return None
    null = calibration.null
    return {
        "statistic": calibration.statistic,
        "selections": calibration.selections,
        "premise": calibration.premise or None,
        "null": None if null is None else null.summary(),
        "positives": {name: round(scores[calibration.statistic], 4) for name, scores in calibration.positives.items()},
    }


def _fingerprint_text(args, fp, meta, note, seconds, calibration) -> str:
    lines = [
        f"wrote {args.kind} fingerprint {args.out}: {len(fp.points)} points in {seconds:.1f} s",
        f"  owner model id {meta['owner_model_id']}",
    ]
    if note:
        lines.append(f"  {note}")
    if calibration is None:
        lines.append(
            "  uncalibrated: no references (give --data or --reference), so audits with it report scores "
            "but never accuse"
        )
    elif calibration.premise:
        lines.append(f"  premise fails, audits with it are inconclusive: {calibration.premise}")
    else:
        null = calibration.null
        copies = ", ".join(f"{n} {v[calibration.statistic]:.3g}" for n, v in calibration.positives.items())
        lines.append(
            f"  calibrated on {len(null.scores)} references: statistic {calibration.statistic} (chosen among "
            f"{calibration.selections}), null largest {max(null.scores):.3g}, mean {sum(null.scores) / len(null.scores):.3g}"
            + (f"; the owner's own copies {copies}" if copies else "")
        )
    return "\n".join(lines)


# --- activeguard audit METHOD --------------------------------------------------------------------


def _check_transport(args: argparse.Namespace) -> None:
    if args.batch_size < 1 or args.timeout <= 0:
        raise UsageError("--batch-size must be at least 1 and --timeout positive")


ENDPOINT_FLAGS = "--request-template, --response-path, --header and --grpc-input-key"


def _endpoint_api(args: argparse.Namespace, targets: list[str], flag: str = "--suspect") -> EndpointApi:
    """How to speak the endpoints among ``targets``, from the endpoint flags, checked at start (a template
    without its placeholder, a path that does not parse, a header without ':'): one line, exit 2."""
    from activeguard.audit import endpoints
    from activeguard.audit.remote import is_url

    if not args.grpc_input_key:
        raise UsageError("--grpc-input-key must not be empty")
    api = endpoints.EndpointApi(
        template=None if args.request_template is None else endpoints.read_template(args.request_template),
        response=endpoints.parse_response_path(args.response_path),
        headers=tuple(endpoints.parse_header(h, n) for n, h in enumerate(args.header, 1)),
        grpc_input_key=args.grpc_input_key,
    )
    explicit = args.request_template is not None or args.response_path is not None or args.header
    if (explicit or args.grpc_input_key != "data") and not any(is_url(t) for t in targets):
        raise UsageError(f"{ENDPOINT_FLAGS} apply to endpoints, and no {flag} is a URL")
    return api


EXIT_INCONCLUSIVE = 3
VERDICT_EXIT = {"copy": EXIT_OK, "not a copy": EXIT_NEGATIVE, "inconclusive": EXIT_INCONCLUSIVE}
VERDICT_SHOUT = {"copy": "COPY", "not a copy": "not a copy", "inconclusive": "inconclusive"}


def _suspect_overrides(args: argparse.Namespace) -> Any:
    from activeguard.cli.support import spec_overrides

    return spec_overrides(args)


def _black_box(
    fingerprint: Path, alpha: float, args: argparse.Namespace, api: EndpointApi, kind: str | None = None
) -> dict:
    """One method's verdict on ``args.suspect`` (an endpoint spoken through ``api``) with one fingerprint file
    (of ``kind``, when given): the score of every statistic, the null, the chance bound and the verdict at
    ``alpha``."""
    from activeguard.audit import base, files
    from activeguard.audit import calibration as cal
    from activeguard.audit.remote import open_suspect

    loaded = files.load(fingerprint, kind=kind)
    method = base.get(loaded.kind)
    start = time.perf_counter()
    with open_suspect(
        args.suspect,
        timeout_s=args.timeout,
        batch_size=args.batch_size,
        api=api,
        model_file=args.suspect_model_file,
        model_class=args.suspect_model_class,
        owner_spec=loaded.input_spec,
        task=loaded.meta.get("task"),  # a regressor's suspect is loaded as one, not probed as a classifier
        overrides=_suspect_overrides(args),
    ) as suspect:
        score = method.score(
            loaded.fingerprint, suspect, num_classes=loaded.meta.get("num_classes"), **method.score_options(args)
        )
    judgement = cal.judge(score.statistics, loaded.calibration, alpha, default_statistic=next(iter(score.statistics)))
    if loaded.calibration is None and loaded.format != files.FORMAT:
        judgement = cal.Judgement(
            cal.INCONCLUSIVE,
            f"uncalibrated: {fingerprint} was made before calibrated verdicts ({loaded.format}); make it again "
            "with --data or --reference",
            judgement.score,
            judgement.statistic,
            alpha,
        )
    return {
        "method": method.name,
        "fingerprint": str(fingerprint),
        "suspect": str(args.suspect),
        "owner_model_id": loaded.meta.get("owner_model_id"),
        "verified": judgement.copy,
        **judgement.summary(),
        "score_name": method.score_name,
        "statistics": {k: round(v, 6) for k, v in score.statistics.items()},
        "explanation": method.explain(score),
        **{k: v for k, v in score.evidence.items() if k not in ("statistic",)},
        "seconds": time.perf_counter() - start,
    }


def cmd_extraction_audit(args: argparse.Namespace) -> int:
    """``audit extraction``, with the suspect opened as every black-box audit opens it."""
    _check_transport(args)
    options = {
        "timeout_s": args.timeout,
        "batch_size": args.batch_size,
        "api": _endpoint_api(args, [str(args.suspect)]),
        "model_file": args.suspect_model_file,
        "model_class": args.suspect_model_class,
        "overrides": _suspect_overrides(args),
    }
    return cmd_extraction(args, options)


def _verdict_line(row: dict) -> str:
    """One method's verdict for a person."""
    if "skipped" in row:
        return f"{row['method']}: not applicable: {row['skipped']}"
    head = f"{row['method']}: {VERDICT_SHOUT[row['verdict']]}"
    if "null" in row:
        bound = f", chance bound {row['chance_bound']:.2g}" if "chance_bound" in row else ""
        return f"{head}: {row['statistic']} {row['score']:.3g}{bound} ({row['reason']}); {row['explanation']}"
    return f"{head} ({row['reason']}); {row['explanation']}"


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise UsageError(f"--alpha must be in (0, 1), got {alpha}")


def cmd_verify(args: argparse.Namespace) -> int:
    from activeguard.audit import base

    method = base.get(args.audit_command)
    _check_transport(args)
    _check_alpha(args.alpha)
    api = _endpoint_api(args, [str(args.suspect)])
    payload = _black_box(args.fingerprint, args.alpha, args, api, kind=method.name)
    emit(args, payload, lambda: f"{_verdict_line(payload)}\n  suspect {args.suspect}")
    return VERDICT_EXIT[payload["verdict"]]


def _watermark(args: argparse.Namespace) -> dict:
    """The white-box check of ``audit all``: a local suspect that has the key's layer."""
    from activeguard.audit.remote import is_url
    from activeguard.cli.app import check_watermark
    from activeguard.models import sources

    skipped = {"method": "watermark", "verified": False}
    if is_url(str(args.suspect)):
        return {**skipped, "skipped": "the suspect is an endpoint: the watermark needs its weights"}
    options = sources.SourceOptions(args.suspect_model_file, args.suspect_model_class, _suspect_overrides(args))
    suspect = sources.load(args.suspect, options)
    try:
        result = check_watermark(suspect.model, args)
    except ValueError as exc:  # another architecture: the key's layer is missing or shaped otherwise
        return {**skipped, "skipped": f"the suspect cannot carry this watermark ({exc})"}
    verdict = "copy" if result.success else "not a copy"
    return {
        "method": "watermark",
        "verified": result.success,
        "verdict": verdict,
        "reason": f"chance {result.chance_probability:.2g} of an unmarked model matching as many digits "
        + ("≤" if result.success else ">")
        + f" {result.threshold:g}",
        "score": result.chance_probability,
        "score_name": "chance probability (lower is stronger)",
        "threshold": result.threshold,
        "explanation": result.explanation(),
        "digits_matched": result.matched,
        "digits": result.total,
        "aligned_to_owner": result.aligned,
    }


def cmd_all(args: argparse.Namespace) -> int:
    """Every method the owner has material for, one combined verdict: a copy when any method says so at
    α divided by the number of methods (Bonferroni), not a copy when every method says so."""
    _check_transport(args)
    _check_alpha(args.alpha)
    if not args.fingerprint and args.key is None:
        raise UsageError("give at least one --fingerprint (black-box) or --key (watermark)")
    api = _endpoint_api(args, [str(args.suspect)])
    methods = len(args.fingerprint) + (args.key is not None)
    alpha = args.alpha / methods
    rows = [_black_box(path, alpha, args, api) for path in args.fingerprint]
    if args.key is not None:
        rows.append(_watermark(args))
    judged = [r for r in rows if "skipped" not in r]
    verdicts = {r["verdict"] for r in judged}
    if "copy" in verdicts:
        verdict = "copy"
    elif verdicts == {"not a copy"}:
        verdict = "not a copy"
    else:
        verdict = "inconclusive"
    calibrated = [r["method"] for r in judged if r.get("calibrated")]
    payload = {
        "suspect": str(args.suspect),
        "verified": verdict == "copy",
        "verdict": verdict,
        "alpha": args.alpha,
        "alpha_per_method": alpha,
        "calibrated_methods": calibrated,
        "rule": "copy when any method's chance bound is at most alpha / methods (the watermark: its own chance "
        "bound); not a copy when every method says so; else inconclusive",
        "methods": rows,
    }

    def human() -> str:
        lines = [
            f"{VERDICT_SHOUT[verdict]}: {args.suspect} (α {args.alpha:g} over {methods} methods; calibrated: "
            f"{', '.join(calibrated) or 'none'})"
        ]
        lines += [f"  {_verdict_line(r)}" for r in rows]
        return "\n".join(lines)

    emit(args, payload, human)
    return VERDICT_EXIT[verdict]


# --- activeguard evaluate audit ------------------------------------------------------------------


def _print_evaluation(args: argparse.Namespace, run: Callable[..., dict[str, Any]], report: str) -> int:
    """Run one ``activeguard evaluate`` suite and print its ``report`` file (or the result as JSON)."""
    families = None if args.families is None else tuple(f for f in args.families.split(",") if f and f != "none")
    result = run(
        args.out,
        quick=args.quick,
        seed=args.seed,
        progress=progress_enabled(args),
        workload=args.workload,
        families=families,
    )
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


def cmd_evaluate_families(args: argparse.Namespace) -> int:
    from activeguard.experiments.family_evaluation import run_family_evaluation

    return _print_evaluation(args, run_family_evaluation, "families.md")


def cmd_evaluate_extraction(args: argparse.Namespace) -> int:
    from activeguard.experiments.extraction import run_extraction_evaluation

    return _print_evaluation(args, run_extraction_evaluation, "extraction.md")


# --- parser --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MethodFlags:
    """What ``activeguard audit`` shows of one black-box method, its texts and flags, known without
    importing the method (its module loads torch): :data:`METHOD_FLAGS` holds a copy for every
    registered method, and tests/test_cli_imports.py keeps it equal to :func:`method_flags` of the method."""

    title: str
    help: str
    score_name: str
    needs_data: bool
    data_note: str
    params: tuple[tuple[str, dict[str, Any]], ...]  # (flag, add_argument keywords) per parameters field
    score: tuple[tuple[str, dict[str, Any]], ...]  # the flags of the method's add_score_arguments


class _RecordedFlags:
    """Stands in for a parser: keeps what ``add_score_arguments`` adds."""

    def __init__(self) -> None:
        self.flags: list[tuple[str, dict[str, Any]]] = []

    def add_argument(self, flag: str, **keywords: Any) -> None:
        self.flags.append((flag, keywords))


def method_flags(method: base.AuditMethod) -> MethodFlags:
    """A method's texts and flags, from the method itself: one flag per parameters field (its default, type,
    choices and help come from the dataclass), then what its ``add_score_arguments`` adds."""
    params = []
    for f in dataclasses.fields(method.params_type):
        extra = {k: v for k, v in f.metadata.items() if k != "help"}
        help_text = f.metadata["help"].format(default=f.default)
        params.append(
            (
                f"--{f.name.replace('_', '-')}",
                {"type": type(f.default), "default": f.default, "help": help_text, **extra},
            )
        )
    recorded = _RecordedFlags()
    method.add_score_arguments(recorded)
    return MethodFlags(
        method.title,
        method.help,
        method.score_name,
        method.needs_data,
        method.data_note,
        tuple(params),
        tuple(recorded.flags),
    )


# Every registered method (activeguard.audit.base), in registry order; a new or changed method fails
# tests/test_cli_imports.py until its entry here says what method_flags(method) says.
METHOD_FLAGS: dict[str, MethodFlags] = {
    "ipguard": MethodFlags(
        title="IPGuard",
        help="IPGuard: points near the classification boundary (TL/TR start from the owner's data; RL/RR start "
        "from noise and need no data)",
        score_name="matching rate",
        needs_data=True,
        data_note="only TL/TR use it: --method RL or RR starts from noise in the input range and needs no data",
        params=(
            ("--points", {"type": int, "default": 300, "help": "fingerprint points (default 300)"}),
            (
                "--method",
                {
                    "type": str,
                    "default": "auto",
                    "help": "initialization (T: training examples, R: noise) and target label (L: least likely, "
                    "R: random); default auto: TL (the paper's best) with data, RL without",
                    "choices": ["auto", "TL", "TR", "RL", "RR"],
                },
            ),
            (
                "--k",
                {
                    "type": float,
                    "default": 0.0,
                    "help": "logit margin of each point over the runner-up; default 0: with references, whichever "
                    "of 1, 3 and 10 separates best, else 3 (larger k loses uniqueness: independent models start "
                    "to match)",
                },
            ),
        ),
        score=(),
    ),
    "cem": MethodFlags(
        title="CEM (conferrable adversarial examples)",
        help="conferrable adversarial examples: trains a local surrogate/reference ensemble first",
        score_name="CAEAcc",
        needs_data=True,
        data_note="the ensemble trains on it and the examples start from it",
        params=(
            ("--points", {"type": int, "default": 100, "help": "fingerprint points (default 100)"}),
            ("--surrogates", {"type": int, "default": 4, "help": "surrogate models to train (default 4)"}),
            ("--references", {"type": int, "default": 4, "help": "reference models to train (default 4)"}),
            ("--epochs", {"type": int, "default": 6, "help": "training epochs per ensemble model (default 6)"}),
            ("--steps", {"type": int, "default": 300, "help": "optimization steps (default 300)"}),
            (
                "--start",
                {
                    "type": str,
                    "default": "test",
                    "help": "images the examples start from: the owner's 'train' or held-out 'test' images "
                    "(default test)",
                    "choices": ("train", "test"),
                },
            ),
            (
                "--eps",
                {
                    "type": float,
                    "default": 0.25,
                    "help": "L-infinity radius of the perturbation, as a fraction of the input range (default "
                    "0.25, measured on 28x28 MNIST; low-resolution inputs need less, e.g. 0.1 for 8x8 digits, or "
                    "the examples become other digits that every model reads alike)",
                },
            ),
        ),
        score=(),
    ),
    "tafa": MethodFlags(
        title="TAFA (reconstruction)",
        help="TAFA reconstruction: ReLU region-boundary points, needs no training data, any task",
        score_name="TAFA score",
        needs_data=False,
        data_note="",
        params=(
            (
                "--points",
                {"type": int, "default": 300, "help": "boundary points (default 300; generation needs no data)"},
            ),
            (
                "--solver",
                {
                    "type": str,
                    "default": "auto",
                    "help": "linear programming (plain ReLU MLPs with at most 64 inputs) or gradient bisection "
                    "(any model) (default auto)",
                    "choices": ["auto", "lp", "gradient"],
                },
            ),
        ),
        score=(
            (
                "--statistic",
                {
                    "choices": ["kink", "distance", "bending"],
                    "default": None,
                    "help": "kink: bends where and how the owner's do, against a null from the same lines "
                    "(calibrated); distance: output distance; bending: second-difference error (default: kink)",
                },
            ),
        ),
    ),
}


def _add_flags(p: argparse.ArgumentParser, flags: tuple[tuple[str, dict[str, Any]], ...]) -> None:
    for flag, keywords in flags:
        p.add_argument(flag, **keywords)


def _add_suspect_arguments(p: argparse.ArgumentParser) -> None:
    from activeguard.cli.support import add_spec_arguments

    p.add_argument(
        "--suspect",
        required=True,
        metavar="PATH_OR_URL",
        help="a model file (checkpoint, TorchScript, .pt2, or a state dict with --suspect-model-file), or an "
        "endpoint: http://127.0.0.1:8080/predictions/mnist, any JSON API (see --request-template), or TorchServe's "
        "gRPC API, grpc://127.0.0.1:7070/mnist; a file that does not carry its input "
        "spec is fed as the fingerprint records the owner's, unless --input-shape and the like say otherwise",
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
    add_spec_arguments(p.add_argument_group("the suspect's input (only where its file does not say)"))


def _add_alpha_argument(p: argparse.ArgumentParser, across: str = "") -> None:
    from activeguard.audit.calibration import DEFAULT_ALPHA  # a light module (no torch)

    p.add_argument(
        "--alpha",
        type=float,
        default=DEFAULT_ALPHA,
        help=f"the largest chance bound that accuses: the suspect is called a copy only when an independent "
        f"model would score as high with at most this probability (default {DEFAULT_ALPHA:g}{across})",
    )


def _add_reference_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration (the fingerprint's null)")
    g.add_argument(
        "--train-references",
        type=int,
        default=DEFAULT_REFERENCES,
        metavar="N",
        help=f"reference models of your architecture to train from --data (default {DEFAULT_REFERENCES}; 0: none)",
    )
    g.add_argument(
        "--reference",
        action="append",
        default=[],
        metavar="PATH_OR_URL",
        help="a model of the same task that is not yours (any model file, or an endpoint), scored for the null; "
        "repeat for each",
    )
    g.add_argument("--reference-model-file", type=Path, metavar="FILE.py", help="network code of state-dict references")
    g.add_argument("--reference-model-class", metavar="NAME", help="the network class in --reference-model-file")


def _add_transport_arguments(p: argparse.ArgumentParser, what: str = "a URL suspect") -> None:
    """How to reach and speak an endpoint (:mod:`activeguard.audit.endpoints`): transport, body, answer, headers."""
    g = p.add_argument_group(
        f"endpoints ({what}: http(s)://host:port/..., or TorchServe's gRPC API, grpc://host:7070/<model>)"
    )
    g.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default 30)")
    g.add_argument("--batch-size", type=int, default=64, help="rows per request with {{rows}} (default 64)")
    g.add_argument(
        "--request-template",
        metavar="TEMPLATE",
        help="the request body as JSON text (or @FILE.json) with one placeholder where the inputs go: {{rows}} "
        "for a list of rows, {{row}} for one request per row, e.g. '{\"instances\": {{rows}}}' (default: "
        '{"inputs": {{rows}}} over HTTP, {{row}} over gRPC)',
    )
    g.add_argument(
        "--response-path",
        metavar="PATH",
        help="where the scores or labels are in each answer: keys joined by dots, [N] indexes, [*] for every "
        'element of a list, ["odd.key"] quoted keys, . the whole answer; e.g. predictions[*].probs, or label '
        "with {{row}} (default auto: outputs in an object, else the whole answer)",
    )
    g.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="sent with every request (HTTP header, gRPC metadata), e.g. an API key; repeat for each; "
        "values are never printed",
    )
    g.add_argument(
        "--grpc-input-key",
        default="data",
        metavar="KEY",
        help="the key of TorchServe's gRPC input map that carries the request body (default data)",
    )


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``activeguard audit …`` and the ``audit`` evaluation suite (entry point ``activeguard.commands``)."""
    add_evaluation_suite("audit", "IPGuard/CEM/TAFA tables", cmd_evaluate)
    add_evaluation_suite(
        "tafa", "TAFA's three scenarios alone (no IPGuard margin sweep, no CEM ensemble to train)", cmd_evaluate_tafa
    )
    add_evaluation_suite(
        "families",
        "calibrated verdicts on five model families the audits were not built on (1-D conv, GRU, LayerNorm MLP, "
        "separable CNN, tanh CNN): independent models accused and copies flagged",
        cmd_evaluate_families,
    )
    add_evaluation_suite(
        "extraction",
        "licensed users extract the bundled model (Knockoff- and JBDA-style) through the guard with the answer "
        "watermark on: who the extraction audit names, false attributions, licensed users' accuracy loss",
        cmd_evaluate_extraction,
    )
    methods = METHOD_FLAGS
    audit = sub.add_parser(
        "audit",
        help="audit a suspect model for ownership: black-box fingerprints or the watermark",
        description="Judge whether a suspect model is a copy of yours. Black-box methods need only the "
        "suspect's outputs, from a local checkpoint or an endpoint "
        '(POST http://host:port/predictions/<name> with {"inputs": [...]}, any JSON API with --request-template '
        "and --response-path, or TorchServe's gRPC API at grpc://host:7070/<name>): first make a "
        "fingerprint of your model, then audit suspects against it.",
        epilog=EXIT_CODES,
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
            else "The points need no data: they are searched from random inputs in the model's input range "
            "(--data only trains the references)."
        )
        p = fp_sub.add_parser(
            name,
            help=method.help,
            description=f"{method.help}. {data_note} {CALIBRATION_NOTE}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add_model_arguments(
            p, help="the owner's model (" + MODEL_HELP_TAIL + "); its input spec is stored in the fingerprint"
        )
        p.add_argument("--out", required=True, type=Path, help="fingerprint file to write (e.g. owner.agfp)")
        if method.needs_data:
            add_data_argument(p, note=method.data_note + "; the references train on it too")
            p.add_argument("--dataset", dest="data", help=argparse.SUPPRESS)  # the flag's old name
        else:
            add_data_argument(p, note="the references train on it (the fingerprint's points need no data)")
            p.add_argument(
                "--task",
                choices=list(TASKS),
                default=None,
                help="what the model does, where its file cannot say (TorchScript, .pt2, state dict): "
                "regression and generation models answer raw outputs, compared as they are "
                "(default: what the file says, else classification)",
            )
        _add_reference_arguments(p)
        _add_transport_arguments(p, "--reference URLs")
        _add_flags(p, method.params)
        add_common(p)
        p.set_defaults(func=cmd_fingerprint)

    for name, method in methods.items():
        p = audit_sub.add_parser(
            name,
            help=f"audit a suspect with your {method.title} fingerprint",
            description=f"Query the suspect at the fingerprint's points and compare with the owner's model. The "
            f"{method.score_name} and its other statistics are judged against the fingerprint's null (its "
            "references' scores): a copy only when the chance that an independent model scores as high is at "
            "most --alpha.",
            epilog=EXIT_CODES,
        )
        p.add_argument(
            "--fingerprint", required=True, type=Path, help=f"file written by 'activeguard audit fingerprint {name}'"
        )
        _add_suspect_arguments(p)
        _add_alpha_argument(p)
        _add_flags(p, method.score)
        _add_transport_arguments(p)
        add_common(p, seed=False)
        p.set_defaults(func=cmd_verify)

    p = audit_sub.add_parser(
        "all",
        help="every method you have a fingerprint or key for, one combined verdict",
        description="Audit one suspect with every black-box fingerprint given (each judged against its own null) "
        "and, for a local suspect of your architecture, the watermark. Each method accuses at --alpha divided by "
        "the number of methods; the suspect is a copy when any method says so, not a copy when every method "
        "says so, else inconclusive. --json lists each method's score, null, chance bound and evidence.",
        epilog=EXIT_CODES,
    )
    p.add_argument(
        "--fingerprint", action="append", default=[], type=Path, help="a fingerprint file (repeat for each method)"
    )
    _add_suspect_arguments(p)
    p.add_argument(
        "--key",
        type=Path,
        help="your encrypted watermark key (.agkey): adds the white-box check (not applicable, with the reason, "
        "to a suspect of another architecture)",
    )
    add_owner_argument(p)
    add_passphrase(p)
    _add_alpha_argument(p, ", divided among the methods")
    for method in methods.values():
        _add_flags(p, method.score)
    _add_transport_arguments(p)
    add_common(p, seed=False)
    p.set_defaults(func=cmd_all)

    p = add_extraction_parser(audit_sub, _add_suspect_arguments, _add_transport_arguments, add_common)
    p.set_defaults(func=cmd_extraction_audit)

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
