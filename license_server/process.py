"""The license server as a child process on a free loopback port (the demo, tests and benchmarks),
or in this process (:func:`in_process`: tests that read its metrics, use TLS or restart it on one port)."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from activeguard.runtime.processes import ReadyFileProcess
from license_server.auth import TOKEN_ENV, hash_token
from license_server.client import LicenseClient

if TYPE_CHECKING:
    from license_server.config import ServerConfig
    from license_server.server import LicenseServer


OWN_TOKEN = object()  # client(): use the token this server was started with


class LicenseServerProcess(ReadyFileProcess):
    """``python -m license_server serve`` with its data (SQLite, signing key) in ``data_dir``."""

    def __init__(
        self,
        data_dir: Path,
        token: str,
        database_url: str = "",
        *,
        log_level: str = "INFO",
        register_pool: int = 100,
        extra_args: Sequence[str] = (),
    ):
        """``extra_args``: more ``serve`` options (``--answer-journal DIR``, ...)."""
        cmd = [
            sys.executable,
            "-m",
            "license_server",
            "serve",
            "--data-dir",
            str(data_dir),
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--log-level",
            log_level,
            "--register-pool",
            str(register_pool),
        ]
        if database_url:
            cmd += ["--database-url", database_url]
        cmd += extra_args
        self.data_dir = Path(data_dir)
        self.token = token
        super().__init__(cmd, self.data_dir, "license server", log_name="server.log", env={TOKEN_ENV: token})
        self.port, self.metrics_port, self.key_id = self.info["port"], self.info["metrics_port"], self.info["key_id"]

    def client(self, token: str | None | object = OWN_TOKEN, timeout: float = 120) -> LicenseClient:
        """An admin client with this server's token, another token, or none (``token=None``)."""
        return LicenseClient(self.target, self.token if token is OWN_TOKEN else token, timeout=timeout)


@contextmanager
def in_process(config: ServerConfig, token: str) -> Iterator[LicenseServer]:
    """A started :class:`LicenseServer` in this process with admin ``token``; stopped on exit, even on errors."""
    from license_server.server import LicenseServer

    server = LicenseServer(config, admin_token_hash=hash_token(token)).start()
    try:
        yield server
    finally:
        server.stop(grace=0.5)
