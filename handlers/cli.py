"""`activeguard package` and `activeguard serve`, registered into the core CLI by entry point."""

from __future__ import annotations

import argparse
import json
import re
import secrets
import signal
import sys
import threading
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from activeguard.cli.support import (
    ANSWER_MARGIN,
    MAX_BODY_BYTES,
    MAX_ROWS,
    MONITOR_COOLDOWN_S,
    MONITOR_DELTA,
    MONITOR_MAX_LICENSES,
    MONITOR_MIN_QUERIES,
    MONITOR_POLICIES,
    PAPER_EPSILON,
    POLICIES,
    STALE_POLICIES,
    UsageError,
    add_fo_space_arguments,
    add_model_arguments,
    add_spec_arguments,
    load_model_argument,
    parse_floats,
    spec_overrides,
)

if TYPE_CHECKING:  # the commands import what they use when they run: building the parser loads no torch
    from activeguard.guard.profile import Profile

DEFAULT_STORE = Path("model_store")
DEFAULT_LOG_DIR = Path("logs/torchserve")
DEFAULT_JOURNAL = "answer-journal"


def _pem(path: str) -> tuple[str, str]:
    from activeguard.credentials.licenses import key_id, load_public_key, public_key_pem

    key = load_public_key(path)
    return key_id(key), public_key_pem(key).decode()


def _profile(args: argparse.Namespace, loaded) -> Profile:
    """The protection profile the flags describe, for ``loaded`` (validated before anything is built)."""
    from activeguard.credentials.control import configured
    from activeguard.guard.profile import Profile
    from handlers.packaging import classes_of

    keys = dict(_pem(p) for p in args.license_key)
    if not keys and not args.paper_mode:
        print(
            "warning: no --license-key given: only paper-mode fingerprints or gateway sessions can authenticate",
            file=sys.stderr,
        )
    control = configured(
        classes_of(loaded),
        scheme=args.fo_scheme,
        confidences=parse_floats(args.confidences),
        runner_up_confidences=parse_floats(args.runner_up_confidences),
        epsilon=args.epsilon,
        policy=args.policy,
        paper_mode=args.paper_mode,
    )
    return Profile(
        model_id=loaded.model_id,
        input_shape=loaded.spec.shape,
        num_classes=control.num_classes,
        confidences=control.confidences,
        runner_up_confidences=control.runner_up_confidences,
        epsilon=args.epsilon,
        policy=args.policy,
        paper_mode=args.paper_mode,
        license_public_keys=keys,
        gateway_public_key=_pem(args.gateway_key)[1] if args.gateway_key else None,
        revocation_file=str(Path(args.revocation_file).resolve()) if args.revocation_file else None,
        revocation_server=args.revocation_server,
        revocation_refresh_s=args.revocation_refresh_s,
        revocation_max_age_s=args.revocation_max_age_s,
        revocation_stale_policy=args.revocation_stale_policy,
        max_rows=getattr(args, "max_rows", MAX_ROWS),  # package only: under protect the owner's handler reads
        max_body_bytes=getattr(args, "max_body_bytes", MAX_BODY_BYTES),
        control_secret=secrets.token_hex(32),
        source=loaded.source.name,
        input_spec=loaded.spec.to_dict(),
        model_class=loaded.model_class,
        **_answer_watermark(args),
    ).validated()


def _answer_watermark(args: argparse.Namespace) -> dict:
    """The answer watermark's, the extraction monitor's and the journal's profile fields; the watermark's
    key file is created (0600) on first use. The journal (usage, alerts, answer records) is kept when the
    watermark or the monitor is on, or --answer-journal is given."""
    fields = {**_extraction_monitor(args), **_watermark_fields(args)}
    if fields or args.answer_journal is not None:
        fields["answer_journal_dir"] = str(Path(args.answer_journal or DEFAULT_JOURNAL).resolve())
    return fields


