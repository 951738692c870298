"""Real server processes for tests: each binds 127.0.0.1 on a free port and is stopped by its owner."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from pathlib import Path

from gateway.process import GatewayProcess
from license_server.process import LicenseServerProcess

TOKEN = "agt_test_" + secrets.token_urlsafe(24)

__all__ = ["TOKEN", "GatewayProcess", "ServerProcess"]


class ServerProcess(LicenseServerProcess):
    """A license server with the tests' admin token."""

    def __init__(
        self,
        data_dir: Path,
        database_url: str = "",
        token: str = TOKEN,
        register_pool: int = 100,
        extra_args: Sequence[str] = (),
    ):
        super().__init__(data_dir, token, database_url, register_pool=register_pool, extra_args=extra_args)
