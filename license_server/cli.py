"""Command line of the license server and its admin client.

    activeguard-license-server serve --data-dir DIR [--database-url URL] [--port 50061] [--metrics-port 9461]
    activeguard-license-server create-token --hash-file DIR/admin_token.sha256 --token-out admin.token
    activeguard-license-server register --model MODEL [--model-file F.py] [--input-shape S] [--upload]
        [--fo-scheme ranked|paper] [--pregenerate [--pregenerate-count N]]
    activeguard-license-server pregenerate --data-dir DIR --model-id ID --count 10000   (offline, with a bar)
    activeguard-license-server issue --model-id ID --user NAME [--validity-days 365] --out alice.aglicense
    activeguard-license-server revoke LICENSE_ID [--reason TEXT]
    activeguard-license-server list [--model-id ID] [--user NAME] [--state active|revoked|expired]
    activeguard-license-server show LICENSE_ID [--out FILE.aglicense]
    activeguard-license-server verify FILE.aglicense [--model-id ID]

Client commands reach a TLS server with ``--ca-cert CA.pem`` (or ``--tls`` for the system's roots)
and an mTLS server with ``--client-cert``/``--client-key`` as well; ``serve`` takes ``--tls-cert``,
``--tls-key`` and, for mTLS, ``--tls-client-ca``.

Entry points for the ``activeguard`` CLI: :func:`register` (the ``activeguard.commands`` plugin
hook: adds ``activeguard license-server`` and ``activeguard license issue|revoke|list|show|verify``),
or call :func:`server_main` / :func:`license_main` with an argv list directly.
The admin token comes from ``--token-file`` or ``$ACTIVEGUARD_ADMIN_TOKEN``, never from the
command line; a database URL with a password is best passed as ``$ACTIVEGUARD_LICENSE_DB``.
Exit codes: 0 ok, 1 refused or failed, 2 usage or input error.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from activeguard.cli.support import (
    ArgumentParser,
    UsageError,
    add_fo_space_arguments,
    add_model_arguments,
    load_model_argument,
    parse_floats,
)
from activeguard.runtime.processes import write_ready_file

DB_ENV = "ACTIVEGUARD_LICENSE_DB"
STATES = {"active": 1, "revoked": 2, "expired": 3}
_USAGE_CODES = {"INVALID_ARGUMENT", "NOT_FOUND", "UNAUTHENTICATED", "ALREADY_EXISTS", "FAILED_PRECONDITION"}


# -- serve ----------------------------------------------------------------------------------------


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default="license-data", help="key, token hash, uploaded models, SQLite file")
    p.add_argument(
        "--database-url",
        default=None,
        help=f"SQLAlchemy URL (default: SQLite in the data dir; or ${DB_ENV}), "
        "e.g. postgresql+psycopg://user@127.0.0.1:5432/db",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50061, help="0: any free port (see --ready-file)")
    p.add_argument("--metrics-port", type=int, default=9461, help="Prometheus endpoint; -1 disables, 0 any free port")
    p.add_argument(
        "--metrics-host", default="127.0.0.1", help="address the Prometheus endpoint binds (0.0.0.0 in a pod)"
    )
    p.add_argument(
        "--register-pool",
        type=int,
        default=100,
        metavar="N",
        help="fingerprints every registration starts pre-generating in the background, a small batch first, so "
        "a new model's first licenses come from the pool within seconds (default 100; 0: none, every license "
        "generated on demand until `license register --pregenerate` or `pregenerate`)",
    )
    p.add_argument("--signing-key", default=None, help="Ed25519 PEM key (created 0600 on first start)")
    p.add_argument(
        "--admin-token-hash-file",
        default=None,
        help=f"sha256 of the admin token (default DATA_DIR/admin_token.sha256; created with a new "
        f"token in DATA_DIR/admin.token if missing, or from ${'ACTIVEGUARD_ADMIN_TOKEN'})",
    )
    p.add_argument("--default-validity-days", type=float, default=365.0)
    p.add_argument("--tls-cert", default=None, help="serve TLS with this PEM certificate (chain); needs --tls-key")
    p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert (keep it 0600)")
    p.add_argument(
        "--tls-client-ca",
        default=None,
        help="mTLS: refuse clients without a certificate signed by this PEM CA (needs --tls-cert/--tls-key)",
    )
    p.add_argument(
        "--answer-journal",
        action="append",
        default=[],
        metavar="DIR",
        help="a directory of answer journals (the protection profile's answer_journal_dir) to ingest into the database: "
        "answer records for the extraction audit, usage and alerts per license; a suspend alert revokes its "
        "license (repeat for several directories)",
    )
    p.add_argument("--journal-poll-s", type=float, default=5.0, help="seconds between journal reads (default 5)")
    add_retention_argument(p)
    p.add_argument("--ready-file", default=None, help="write {pid, port, metrics_port, key_id} here once serving")
    p.add_argument("--max-steps", type=int, default=1000, help="fingerprint optimizer steps")
    p.add_argument("--log-level", default="INFO")
    p.add_argument(
        "--export-public-key",
        metavar="PEM",
        default=None,
        help="create the signing key if needed, write its public half here (for "
        "`activeguard package --license-key`), and exit",
    )


def add_retention_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--answer-retention-days",
        type=float,
        default=30.0,
        metavar="DAYS",
        help="delete answer records (users' inputs in the watermark's band) older than this (default 30; 0 keeps them)",
    )


def _signing_key_path(args: argparse.Namespace) -> Path:
    return Path(args.signing_key) if args.signing_key else Path(args.data_dir) / "signing_key.pem"


def export_key(args: argparse.Namespace) -> int:
    from activeguard.credentials.licenses import export_public_key

    data_dir = Path(args.data_dir)
    if not args.signing_key and not data_dir.exists():
        data_dir.mkdir(parents=True, mode=0o700)  # as the server would: it holds the private key
    kid, created = export_public_key(_signing_key_path(args), args.export_public_key)
    print(
        f"{'created' if created else 'loaded'} {_signing_key_path(args)} (key id {kid}); public key written to "
        f"{args.export_public_key} (give it to `activeguard package --license-key`)"
    )
    return 0


def serve(args: argparse.Namespace) -> int:
    from license_server.logs import configure_logging
    from license_server.server import LicenseServer

    if args.export_public_key:
        return export_key(args)
    try:
        config = _server_config(args)
    except ValueError as exc:  # half a TLS setup, or a period or retention out of range
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(args.log_level)
    server = LicenseServer(config).start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if args.ready_file:
        write_ready_file(
            args.ready_file, {"port": server.port, "metrics_port": server.metrics_port, "key_id": server.service.key_id}
        )
    while not stop.wait(0.5):
        pass
    server.stop()
    return 0


def _server_config(args: argparse.Namespace) -> Any:
    """The ServerConfig of ``serve``'s options (ValueError for an inconsistent TLS setup)."""
    from license_server.config import ServerConfig

    return ServerConfig(
        data_dir=Path(args.data_dir),
        database_url=args.database_url or os.environ.get(DB_ENV, ""),
        host=args.host,
        port=args.port,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        metrics_host=args.metrics_host,
        pregenerate_on_register=args.register_pool > 0,
        register_pool=max(1, args.register_pool),
        signing_key=Path(args.signing_key) if args.signing_key else None,
        admin_token_hash_file=Path(args.admin_token_hash_file) if args.admin_token_hash_file else None,
        default_validity=int(args.default_validity_days * 86400),
        tls_cert=args.tls_cert and Path(args.tls_cert),
        tls_key=args.tls_key and Path(args.tls_key),
        tls_client_ca=args.tls_client_ca and Path(args.tls_client_ca),
        max_steps=args.max_steps,
        answer_journals=tuple(Path(d) for d in args.answer_journal),
        journal_poll_seconds=args.journal_poll_s,
        answer_retention_days=args.answer_retention_days,
    )