def _extraction_monitor(args: argparse.Namespace) -> dict:
    if args.extraction_monitor == "off":
        return {}
    fields = {
        "extraction_monitor": args.extraction_monitor,
        "extraction_delta": args.extraction_delta,
        "extraction_min_queries": args.extraction_min_queries,
        "extraction_cooldown_s": args.extraction_cooldown_s,
        "extraction_max_licenses": args.extraction_max_licenses,
    }
    from activeguard.guard.monitor import MonitorSettings

    try:
        MonitorSettings(
            args.extraction_monitor,
            args.extraction_delta,
            args.extraction_min_queries,
            cooldown_s=args.extraction_cooldown_s,
            max_licenses=args.extraction_max_licenses,
        ).validated()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return fields


def _watermark_fields(args: argparse.Namespace) -> dict:
    if args.answer_watermark is None:
        return {}
    from activeguard.watermark.answers import create_secret_file

    key = Path(args.answer_watermark).resolve()
    if not key.exists():
        create_secret_file(key)
        print(f"created answer watermark key {key} (0600): keep it, `audit extraction --key` checks records with it")
    if not args.answer_margin > 0:
        raise UsageError(f"--answer-margin must be positive, got {args.answer_margin}")
    return {
        "answer_watermark_margin": args.answer_margin,
        "answer_key_file": str(key),
    }


def _report(args: argparse.Namespace, mar: Path, profile: Profile) -> None:
    payload = {
        "mar": str(mar),
        "model_id": profile.model_id,
        "source": profile.source,
        "input": profile.input_spec,
        "handler": profile.owner_handler or "activeguard (JSON/.npy tensors)",
        "policy": profile.policy,
        "paper_mode": profile.paper_mode,
        "fo_scheme": profile.control.space.scheme,
        "capacity": profile.control.num_users,
        "license_keys": sorted(profile.license_public_keys),
        "answer_journal": profile.answer_journal_dir,
        "extraction_monitor": profile.extraction_monitor,
    }
    print(
        json.dumps(payload, indent=2)
        if args.json
        else f"wrote {mar} ({profile.source} model {profile.model_id[:16]}…, input {list(profile.input_shape)}, "
        f"handler {payload['handler']}, {payload['fo_scheme']} FO space for {payload['capacity']} users)"
    )


def cmd_package(args: argparse.Namespace) -> int:
    from handlers.packaging import package_model

    loaded = load_model_argument(args)
    profile = _profile(args, loaded)
    _report(args, package_model(loaded, profile, args.name, Path(args.store)), profile)
    return 0


def cmd_protect(args: argparse.Namespace) -> int:
    from handlers.packaging import protect

    mar, profile = protect(
        Path(args.mar), lambda loaded: _profile(args, loaded), Path(args.out_dir), spec_overrides(args), args.name
    )
    _report(args, mar, profile)
    return 0


MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # a name that fits TorchServe's URLs (/predictions/NAME)


def served_models(specs: list[str], store: Path) -> dict[str, str]:
    """``NAME`` or ``NAME=FILE.mar`` → {NAME: FILE.mar}; each archive is served under the NAME given, whatever
    name its manifest holds. A name given twice, a name TorchServe cannot serve, or an archive that is
    missing or not a zip is refused here, before TorchServe starts."""
    models: dict[str, str] = {}
    given: dict[str, str] = {}
    for spec in specs:  # names first: a collision is the first thing to say
        name, sep, mar = spec.partition("=")
        mar = mar if sep else f"{name}.mar"
        if not MODEL_NAME.fullmatch(name):
            raise UsageError(f"{spec!r}: a model NAME is letters, digits, '_', '-' and '.' (as in NAME=FILE.mar)")
        if name in models:
            raise UsageError(
                f"model name {name!r} is given twice ({given[name]} and {spec}): TorchServe serves one archive per "
                f"name; give each its own, e.g. {name}={models[name]} {name}-2={mar}"
            )
        if not mar or "," in mar or "=" in mar:
            raise UsageError(f"{spec!r}: give NAME=FILE.mar, FILE.mar a file name without ',' or '='")
        models[name], given[name] = mar, spec
    for name, mar in models.items():
        path = store / mar
        if "://" in mar:  # a URL: TorchServe fetches it
            continue
        if not path.exists():
            raise UsageError(f"{path} does not exist (serve {given[name]}: FILE.mar is looked for in --store {store})")
        if path.suffix == ".mar" and not zipfile.is_zipfile(path):
            raise UsageError(
                f"{path} is not a TorchServe archive (not a zip file): build it again with "
                "`activeguard package`, `activeguard protect` or torch-model-archiver"
            )
    return models


