"""The gateway as a child process on a free loopback port (the demo, tests and benchmarks)."""

from __future__ import annotations

import sys
from pathlib import Path

from activeguard.runtime.processes import ReadyFileProcess


class GatewayProcess(ReadyFileProcess):
    """``activeguard gateway --config CONFIG``; logs to ``workdir/gateway.log``."""

    def __init__(self, config_path: Path, workdir: Path):
        cmd = [
            str(Path(sys.executable).with_name("activeguard")),
            "gateway",
            "--config",
            str(config_path),
            "--port",
            "0",
            "--metrics-port",
            "0",
        ]
        super().__init__(cmd, workdir, "gateway", log_name="gateway.log", timeout=60)
        self.metrics_url = f"http://127.0.0.1:{self.info['metrics_port']}/metrics"
