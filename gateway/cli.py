"""`activeguard gateway` and `activeguard gateway init`: registered into the core CLI by entry point.

Building the parser imports nothing beyond the standard library (``--help`` answers at once); the
commands import the gateway (grpc, the credentials) when they run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import zipfile
from pathlib import Path

DEFAULT_UPSTREAM = "127.0.0.1:7070"  # TorchServe's gRPC inference API under `activeguard serve`
DEFAULT_HTTP_UPSTREAM = "http://127.0.0.1:8080"  # and its HTTP inference API
DEFAULT_METRICS_PORT = 9471  # as the Kubernetes manifests (deploy/kubernetes/base/gateway.yaml)
PROFILE_FILE = "activeguard-profile.json"  # activeguard.guard.profile.PROFILE_FILE, inside a packaged .mar
MODEL_ID = re.compile(r"[0-9a-f]{64}")


def cmd_gateway(args: argparse.Namespace) -> int:
    import logging

    from activeguard.credentials.licenses import export_public_key
    from gateway.server import serve
    from gateway.service import GatewayConfig

    if not args.config:
        raise ValueError("give --config gateway.json (`activeguard gateway init` writes one)")
    logging.basicConfig(
        level=args.log_level, format='{"time":"%(asctime)s","level":"%(levelname)s","msg":"%(message)s"}'
    )
    config = GatewayConfig.from_json(Path(args.config))
    if args.export_public_key:
        kid, created = export_public_key(config.signing_key, args.export_public_key)
        print(
            f"{'created' if created else 'loaded'} {config.signing_key} (key id {kid}); public key written to "
            f"{args.export_public_key} (give it to `activeguard package --gateway-key`)"
        )
        return 0
    return serve(
        config,
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,  # None: the config's metrics_port
        ready_file=Path(args.ready_file) if args.ready_file else None,
    )


def model_id_of(path: Path, model_file: Path | None = None, model_class: str | None = None) -> str:
    """The model id of a model file (any source, as `license register` computes it) or of a packaged or
    protected ``.mar`` (its protection profile's)."""
    if path.suffix == ".mar":
        if not zipfile.is_zipfile(path):
            raise ValueError(f"{path} is not a TorchServe archive (not a zip file)")
        with zipfile.ZipFile(path) as archive:
            if PROFILE_FILE not in archive.namelist():
                raise ValueError(
                    f"{path} holds no ActiveGuard profile (not built by `activeguard package` or `protect`): "
                    "give the model file with --model, or --model-id"
                )
            return str(json.loads(archive.read(PROFILE_FILE))["model_id"])
    from activeguard.models import sources

    return sources.load(path, sources.SourceOptions(model_file, model_class)).model_id


def cmd_init(args: argparse.Namespace) -> int:
    from gateway.service import GatewayConfig

    out = Path(args.out)
    if out.exists() and not args.force:
        raise ValueError(f"{out} exists: give --force to overwrite it")
    model_id = args.model_id or model_id_of(Path(args.model), args.model_file, args.model_class)
    if not MODEL_ID.fullmatch(model_id):
        raise ValueError(f"model id {model_id!r} is not a sha256 (64 lower-case hex digits)")
    http = args.http_upstream if args.http_upstream is not None else [DEFAULT_HTTP_UPSTREAM]
    model = {
        "name": args.name,
        "model_id": model_id,
        "upstreams": args.upstream or [DEFAULT_UPSTREAM],
        "http_upstreams": [] if http == ["none"] else http,
    }
    # every key, the ones not given here at their defaults, so the file shows what can be tuned
    defaults = {f.name: f.default for f in dataclasses.fields(GatewayConfig) if f.default is not dataclasses.MISSING}
    doc = {
        "models": [model],
        "signing_key": args.signing_key,
        "license_server": args.license_server,
        "revocation_file": args.revocation_file,
        "metrics_port": args.metrics_port,
        **{k: v for k, v in defaults.items() if k not in ("license_server", "revocation_file", "metrics_port")},
        "license_keys_pem": [],
    }
    text = json.dumps(doc, indent=2) + "\n"
    GatewayConfig.from_json_text(text)  # what the gateway will read: refuse a file it would refuse
    out.write_text(text)
    if args.json:
        print(text, end="")
    else:
        upstreams = ", ".join(model["upstreams"] + model["http_upstreams"])
        print(
            f"wrote {out}: model {args.name} (id {model_id[:16]}…) served by {upstreams}; license server "
            f"{args.license_server}, revocation file {args.revocation_file}, signing key {args.signing_key}, "
            f"metrics on port {args.metrics_port}"
        )
    return 0


def add_init_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="gateway.json", metavar="FILE", help="the file to write (default gateway.json)")
    p.add_argument("--force", action="store_true", help="overwrite FILE if it exists (default: refuse)")
    p.add_argument("--name", required=True, help="the model's name, as clients and TorchServe call it (e.g. mnist)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--model",
        metavar="MODEL",
        help="read the model id from this file: the model (checkpoint, TorchScript, .pt2, or a state dict with "
        "--model-file), or its .mar from `activeguard package` or `protect`",
    )
    which.add_argument(
        "--model-id", metavar="SHA256", help="the model id, as `activeguard license register` printed it"
    )
    p.add_argument("--model-file", type=Path, metavar="FILE.py", help="network code, for a state dict --model")
    p.add_argument("--model-class", metavar="NAME", help="the network class in --model-file")
    p.add_argument(
        "--upstream",
        action="append",
        metavar="HOST:PORT",
        help=f"a TorchServe gRPC inference address; repeat for each (default {DEFAULT_UPSTREAM})",
    )
    p.add_argument(
        "--http-upstream",
        action="append",
        metavar="URL",
        help=f"a TorchServe HTTP inference address for Predict; repeat for each (default {DEFAULT_HTTP_UPSTREAM}; "
        "'none': Predict goes over gRPC too)",
    )
    p.add_argument(
        "--signing-key",
        default="gateway.key",
        metavar="PATH",
        help="the gateway's Ed25519 key file, created 0600 on first use (default gateway.key)",
    )
    p.add_argument(
        "--license-server",
        default="127.0.0.1:50061",
        metavar="HOST:PORT",
        help="the license server, for its keys and revocations (default 127.0.0.1:50061)",
    )
    p.add_argument(
        "--revocation-file",
        default="revoked.txt",
        metavar="PATH",
        help="where the gateway writes the signed revocation list for the handlers on this host "
        "(package --revocation-file; default revoked.txt)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=DEFAULT_METRICS_PORT,
        help=f"the gateway's Prometheus port, stored in the file (default {DEFAULT_METRICS_PORT}; 0: any free port)",
    )
    p.add_argument("--json", action="store_true", help="print the file written")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "gateway",
        help="run the gRPC gateway (licenses -> sessions -> TorchServe); 'gateway init' writes its config",
        description="Run the gateway with --config, or write that config with `activeguard gateway init`.",
    )
    p.add_argument(
        "--config",
        help="JSON: models [{name, model_id, upstreams (TorchServe gRPC host:port), http_upstreams "
        "(optional TorchServe http://host:port for Predict)}], signing_key, license_server, "
        "revocation_file, metrics_port, session_ttl_s, poll_interval_s, max_revocation_staleness_s (fail closed: "
        "no new sessions while the revocation list is older), upstream_deadline_s, "
        "rate_per_user_per_s, max_sessions_per_user, max_payload_bytes (the largest payload Predict forwards); "
        "`activeguard gateway init` writes one",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50071, help="0: any free port (see --ready-file)")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="Prometheus endpoint (default: the config's metrics_port, else any free port; 0: any free port)",
    )
    p.add_argument("--ready-file", help="write {pid, port, metrics_port} here once serving")
    p.add_argument("--log-level", default="INFO")
    p.add_argument(
        "--export-public-key",
        metavar="PEM",
        help="create the signing key if needed, write its public half here, and exit",
    )
    p.set_defaults(func=cmd_gateway)
    actions = p.add_subparsers(dest="gateway_command", metavar="ACTION")
    init = actions.add_parser(
        "init",
        help="write a gateway.json for one model (refuses to overwrite without --force)",
        description="Write the gateway's config for one model: its name and id (read from the model file or "
        "given), TorchServe's addresses, the license server, the revocation file, the signing key and the "
        "metrics port, with every other key at its default. More models: add entries to 'models'.",
    )
    add_init_arguments(init)
    init.set_defaults(func=cmd_init)