def cmd_serve(args: argparse.Namespace) -> int:
    from handlers.server import ManagedTorchServe, Ports

    models = served_models(args.model, Path(args.store))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    ports = Ports.choose(
        args.http_port, args.management_port, args.metrics_port, args.grpc_port, args.grpc_management_port
    )
    ts = ManagedTorchServe(
        Path(args.store),
        models,
        workers=args.workers,
        batch_size=args.batch_size,
        max_batch_delay_ms=args.max_batch_delay,
        ports=ports,
        log_dir=Path(args.log_dir),
        owner_config=Path(args.config) if args.config else None,
    )
    with ts:
        info = {
            "inference": ts.url,
            "management": ts.management_url,
            "metrics": ts.metrics_url,
            "grpc": ts.grpc_target,
            "models": sorted(models),
            "logs": str(ts.log_dir),
        }
        print(
            json.dumps(info)
            if args.json
            else "TorchServe ready:\n" + "\n".join(f"  {k}: {v}" for k, v in info.items()),
            flush=True,
        )
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
    print(f"TorchServe stopped; its logs are in {ts.log_dir}", file=sys.stderr)
    return 0


def _add_protection_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", default="random", choices=POLICIES, help="answer for unauthorized requests")
    p.add_argument(
        "--paper-mode", action="store_true", help="also admit bare fingerprints (forgeable; reproduction only)"
    )
    add_fo_space_arguments(p, "the license server's registration of the model (activeguard license register)")
    p.add_argument("--epsilon", type=float, default=PAPER_EPSILON)
    p.add_argument(
        "--license-key",
        action="append",
        default=[],
        metavar="PEM",
        help="license server public key (repeat while keys rotate)",
    )
    p.add_argument("--gateway-key", metavar="PEM", help="gateway public key whose session tokens are trusted")
    g = p.add_argument_group(
        "revocation (enforced by TorchServe alone): a list signed by the license server, verified by the handler"
    )
    source = g.add_mutually_exclusive_group()
    source.add_argument(
        "--revocation-server",
        metavar="HOST:PORT",
        help="the license server's gRPC address: each worker fetches its signed revocation list every "
        "--revocation-refresh-s seconds",
    )
    source.add_argument(
        "--revocation-file",
        metavar="FILE",
        help="a signed revocation list file, checked on every batch: the one the gateway rewrites on every sync, "
        "or one `activeguard license revocations --out FILE` exported (air-gapped deployments)",
    )
    g.add_argument("--revocation-refresh-s", type=float, default=5.0, help="seconds between fetches (default 5)")
    g.add_argument(
        "--revocation-max-age-s",
        type=float,
        default=300.0,
        help="past this age of the newest list the handler holds, --revocation-stale-policy applies (default 300)",
    )
    g.add_argument(
        "--revocation-stale-policy",
        choices=STALE_POLICIES,
        default="refuse",
        help="refuse (default: fail closed, every licensed request is refused as revocation_list_stale until a "
        "fresh list arrives) or serve (keep serving on the last list)",
    )
    _add_answer_watermark_arguments(p)
    _add_extraction_monitor_arguments(p)


ANSWER_WATERMARK_HELP = (
    "answer watermark: name the licensed user who extracts the model (activeguard audit extraction). Off by "
    "default: it changes answers where the model is unsure (measured on the bundled MNIST model: 1.0% of "
    "answers, 0.6 points of accuracy) and keeps those inputs, which may be your users' data, in a journal"
)


