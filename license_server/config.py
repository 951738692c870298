"""The license server's settings: one dataclass that the CLI, tests and embedders fill in."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_VALIDITY = 365 * 24 * 3600


@dataclass
class ServerConfig:
    """Where the data lives, what to bind, TLS files and issuance limits; checked when built."""

    data_dir: Path
    database_url: str = ""  # default: sqlite file in data_dir
    host: str = "127.0.0.1"
    port: int = 50061  # 0: any free port
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = 9461  # None: no metrics endpoint; 0: any free port
    signing_key: Path | None = None  # default: data_dir/signing_key.pem
    admin_token_hash_file: Path | None = None  # default: data_dir/admin_token.sha256
    default_validity: int = DEFAULT_VALIDITY
    max_workers: int = 16
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # mTLS: require client certificates signed by this CA
    generation_timeout: float = 300.0
    max_steps: int = 1000
    # an on-demand row gives up after this many steps and its request starts again elsewhere: the rare
    # row that would need 1,000 steps otherwise holds a client (and a slot in the batch) for seconds
    on_demand_max_steps: int = 400
    pregeneration_batch: int = 500  # fingerprints per pre-generation batch (one optimization, one commit)
    # every registration starts filling a small pool in the background, its first batch small, so a new
    # model's first license comes from the pool within seconds (measured: 13 s on demand from a cold start)
    pregenerate_on_register: bool = True
    register_pool: int = 100  # fingerprints that fill (a paper space: all of its slots when fewer)
    first_pregeneration_batch: int = 8
    # answer journals (activeguard.watermark.journal) ingested into the store every journal_poll_seconds;
    # answer records older than answer_retention_days are deleted (0: kept)
    answer_journals: tuple[Path, ...] = ()
    journal_poll_seconds: float = 5.0
    answer_retention_days: float = 30.0

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.data_dir / 'licenses.db').resolve()}"
        self.signing_key = Path(self.signing_key or self.data_dir / "signing_key.pem")
        self.admin_token_hash_file = Path(self.admin_token_hash_file or self.data_dir / "admin_token.sha256")
        self.answer_journals = tuple(Path(d) for d in self.answer_journals)
        if self.journal_poll_seconds <= 0 or self.answer_retention_days < 0:
            raise ValueError(
                "journal_poll_seconds (--journal-poll-s) must be positive and answer_retention_days "
                "(--answer-retention-days) at least 0"
            )
        self._check_tls()

    def _check_tls(self) -> None:
        """Refuse half a TLS setup: a client CA without a certificate used to start a plaintext server."""
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("give both tls_cert and tls_key (--tls-cert, --tls-key), or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError(
                "tls_client_ca (--tls-client-ca, mTLS) needs tls_cert and tls_key (--tls-cert, --tls-key): client "
                "certificates are only checked over TLS"
            )