def server_main(argv: list[str] | None = None) -> int:
    """``activeguard license-server [serve options]``: start the server in the foreground."""
    p = argparse.ArgumentParser(prog="activeguard license-server", description="run the gRPC license server")
    add_serve_arguments(p)
    return serve(p.parse_args(argv))


# -- admin client ---------------------------------------------------------------------------------


def _add_client(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default=None, help="host:port (default $ACTIVEGUARD_LICENSE_SERVER or 127.0.0.1:50061)")
    p.add_argument("--token-file", default=None, help="admin token file (default $ACTIVEGUARD_ADMIN_TOKEN)")
    p.add_argument(
        "--tls",
        action="store_true",
        help="connect over TLS, verifying the server with the system's CA roots (implied by --ca-cert)",
    )
    p.add_argument(
        "--ca-cert", default=None, help="connect over TLS, verifying the server's certificate with this PEM CA instead"
    )
    p.add_argument(
        "--client-cert", default=None, help="mTLS: PEM client certificate to present (needs --client-key; implies TLS)"
    )
    p.add_argument("--client-key", default=None, help="mTLS: PEM private key of --client-cert")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _client(args: argparse.Namespace):
    from license_server.client import LicenseClient, read_token

    return LicenseClient(
        args.server,
        read_token(args.token_file),
        tls=args.tls,
        ca_cert=args.ca_cert,
        client_cert=args.client_cert,
        client_key=args.client_key,
    )