def _add_answer_watermark_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(ANSWER_WATERMARK_HELP)
    g.add_argument(
        "--answer-watermark",
        metavar="KEYFILE",
        help="turn it on with this owner secret (created 0600 if missing; it must exist on every serving host)",
    )
    g.add_argument(
        "--answer-journal",
        metavar="DIR",
        help="where each worker journals its answers in the band, its alerts and each license's usage (rows served "
        "and refused), for the license server to ingest (default ./answer-journal when the watermark or the "
        "extraction monitor is on; given alone, the journal holds usage only; made absolute)",
    )
    g.add_argument(
        "--answer-margin",
        type=float,
        default=ANSWER_MARGIN,
        metavar="NATS",
        help="the band: answers whose runner-up class is within this log-probability of the top class (default "
        "ln 3 = 1.099: the runner-up has at least a third of the top's probability); wider names extractors "
        "sooner and costs licensed users more accuracy",
    )


EXTRACTION_MONITOR_HELP = (
    "extraction monitor: PRADA's test (Shapiro-Wilk on the distances between each license's queries) per license "
    "in each worker. Off by default: it keeps a sketch of each license's recent queries in worker memory (at most "
    "--extraction-max-licenses x classes x 200 x 1 KiB) and a policy that refuses a license should be the owner's "
    "choice. Measured on the bundled MNIST model: a JBDA-style stream flagged within 1,216 queries, 0 of 20 benign "
    "streams (docs/results.md)"
)


