"""Real server processes for tests: each binds 127.0.0.1 on a free port and is stopped by its owner."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from license_server.client import LicenseClient


def terminate(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM this pid (only), then SIGKILL it if it has not exited within ``timeout``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

ROOT = Path(__file__).resolve().parent.parent


def wait_ready(proc: subprocess.Popen, ready: Path, log_path: Path, what: str, timeout: float) -> dict:
    """The JSON a server writes to its --ready-file; on exit or timeout, stop it and show its log."""
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            state = f"exited with {proc.returncode}" if proc.poll() is not None else f"not ready in {timeout:.0f} s"
            terminate(proc)
            raise RuntimeError(f"{what} {state}: {log_path.read_text(errors='replace')[-2000:]}")
        time.sleep(0.1)
    return json.loads(ready.read_text())
TOKEN = "agt_test_" + secrets.token_urlsafe(24)


class ServerProcess:
    """One ``license_server serve`` process on a free loopback port."""

    def __init__(self, data_dir: Path, database_url: str = "", token: str = TOKEN):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.ready = self.data_dir / f"ready-{uuid.uuid4().hex}.json"
        self.log = open(self.data_dir / "server.log", "ab")
        cmd = [sys.executable, "-m", "license_server", "serve", "--data-dir", str(self.data_dir), "--port", "0",
               "--metrics-port", "0", "--ready-file", str(self.ready), "--log-level", "INFO"]
        if database_url:
            cmd += ["--database-url", database_url]
        env = {**os.environ, "ACTIVEGUARD_ADMIN_TOKEN": token, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.log.flush()
        info = wait_ready(self.proc, self.ready, self.data_dir / "server.log", "license server", 90)
        self.port, self.metrics_port, self.key_id = info["port"], info["metrics_port"], info["key_id"]
        self.target = f"127.0.0.1:{self.port}"

    def log_text(self) -> str:
        self.log.flush()
        return (self.data_dir / "server.log").read_text(errors="replace")

    def client(self, token: str | None = TOKEN) -> LicenseClient:
        return LicenseClient(self.target, token, timeout=120)

    def stop(self) -> None:
        terminate(self.proc)
        self.log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # SIGKILL, this pid only
            self.proc.wait(20)




class GatewayProcess:
    """One ``activeguard gateway`` process; ``stop`` ends only this pid."""

    def __init__(self, config_path: Path, workdir: Path):
        self.workdir = Path(workdir)
        self.ready = self.workdir / f"gw-ready-{uuid.uuid4().hex}.json"
        self.log_path = self.workdir / "gateway.log"
        self.log = open(self.log_path, "ab")
        cmd = [str(Path(sys.executable).with_name("activeguard")), "gateway", "--config", str(config_path),
               "--port", "0", "--metrics-port", "0", "--ready-file", str(self.ready)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                     stdout=self.log, stderr=subprocess.STDOUT)
        info = wait_ready(self.proc, self.ready, self.log_path, "gateway", 60)
        self.target = f"127.0.0.1:{info['port']}"
        self.metrics_url = f"http://127.0.0.1:{info['metrics_port']}/metrics"

    def stop(self) -> None:
        terminate(self.proc)
        self.log.close()
