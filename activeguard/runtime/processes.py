"""Child server processes that announce readiness through a JSON "ready file".

The license server and the gateway write ``{pid, port, ...}`` to ``--ready-file`` once they
serve, so a parent can ask for port 0 (any free port) and still learn where they listen. Used by
the demo, the tests and the benchmarks; it stops only the pid it started.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path


def terminate(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM this pid (only), then SIGKILL it if it has not exited within ``timeout``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


def write_ready_file(path: str | Path, info: dict) -> None:
    """Atomically publish ``info`` (pid, ports) so a parent never reads half a file."""
    ready = Path(path)
    tmp = ready.with_name(ready.name + ".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), **info}))
    os.replace(tmp, ready)


def wait_ready(proc: subprocess.Popen, ready: Path, log_path: Path, what: str, timeout: float) -> dict:
    """The JSON a server writes to its ready file; on exit or timeout, stop it and show its log."""
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            state = (
                f"exited with code {proc.returncode}" if proc.poll() is not None else f"not ready in {timeout:.0f} s"
            )
            terminate(proc)
            raise RuntimeError(f"{what} {state}; last log lines:\n{log_path.read_text(errors='replace')[-2000:]}")
        time.sleep(0.1)
    return json.loads(ready.read_text())


class ReadyFileProcess:
    """Start ``cmd + [--ready-file F]``, log to ``workdir/log_name`` and wait for F; ``stop`` ends only this pid."""

    def __init__(
        self,
        cmd: list[str],
        workdir: Path,
        what: str,
        *,
        log_name: str,
        timeout: float = 90,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.what = what
        self.ready = self.workdir / f"ready-{uuid.uuid4().hex}.json"
        self.log_path = self.workdir / log_name
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*cmd, "--ready-file", str(self.ready)],
            cwd=cwd,
            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            self.info = wait_ready(self.proc, self.ready, self.log_path, what, timeout)
        except BaseException:
            self.stop()
            raise
        self.target = f"127.0.0.1:{self.info['port']}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        terminate(self.proc)
        self._log.close()

    def kill(self) -> None:
        """SIGKILL, this pid only (crash tests)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(20)
        self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