def _license_dict(msg) -> dict[str, Any]:
    from activeguard_proto.v1 import license_pb2

    return {
        "license_id": msg.license_id,
        "model_id": msg.model_id,
        "user": msg.user,
        "fo_class": msg.fo.target_class,
        "fo_confidence": round(msg.fo.confidence, 6),
        "user_index": msg.fo.user_index,
        "issued_at": msg.issued_at,
        "expires_at": msg.expires_at,
        "key_id": msg.key_id,
        "state": license_pb2.LicenseState.Name(msg.state).removeprefix("LICENSE_STATE_").lower(),
        **({"revoked_at": msg.revoked_at, "revoke_reason": msg.revoke_reason} if msg.revoked_at else {}),
    }


def _human(d: dict[str, Any]) -> str:
    text = (
        f"{d['license_id']}  {d['state']:<7}  user={d['user']!r}  model={d['model_id'][:16]}  "
        f"FO=({d['fo_class']}, {d['fo_confidence']})  expires {_when(d['expires_at'])}"
    )
    if d.get("revoked_at"):
        text += f"  revoked {_when(d['revoked_at'])}: {d['revoke_reason']}"
    return text


def _emit(args, payload: Any, human: str) -> None:
    print(json.dumps(payload, indent=2) if args.json else human)


def _save_license(msg, out: str) -> Path:
    from activeguard.credentials.licenses import write_license
    from license_server.client import to_signed

    return write_license(to_signed(msg), out)


def cmd_register(args) -> int:
    """Load the model here first (any source; one-line errors, exit 2), then register exactly that:
    its id, its input spec and, for a state dict, its network's code go with the request."""
    loaded = load_model_argument(args)
    where = {"checkpoint": loaded.path.read_bytes()} if args.upload else {"model_path": str(loaded.path.resolve())}
    with _client(args) as c:
        resp = c.register_model(
            **where,
            name=args.name or "",
            pregenerate=args.pregenerate or bool(args.pregenerate_count),
            pregenerate_count=args.pregenerate_count or 0,
            fo_scheme=args.fo_scheme,
            confidences=parse_floats(args.confidences),
            runner_up_confidences=parse_floats(args.runner_up_confidences),
            expected_model_id=loaded.model_id,
            model_file_text=loaded.model_file.read_text() if loaded.model_file else "",
            model_class=loaded.model_class or "",
            input_spec=json.dumps(loaded.spec.to_dict()),
        )
    d = {
        "model_id": resp.profile.model_id,
        "name": resp.profile.name,
        "source": resp.source,
        "input": json.loads(resp.input_spec) if resp.input_spec else None,
        "created": resp.created,
        "capacity": resp.capacity,
        "issued": resp.issued,
        "pregenerated": resp.pregenerated,
        "pregeneration_target": resp.pregeneration_target,
        "fo_scheme": resp.profile.fo_scheme,
    }
    filling = (
        f"; pre-generating up to {d['pregeneration_target']} fingerprints in the background, so the first licenses "
        "come from the pool within seconds"
        if d["pregeneration_target"] > d["pregenerated"]
        else ""
    )
    _emit(
        args,
        d,
        f"{d['source']} model {d['model_id']} ({'registered' if d['created'] else 'already registered'}): "
        f"{d['fo_scheme']} FO space, {d['issued']}/{d['capacity']} slots issued, {d['pregenerated']} pre-generated"
        + filling,
    )
    return 0


