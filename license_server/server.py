"""The license server's lifecycle: data directory, key, store, gRPC server (TLS, health, reflection), metrics."""

from __future__ import annotations

import logging
import os

from prometheus_client import start_http_server

from activeguard.credentials import licenses as lic
from activeguard.watermark.record_store import RecordStore
from activeguard_proto.rpc import BuiltServer, build_server, server_credentials
from activeguard_proto.v1 import license_pb2_grpc
from license_server.auth import TOKEN_ENV, AdminAuth, create_admin_token, hash_token, load_token_hash, write_secret
from license_server.config import ServerConfig
from license_server.ingestion import IngestLoop, IngestReport, JournalIngester
from license_server.interceptors import AdminAuthInterceptor
from license_server.issuance import Issuer
from license_server.journal_ledger import JournalLedger
from license_server.logs import log_event
from license_server.metrics import Metrics
from license_server.servicer import ADMIN_METHODS, SERVICE_NAME, LicenseServicer
from license_server.store import LicenseRecord, Store, redact_url


class LicenseServer:
    """The whole server: store, key, token, gRPC (+ health, reflection) and the metrics endpoint."""

    def __init__(self, config: ServerConfig, *, admin_token_hash: str | None = None):
        """``admin_token_hash`` (sha256 hex) overrides the token files and environment: for embedding."""
        self.cfg = config
        self._admin_token_hash = admin_token_hash
        self._built: BuiltServer | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._httpd = None
        self._ingestion: IngestLoop | None = None

    @property
    def grpc_server(self):
        return None if self._built is None else self._built.server

    def _admin_auth(self) -> AdminAuth:
        if self._admin_token_hash:
            return AdminAuth(self._admin_token_hash)
        hash_file = self.cfg.admin_token_hash_file
        env_token = os.environ.get(TOKEN_ENV)
        if env_token:
            write_secret(hash_file, hash_token(env_token) + "\n")
            log_event(logging.INFO, "admin token hash set from the environment", hash_file=str(hash_file))
        elif not hash_file.exists():
            token_file = self.cfg.data_dir / "admin.token"
            create_admin_token(hash_file, token_file)
            log_event(logging.WARNING, "created an admin token; move it somewhere safe", token_file=str(token_file))
        return AdminAuth(load_token_hash(hash_file))

    def _auth_refused(self, method: str, peer: str) -> None:
        """Count and log an admin call the interceptor refused (an IssueLicense refusal is also an issue failure)."""
        self.metrics.auth_failures.inc()
        if method == "IssueLicense":
            self.metrics.issue_failures.labels("UNAUTHENTICATED").inc()
        log_event(logging.WARNING, "admin call refused", method=method, peer=peer)

    def start(self) -> LicenseServer:
        cfg = self.cfg
        if not cfg.data_dir.exists():
            cfg.data_dir.mkdir(parents=True, mode=0o700)  # holds the key, the token and the license DB
        key, created = lic.load_or_create_signing_key(cfg.signing_key)
        kid = lic.key_id(key.public_key())
        log_event(
            logging.INFO, "signing key " + ("created" if created else "loaded"), key_id=kid, path=str(cfg.signing_key)
        )
        self.store = Store(cfg.database_url)
        self.store.record_key(kid, lic.public_key_bytes(key.public_key()))
        log_event(
            logging.INFO,
            "store ready",
            database=redact_url(cfg.database_url),
            schema_version=self.store.schema_version(),
        )
        self.metrics = Metrics()
        self.issuer = Issuer(cfg, self.store, key, self.metrics)
        self.records = RecordStore(self.store.engine)  # answer records, in the license database
        self.service = LicenseServicer(self.issuer, self.metrics, JournalLedger(self.store), self.records)
        gate = AdminAuthInterceptor(self._admin_auth(), SERVICE_NAME, ADMIN_METHODS, on_refusal=self._auth_refused)
        self._built = build_server(
            [(license_pb2_grpc.add_LicenseServiceServicer_to_server, self.service)],
            [SERVICE_NAME],
            host=cfg.host,
            port=cfg.port,
            max_workers=cfg.max_workers,
            interceptors=[gate],
            credentials=server_credentials(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca),
        )
        self.port = self._built.port
        self._built.start()
        if cfg.metrics_port is not None:
            self._httpd, _ = start_http_server(cfg.metrics_port, addr=cfg.metrics_host, registry=self.metrics.registry)
            self.metrics_port = self._httpd.server_port
        self._start_ingestion()
        log_event(
            logging.INFO,
            "serving",
            address=f"{cfg.host}:{self.port}",
            tls=bool(cfg.tls_cert),
            mtls=bool(cfg.tls_client_ca),
            metrics=f"{cfg.metrics_host}:{self.metrics_port}" if self.metrics_port else None,
            key_id=kid,
        )
        return self

    def _start_ingestion(self) -> None:
        """Poll the answer journals (``--answer-journal``) on a thread of their own."""
        cfg = self.cfg
        if not cfg.answer_journals:
            return
        ingester = JournalIngester(
            self.store,
            cfg.answer_journals,
            retention_days=cfg.answer_retention_days,
            records=self.records,
            on_revoked=self._suspended,
        )
        self._ingestion = IngestLoop(ingester, cfg.journal_poll_seconds, self._ingested).start()
        log_event(
            logging.INFO,
            "ingesting answer journals",
            directories=[str(d) for d in cfg.answer_journals],
            every_s=cfg.journal_poll_seconds,
            retention_days=cfg.answer_retention_days or None,
        )

    def _suspended(self, row: LicenseRecord) -> None:
        self.issuer.revoked(row)
        self.metrics.suspensions.inc()

    def _ingested(self, report: IngestReport) -> None:
        m = self.metrics
        for kind, n in (("answer", report.answers), ("usage", report.usage), ("alert", report.alerts)):
            m.journal_entries.labels(kind).inc(n)
        m.journal_errors.inc(report.errors)
        m.answer_records_pruned.inc(report.pruned)
        if report.files or report.pruned:
            log_event(logging.INFO, "answer journals ingested", **report.to_dict())

    def stop(self, grace: float = 2.0) -> None:
        if self._ingestion is not None:
            self._ingestion.stop()
            self._ingestion = None
        if self._built is not None:
            self._built.stop(grace)
            self._built = None
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd = None
        self.issuer.close()
        self.store.close()

    def wait(self) -> None:
        if self._built is not None:
            self._built.server.wait_for_termination()
