"""`activeguard gateway`: registered into the core CLI by entry point."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from activeguard.credentials.licenses import export_public_key
from gateway.server import serve
from gateway.service import GatewayConfig


def cmd_gateway(args: argparse.Namespace) -> int:
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
        metrics_port=args.metrics_port,
        ready_file=Path(args.ready_file) if args.ready_file else None,
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gateway", help="run the gRPC gateway (licenses -> sessions -> TorchServe)")
    p.add_argument(
        "--config",
        required=True,
        help="JSON: models [{name, model_id, upstreams (TorchServe gRPC host:port), http_upstreams "
        "(optional TorchServe http://host:port for Predict)}], signing_key, license_server, "
        "revocation_file, session_ttl_s, poll_interval_s, max_revocation_staleness_s (fail closed: "
        "no new sessions while the revocation list is older), upstream_deadline_s, "
        "rate_per_user_per_s, max_sessions_per_user",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50071, help="0: any free port (see --ready-file)")
    p.add_argument("--metrics-port", type=int, default=0, help="Prometheus endpoint; 0 picks a free port")
    p.add_argument("--ready-file", help="write {pid, port, metrics_port} here once serving")
    p.add_argument("--log-level", default="INFO")
    p.add_argument(
        "--export-public-key",
        metavar="PEM",
        help="create the signing key if needed, write its public half here, and exit",
    )
    p.set_defaults(func=cmd_gateway)