def cmd_pregenerate(args) -> int:
    """Server side, offline: fill a model's pool with a progress bar (resumable; see pregeneration.py)."""
    from license_server.config import ServerConfig
    from license_server.pregeneration import pregenerate

    config = ServerConfig(
        data_dir=Path(args.data_dir),
        database_url=args.database_url or os.environ.get(DB_ENV, ""),
        signing_key=Path(args.signing_key) if args.signing_key else None,
        max_steps=args.max_steps,
    )
    report = pregenerate(config, args.model_id, args.count, batch=args.batch, progress=not args.json)
    d = {
        "model_id": report.model_id,
        "target": report.target,
        "generated": report.generated,
        "failed": report.attempted - report.generated,
        "pool": report.pool,
        "seconds": round(report.seconds, 1),
        "per_second": round(report.per_second, 2),
    }
    _emit(
        args,
        d,
        f"model {d['model_id'][:16]}…: {d['generated']} fingerprints in {d['seconds']} s "
        f"({d['per_second']}/s), pool {d['pool']}/{d['target']}",
    )
    return 0


def cmd_issue(args) -> int:
    validity = int(args.validity_days * 86400) if args.validity_days is not None else 0
    if args.validity_days is not None and validity <= 0:
        print("error: --validity-days must be positive", file=sys.stderr)
        return 2
    with _client(args) as c:
        msg = c.issue(args.model_id, args.user, validity)
    path = _save_license(msg, args.out or f"{msg.license_id}.aglicense")
    d = _license_dict(msg) | {"file": str(path)}
    _emit(args, d, _human(d) + f"\nwritten to {path} (a bearer credential: give it only to {args.user!r})")
    return 0


def cmd_revoke(args) -> int:
    with _client(args) as c:
        msg = c.revoke(args.license_id, args.reason or "")
    d = _license_dict(msg)
    _emit(args, d, _human(d))
    return 0


def cmd_list(args) -> int:
    with _client(args) as c:
        msgs = c.list(model_id=args.model_id or "", user=args.user or "", state=STATES.get(args.state or "", 0))
    rows = [_license_dict(m) for m in msgs]
    _emit(args, rows, "\n".join(_human(r) for r in rows) or "no licenses")
    return 0


def cmd_show(args) -> int:
    """The license, and what the server's ingested answer journals say about it."""
    with _client(args) as c:
        msg = c.get(args.license_id)
        usage = _usage(c, args.license_id)
    d = _license_dict(msg)
    if args.out:
        d["file"] = str(_save_license(msg, args.out))
    if usage is not None:
        d["usage"] = usage
    lines = [_human(d), *(_human_usage(usage) if usage is not None else [])]
    _emit(args, d, "\n".join(lines) + (f"\nwritten to {d['file']}" if args.out else ""))
    return 0


def _usage(c, license_id: str) -> dict[str, Any] | None:
    """The license's usage as a dict; None from a server older than GetLicenseUsage."""
    import grpc

    try:
        u = c.usage(license_id)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
            return None
        raise
    return {
        "served": u.served,
        "refused": {r.reason: r.rows for r in u.refused},
        "last_seen": u.last_seen or None,
        "answer_records": u.answer_records,
        "alerts": [
            {
                "reason": a.reason,
                "policy": a.policy,
                "at": a.at,
                "detail": a.detail,
                **({"acted_at": a.acted_at, "action": a.action} if a.acted_at else {}),
            }
            for a in u.alerts
        ],
    }