def _add_extraction_monitor_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(EXTRACTION_MONITOR_HELP)
    g.add_argument(
        "--extraction-monitor",
        choices=MONITOR_POLICIES,
        default="off",
        help="what a flag does: alert (counted, an alert in the journal), throttle (the license's rows are refused "
        "as extraction_throttled, HTTP 429, for --extraction-cooldown-s), suspend (an alert that makes the license "
        "server revoke the license; the worker refuses it as extraction_suspended meanwhile); default off",
    )
    g.add_argument(
        "--extraction-delta",
        type=float,
        default=MONITOR_DELTA,
        metavar="W",
        help=f"flag a license when the Shapiro-Wilk W of its distances falls below this (default {MONITOR_DELTA}; "
        "benign MNIST streams stay above 0.97)",
    )
    g.add_argument(
        "--extraction-min-queries",
        type=_positive_int,
        default=MONITOR_MIN_QUERIES,
        metavar="N",
        help=f"distances a license needs before it is tested, and again after each flag (default {MONITOR_MIN_QUERIES})",
    )
    g.add_argument(
        "--extraction-cooldown-s",
        type=float,
        default=MONITOR_COOLDOWN_S,
        metavar="S",
        help=f"how long a flagged license is refused under throttle (default {MONITOR_COOLDOWN_S:g})",
    )
    g.add_argument(
        "--extraction-max-licenses",
        type=_positive_int,
        default=MONITOR_MAX_LICENSES,
        metavar="N",
        help=f"licenses each worker tracks; the least recently seen is forgotten (default {MONITOR_MAX_LICENSES})",
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


PACKAGE_LIMITS = (
    f"Limits: the handler refuses (400, reason malformed_input) a request of more than --max-rows rows (default "
    f"{MAX_ROWS}) and a body of more than --max-body-bytes bytes (default {MAX_BODY_BYTES}, 4 MiB; checked before "
    "the body is parsed). `activeguard serve` lets TorchServe take bodies of up to 32 MiB, so that the handler, "
    "not TorchServe, answers an oversized one (a larger --max-body-bytes also needs max_request_size in serve "
    "--config). Through the gateway the same limits apply: it forwards a tensor (up to 8,388,608 float32 values) "
    "to this handler as .npy bytes."
)
PROTECT_LIMITS = (
    "Limits: your handler reads the payloads, so the tensor handler's row and body limits (package --max-rows, "
    "--max-body-bytes) do not apply; TorchServe's max_request_size bounds a body (`activeguard serve`: 32 MiB, "
    "or your --config's; TorchServe's own default is 6.5 MB) and the gateway forwards payloads of up to its "
    "max_payload_bytes (32 MiB)."
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "package",
        help="build a TorchServe .mar with the ActiveGuard handler and a protection profile",
        description='Build STORE/NAME.mar: the model, ActiveGuard\'s tensor handler (JSON {"inputs": ...} or '
        ".npy bodies) and the protection profile (model id, FO space, policy, trusted keys, revocation source).",
        epilog=PACKAGE_LIMITS,
    )
    add_model_arguments(p)
    p.add_argument("--name", required=True, help="model name in TorchServe (and of the .mar file)")
    p.add_argument("--store", default=str(DEFAULT_STORE), help="output folder (default model_store/)")
    _add_protection_arguments(p)
    g = p.add_argument_group("request limits (the handler refuses more, 400 malformed_input)")
    g.add_argument(
        "--max-rows",
        type=_positive_int,
        default=MAX_ROWS,
        metavar="N",
        help=f"rows per request (default {MAX_ROWS})",
    )
    g.add_argument(
        "--max-body-bytes",
        type=_positive_int,
        default=MAX_BODY_BYTES,
        metavar="BYTES",
        help=f"bytes of a request body (default {MAX_BODY_BYTES}: 4 MiB; TorchServe under `serve` takes up to 32 MiB)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_package)

    p = sub.add_parser(
        "protect",
        help="protect an existing TorchServe archive: same model, handler and payloads, plus licenses",
        description="Write a protected copy of IN.mar: the owner's model, handler, extra files and manifest "
        "settings are kept; ActiveGuard's handler becomes the entry point and composes with the owner's "
        "(its preprocess reads client payloads, licensed requests' fingerprints join the same forward pass, "
        "refused requests get random outputs through the owner's postprocess, or 403 under --policy reject). "
        "Clients send what they sent before, plus the license header X-ActiveGuard-License (or a "
        "'license' entry in TorchServe's gRPC input map).",
        epilog=PROTECT_LIMITS,
    )
    p.add_argument("mar", metavar="IN.mar", help="the owner's archive, as torch-model-archiver wrote it")
    p.add_argument(
        "--out-dir",
        default=str(DEFAULT_STORE),
        metavar="STORE",
        help="model store for the protected .mar (default model_store/)",
    )
    p.add_argument("--name", help="model name of the protected archive (default: the archive's own)")
    _add_protection_arguments(p)
    add_spec_arguments(
        p.add_argument_group(
            "model input (only where the model file does not say): what the owner's preprocess hands the "
            "model, before --normalize"
        )
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_protect)

    p = sub.add_parser(
        "serve",
        help="run a local TorchServe on 127.0.0.1 until Ctrl-C",
        description="Start TorchServe on 127.0.0.1 with the archives given, wait until each has a READY worker, "
        "print the endpoints and serve until Ctrl-C or SIGTERM. A start that fails prints what TorchServe "
        "said (its errors and exceptions) and exits 1; the logs stay in --log-dir.",
    )
    p.add_argument(
        "model",
        nargs="+",
        metavar="NAME[=FILE.mar]",
        help="serve FILE.mar from the store as NAME (POST /predictions/NAME), whatever model name its manifest "
        "holds, so archives that share one are served side by side; NAME alone serves NAME.mar. Each NAME once",
    )
    p.add_argument("--store", default=str(DEFAULT_STORE))
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batch-delay", type=int, default=5, help="milliseconds to wait to fill a batch")
    for flag, default, what in (
        ("--http-port", 8080, "inference HTTP API (POST /predictions/NAME)"),
        ("--grpc-port", 7070, "inference gRPC API (the gateway's upstream)"),
        ("--management-port", 8081, "management API"),
        ("--metrics-port", 8082, "Prometheus metrics"),
        ("--grpc-management-port", 7071, "management gRPC API"),
    ):
        p.add_argument(
            flag, type=int, default=default, help=f"{what}; default {default} (TorchServe's), 0: any free port"
        )
    p.add_argument(
        "--log-dir",
        default=str(DEFAULT_LOG_DIR),
        metavar="DIR",
        help=f"where TorchServe's logs go and stay after it stops (default {DEFAULT_LOG_DIR}/ "
        "in the current directory; appended to across runs)",
    )
    p.add_argument(
        "--config",
        metavar="config.properties",
        help="your deployment's TorchServe config: its settings (service_envelope, models' batch sizes and "
        "workers, limits, ...) are kept, except where it listens, the store and models to load, and token "
        "auth (off: licenses authenticate clients)",
    )
    p.add_argument("--json", action="store_true", help="print the endpoints and the log directory as JSON once ready")
    p.set_defaults(func=cmd_serve)