def _human_usage(u: dict[str, Any]) -> list[str]:
    refused = sum(u["refused"].values())
    reasons = ", ".join(f"{reason} {n:,}" for reason, n in sorted(u["refused"].items()))
    seen = _when(u["last_seen"]) if u["last_seen"] else "never (no usage in the ingested journals)"
    lines = [
        f"  usage: {u['served']:,} rows served, {refused:,} refused"
        + (f" ({reasons})" if reasons else "")
        + f"; last seen {seen}; {u['answer_records']:,} answer records kept for the extraction audit"
    ]
    for a in u["alerts"]:
        acted = f": {a['action']} {_when(a['acted_at'])}" if a.get("acted_at") else ""
        detail = f" ({a['detail']})" if a["detail"] else ""
        lines.append(f"  alert {_when(a['at'])}: {a['reason']}{detail}, policy {a['policy']}{acted}")
    return lines


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(t))


def cmd_verify(args) -> int:
    """Signature, expiry, model id and revocation, with keys and revocations from the server."""
    from activeguard.credentials.licenses import LicenseError, read_license, verify_license

    signed = read_license(args.file)
    with _client(args) as c:
        keys = c.verification_keys()
        revoked = {r.license_id for r in c.revocations().revocations}
    try:
        payload = verify_license(signed, keys, model_id=args.model_id, revoked=revoked)
    except LicenseError as exc:
        _emit(args, {"valid": False, "reason": exc.reason, "message": str(exc)}, f"INVALID ({exc.reason}): {exc}")
        return 1
    d = {
        "valid": True,
        "license_id": payload.license_id,
        "user": payload.user,
        "model_id": payload.model_id,
        "fo_class": payload.fo_class,
        "fo_confidence": payload.fo_confidence,
        "expires_at": payload.expires_at,
    }
    _emit(
        args,
        d,
        f"valid: license {payload.license_id} for {payload.user!r}, FO=({payload.fo_class}, "
        f"{payload.fo_confidence}) on model {payload.model_id[:16]}",
    )
    return 0


def cmd_revocations(args) -> int:
    """The server's signed revocation list, verified against its keys, written as a file that a handler
    can read (and check) without reaching the server: for air-gapped or file-fed deployments."""
    from activeguard.credentials.revocations import verify_revocations

    with _client(args) as c:
        msg = c.revocation_list(args.model_id or "")
        listed = verify_revocations(msg.text, c.verification_keys())
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(msg.text)
    tmp.replace(out)  # a reader never sees half a list
    d = {
        "file": str(out),
        "version": listed.version,
        "issued_at": listed.issued_at,
        "model_id": listed.model_id,
        "revoked": len(listed.revoked),
    }
    scope = f"model {listed.model_id[:16]}…" if listed.model_id else "every model"
    _emit(args, d, f"wrote {out}: {len(listed.revoked)} revoked licenses of {scope}, version {listed.version}")
    return 0


def cmd_ingest(args) -> int:
    """One ingestion pass without a server: into the license server's database (a suspend alert revokes
    its license there, and the server's signed revocation list picks it up), or into a database of its
    own for an air-gapped audit (``activeguard audit extraction --records URL`` reads it)."""
    from license_server.ingestion import JournalIngester
    from license_server.store import Store

    url = args.database_url or os.environ.get(DB_ENV, "")
    if not url:
        raise UsageError(f"give --db URL (or ${DB_ENV}), e.g. sqlite:///audit.db")
    missing = [d for d in args.directories if not Path(d).is_dir()]
    if missing:
        raise UsageError(f"not a directory: {', '.join(missing)}")
    store = Store(url)
    try:
        report = JournalIngester(store, args.directories, retention_days=args.answer_retention_days).poll()
    finally:
        store.close()
    d = report.to_dict()
    suspended = f"; suspended {', '.join(report.suspended)}" if report.suspended else ""
    _emit(
        args,
        d,
        f"read {report.bytes:,} bytes of {report.files} journals: {report.answers:,} new answer records, "
        f"{report.usage:,} usage entries, {report.alerts} alerts{suspended}; pruned {report.pruned:,} records past "
        f"retention; skipped {report.skipped} entries"
        + (f"; {report.errors} failures (see the log)" if report.errors else ""),
    )
    return 1 if report.errors else 0


def cmd_header(args) -> int:
    """The compact header value of a license file; offline, so a client script can call it."""
    from activeguard.credentials.header import encode_license_header
    from activeguard.credentials.licenses import read_license

    print(encode_license_header(read_license(args.file).to_text()))
    return 0


def cmd_create_token(args) -> int:
    from license_server.auth import create_admin_token

    out = Path(args.token_out)
    if out.exists() and not args.force:
        print(f"error: {out} exists (use --force to replace it)", file=sys.stderr)
        return 2
    create_admin_token(Path(args.hash_file), out)
    print(f"admin token written to {out} (mode 0600); its sha256 to {args.hash_file}. Restart the server to use it.")
    return 0


def add_license_commands(sub) -> None:
    """Add issue|revoke|list|show|verify|register (and create-token) to an argparse subparsers object."""
    p = sub.add_parser("register", help="register a classifier (any model source) with the license server")
    add_model_arguments(p)
    p.add_argument("--name", default=None)
    p.add_argument("--upload", action="store_true", help="send the model file's bytes instead of a server-side path")
    p.add_argument(
        "--pregenerate",
        action="store_true",
        help="fill the pool of ready fingerprints (every slot of a paper space, 1,000 of a ranked one); the "
        "first batch before returning, the rest in the server's background",
    )
    p.add_argument("--pregenerate-count", type=int, default=None, help="pool size to fill instead of the default")
    add_fo_space_arguments(p, "the model's archive (activeguard package|protect --fo-scheme)")
    _add_client(p)
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("issue", help="issue a license to a user and save it as .aglicense")
    p.add_argument("--model-id", required=True)
    p.add_argument("--user", required=True)
    p.add_argument("--validity-days", type=float, default=None)
    p.add_argument("--out", default=None)
    _add_client(p)
    p.set_defaults(func=cmd_issue)

    p = sub.add_parser("revoke", help="revoke a license")
    p.add_argument("license_id")
    p.add_argument("--reason", default=None)
    _add_client(p)
    p.set_defaults(func=cmd_revoke)

    p = sub.add_parser("list", help="list licenses")
    p.add_argument("--model-id", default=None)
    p.add_argument("--user", default=None)
    p.add_argument("--state", choices=sorted(STATES), default=None)
    _add_client(p)
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("show", help="show one license (optionally save it)")
    p.add_argument("license_id")
    p.add_argument("--out", default=None)
    _add_client(p)
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("verify", help="verify an .aglicense against the server's keys and revocations")
    p.add_argument("file")
    p.add_argument("--model-id", default=None)
    _add_client(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "revocations",
        help="export the server's signed revocation list to a file (for handlers that read a file)",
        description="Writes the list signed with the license server's key; a handler packaged with "
        "--revocation-file FILE checks the signature and refuses a list older than the one it holds. "
        "Re-export it as often as your staleness bound asks (the handler's --revocation-max-age-s).",
    )
    p.add_argument("--model-id", default=None, help="only this model's revocations (default: every model's)")
    p.add_argument("--out", required=True, metavar="FILE", help="where to write it (replaced atomically)")
    _add_client(p)
    p.set_defaults(func=cmd_revocations)

    p = sub.add_parser(
        "ingest",
        help="read answer journals into a database once, without a server (air-gapped audits)",
        description="Stores the journals' answer records (each once), usage and alerts per license, from where "
        "the last ingest into this database stopped; a suspend alert revokes its license in that database. "
        "The license server does the same continuously with --answer-journal DIR.",
    )
    p.add_argument(
        "directories",
        nargs="+",
        metavar="DIR",
        help="journal directories (the protection profile's answer_journal_dir)",
    )
    p.add_argument(
        "--db", "--database-url", dest="database_url", default=None, help=f"SQLAlchemy URL (default ${DB_ENV})"
    )
    add_retention_argument(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser(
        "header",
        help="print an .aglicense as the X-ActiveGuard-License header value (base64 of zlib; no server needed)",
        description="TorchServe limits a request header to 8 KB; this compact form fits. Use it as "
        'curl -H "X-ActiveGuard-License: $(activeguard license header alice.aglicense)" ...',
    )
    p.add_argument("file", metavar="LICENSE.aglicense")
    p.set_defaults(func=cmd_header)


def _run(args: argparse.Namespace) -> int:
    return _guarded(args.func)(args)


def _loaded(module: str, *names: str) -> tuple[type[BaseException], ...]:
    """Exception classes of ``module`` if a command has imported it, else none: nothing can raise them
    before, and importing grpc or the store only to catch their errors would slow every command."""
    loaded = sys.modules.get(module)
    return tuple(getattr(loaded, name) for name in names) if loaded is not None else ()


def _guarded(cmd):
    """Wrap a client command: gRPC and input errors become one line on stderr and an exit code."""

    def run(args: argparse.Namespace) -> int:
        from activeguard.credentials.licenses import LicenseError  # no torch

        try:
            return cmd(args)
        except _loaded("grpc", "RpcError") as exc:  # each except clause is evaluated once something is raised
            code = exc.code().name if exc.code() else "UNKNOWN"
            print(f"error: {code}: {exc.details()}", file=sys.stderr)
            return 2 if code in _USAGE_CODES else 1
        except (OSError, LicenseError, ValueError, UsageError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except (
            *_loaded("license_server.errors", "IssuanceError"),
            *_loaded("license_server.store", "StoreError"),
            *_loaded("activeguard.watermark.record_store", "RecordStoreError"),
        ) as exc:  # commands that work on the store directly (pregenerate)
            invalid = _loaded("license_server.errors", "InvalidRequest", "NotFound", "PreconditionFailed")
            print(f"error: {exc}", file=sys.stderr)
            return 2 if isinstance(exc, invalid) else 1

    return run


def register(sub) -> None:
    """Plugin hook (entry point group ``activeguard.commands``): adds ``activeguard license-server``
    (start the server) and ``activeguard license issue|revoke|list|show|verify|register``."""
    p = sub.add_parser("license-server", help="run the gRPC license server (allocates, signs, stores licenses)")
    add_serve_arguments(p)
    p.set_defaults(func=serve)
    lp = sub.add_parser("license", help="issue, revoke, list, show or verify licenses on a license server")
    lsub = lp.add_subparsers(dest="license_command", required=True)
    add_license_commands(lsub)
    for choice in lsub.choices.values():
        choice.set_defaults(func=_guarded(choice.get_default("func")))


def license_main(argv: list[str] | None = None) -> int:
    """``activeguard license issue|revoke|list|show|verify|register ...``."""
    p = ArgumentParser(prog="activeguard license", description="administer licenses on a license server")
    sub = p.add_subparsers(dest="command", required=True)
    add_license_commands(sub)
    return _run(p.parse_args(argv))


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="activeguard-license-server", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the gRPC license server")
    add_serve_arguments(s)
    s.set_defaults(func=serve)
    t = sub.add_parser("create-token", help="create a new admin token (0600 file) and store its hash")
    t.add_argument("--hash-file", required=True)
    t.add_argument("--token-out", required=True)
    t.add_argument("--force", action="store_true")
    t.set_defaults(func=cmd_create_token)
    g = sub.add_parser(
        "pregenerate",
        help="fill a registered model's pool of ready fingerprints (offline, on the server's database)",
        description="Generates fingerprints in batches with a progress bar; stop it any time and run it "
        "again to resume (nothing is generated twice). The server may keep running on the same database.",
    )
    g.add_argument("--data-dir", default="license-data", help="the server's data dir (key, SQLite file)")
    g.add_argument(
        "--database-url", default=None, help=f"SQLAlchemy URL (default: SQLite in the data dir; or ${DB_ENV})"
    )
    g.add_argument("--signing-key", default=None)
    g.add_argument("--model-id", required=True)
    g.add_argument("--count", type=int, required=True, help="pool size to reach")
    g.add_argument("--batch", type=int, default=None, help="fingerprints per optimization (default 500)")
    g.add_argument("--max-steps", type=int, default=1000)
    g.add_argument("--json", action="store_true")
    g.set_defaults(func=cmd_pregenerate)
    add_license_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.func is serve:
        return serve(args)
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())
