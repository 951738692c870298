"""A managed TorchServe: isolated, bound to 127.0.0.1 on free ports, ready means a READY worker.

``torchserve --start`` returns 0 even when the server fails and ``/ping`` is healthy before any
worker can answer, so this runs TorchServe in the foreground as our own process group, waits
for the management API to report a READY worker, and on exit stops the whole group and waits
for it. Used by ``activeguard serve``, the tests, the demo and the benchmarks.

Logs (TorchServe's ``*_log.log`` files and ``console.log``) go to ``log_dir`` and outlive the
server: they are what explains a crashed worker after the fact. Stopping removes only what the run
needed while it lived (``tmp/``: the pid file and unpacked models). A throwaway run, one given
neither ``workdir`` nor ``log_dir`` (tests, benchmarks), removes everything unless
``$ACTIVEGUARD_KEEP_TS_LOGS`` is set.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

KEEP_LOGS_ENV = "ACTIVEGUARD_KEEP_TS_LOGS"
LOG_FILES = ("model_log.log", "ts_log.log", "console.log")
# What explains a failed start in TorchServe's console (its log lines, the workers' output and what it
# prints outside its logger, such as "Invalid configuration: ..."), and what only looks like it.
CAUSE = re.compile(r"\[ERROR ?\]|Exception|Error\b|Invalid configuration|[Ff]ailed to load|Load model failed|died")
NOT_A_CAUSE = re.compile(r"nvidia-smi|xpu-smi|InterruptedException|sun\.reflect|Auto recovery failed")
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT[\d:,.]+ ")
CAUSE_LINES = 15
WORKER_DEATHS = 3  # a model whose worker died this often while loading will not load: stop waiting


class TorchServeError(RuntimeError):
    """TorchServe could not be started or did not become ready; the message says why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Ports:
    inference: int
    management: int
    metrics: int
    grpc_inference: int
    grpc_management: int

    @classmethod
    def pick(cls) -> Ports:
        return cls(*(free_port() for _ in range(5)))

    @classmethod
    def choose(cls, inference: int, management: int, metrics: int, grpc_inference: int, grpc_management: int) -> Ports:
        """The given ports, with 0 meaning any free port."""
        return cls(*(port or free_port() for port in (inference, management, metrics, grpc_inference, grpc_management)))


# What a managed run decides whatever the owner's config.properties says: where it listens (127.0.0.1,
# free ports), which store and models it loads, where its files go, and that TorchServe's token
# auth is off (ActiveGuard's licenses authenticate clients; the readiness check reads the management API).
MANAGED_KEYS = frozenset(
    {
        "inference_address",
        "management_address",
        "metrics_address",
        "grpc_inference_address",
        "grpc_inference_port",
        "grpc_management_address",
        "grpc_management_port",
        "model_store",
        "load_models",
        "disable_token_authorization",
        "enable_envvars_config",
        "install_py_dep_per_model",
    }
)


def read_config(path: Path) -> dict[str, str]:
    """A config.properties as key → value (Java properties: ``key=value`` or ``key: value``, # comments)."""
    settings: dict[str, str] = {}
    for number, raw in enumerate(Path(path).read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#!":
            continue
        sep = min((i for i in (line.find("="), line.find(":")) if i > 0), default=-1)
        if sep < 0:
            raise ValueError(f"{path}:{number}: expected key=value, got {raw!r}")
        settings[line[:sep].strip()] = line[sep + 1 :].strip()
    return settings


def merge_config(owner: dict[str, str], managed: dict[str, str]) -> dict[str, str]:
    """The owner's settings (envelope, batching, ``models``, limits, ...) over ours, except the managed keys."""
    merged = dict(managed)
    merged.update({k: v for k, v in owner.items() if k not in MANAGED_KEYS})
    return merged


class ManagedTorchServe:
    """Context manager: ``with ManagedTorchServe(store, {"mnist": "mnist.mar"}) as ts: ts.url``."""

    def __init__(
        self,
        model_store: Path,
        models: dict[str, str],
        *,
        workers: int = 1,
        batch_size: int = 1,
        max_batch_delay_ms: int = 5,
        ports: Ports | None = None,
        startup_timeout: float = 180.0,
        workdir: Path | None = None,
        log_dir: Path | None = None,
        max_request_bytes: int = 32 * 1024 * 1024,
        owner_config: Path | None = None,
    ):
        self.model_store = Path(model_store).resolve()
        self.models = models
        self.workers, self.batch_size, self.max_batch_delay_ms = workers, batch_size, max_batch_delay_ms
        self.ports = ports or Ports.pick()
        self.startup_timeout = startup_timeout
        self.max_request_bytes = max_request_bytes
        self.owner_config = owner_config
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="activeguard-ts-")).resolve()
        self.log_dir = Path(log_dir).resolve() if log_dir is not None else self.workdir / "logs"
        self.keeps_logs = workdir is not None or log_dir is not None or os.environ.get(KEEP_LOGS_ENV) is not None
        self.process: subprocess.Popen | None = None
        self._console_start = 0  # where this run's output begins in console.log (a reused log_dir keeps older runs')

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports.inference}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.management}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.metrics}/metrics"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.ports.grpc_inference}"

    def _config(self) -> Path:
        models = {
            name: {
                "1.0": {
                    "defaultVersion": True,
                    "marName": mar,
                    "minWorkers": self.workers,
                    "maxWorkers": self.workers,
                    "batchSize": self.batch_size,
                    "maxBatchDelay": self.max_batch_delay_ms,
                    "responseTimeout": 60,
                }
            }
            for name, mar in self.models.items()
        }
        p = self.ports
        lines = [
            f"inference_address=http://127.0.0.1:{p.inference}",
            f"management_address=http://127.0.0.1:{p.management}",
            f"metrics_address=http://127.0.0.1:{p.metrics}",
            "grpc_inference_address=127.0.0.1",
            f"grpc_inference_port={p.grpc_inference}",
            "grpc_management_address=127.0.0.1",
            f"grpc_management_port={p.grpc_management}",
            f"model_store={self.model_store}",
            # NAME=FILE.mar: each archive is registered under the name given, whatever its manifest says
            f"load_models={','.join(f'{name}={mar}' for name, mar in self.models.items())}",
            f"models={json.dumps(models)}",
            "disable_token_authorization=true",
            # Let oversized bodies reach the handler, which answers a JSON 400 (Netty would reset).
            f"max_request_size={self.max_request_bytes}",
            "enable_envvars_config=false",
            "install_py_dep_per_model=false",
            "metrics_mode=prometheus",
            "model_metrics_auto_detect=true",
            "disable_system_metrics=true",
            f"default_workers_per_model={self.workers}",
        ]
        settings = dict(line.split("=", 1) for line in lines)
        if self.owner_config is not None:
            settings = merge_config(read_config(self.owner_config), settings)
        path = self.workdir / "config.properties"
        path.write_text("".join(f"{key}={value}\n" for key, value in settings.items()))
        return path

    @property
    def tmp_dir(self) -> Path:
        """TorchServe's TMPDIR: its pid file and unpacked models; removed on stop."""
        return self.workdir / "tmp"

    def log_tail(self, lines: int = 30) -> str:
        chunks = []
        if self.keeps_logs:
            chunks.append(f"(full logs in {self.log_dir})")
        for name in LOG_FILES:
            path = self.log_dir / name
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                chunks.append(f"--- {name} ---\n" + "\n".join(text))
        return "\n".join(chunks)

    def _console(self) -> str:
        """What this run has written to console.log so far."""
        try:
            with open(self.log_dir / "console.log", "rb") as f:
                f.seek(self._console_start)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def cause(self) -> str:
        """The lines of this run's TorchServe output that say what went wrong (errors, exceptions, failed
        loads; each once, timestamps dropped), else the logs' last lines; and where the full logs are."""
        seen: dict[str, None] = {}
        for raw in self._console().splitlines():
            if CAUSE.search(raw) and not NOT_A_CAUSE.search(raw):
                seen.setdefault(TIMESTAMP.sub("", raw).strip(), None)
        if not seen:
            return self.log_tail()
        lines = list(seen)[:CAUSE_LINES]
        more = f"\n  ... ({len(seen) - CAUSE_LINES} more)" if len(seen) > CAUSE_LINES else ""
        where = f"\n(full logs in {self.log_dir})" if self.keeps_logs else ""
        return "TorchServe said:\n" + "\n".join(f"  {line}" for line in lines) + more + where

    def start(self) -> ManagedTorchServe:
        if shutil.which("java") is None:
            raise TorchServeError(
                "Java is not installed: TorchServe needs a Java 11+ runtime (apt-get install default-jre)"
            )
        for port in self.ports.__dict__.values():
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    raise TorchServeError(f"port {port} on 127.0.0.1 is already taken")
        torchserve = shutil.which("torchserve") or str(Path(sys.executable).with_name("torchserve"))
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = dict(
            os.environ,
            TMPDIR=str(self.tmp_dir),
            TEMP=str(self.tmp_dir),
            LOG_LOCATION=str(self.log_dir),
            METRICS_LOCATION=str(self.log_dir),
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        )
        cmd = [
            torchserve,
            "--start",
            "--foreground",
            "--ncs",
            "--model-store",
            str(self.model_store),
            "--ts-config",
            str(self._config()),
        ]
        console = open(self.log_dir / "console.log", "ab")  # a reused log_dir keeps earlier runs' output
        self._console_start = console.tell()
        self.process = subprocess.Popen(
            cmd, stdout=console, stderr=subprocess.STDOUT, env=env, cwd=self.workdir, start_new_session=True
        )
        console.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        pending = set(self.models)
        while pending:
            if self.process.poll() is not None:
                raise TorchServeError(f"TorchServe exited with code {self.process.returncode}\n{self.cause()}")
            for name in sorted(pending):
                state = self._probe(name)
                if state == "READY":
                    pending.discard(name)
                elif state == "missing":  # the API answers only once the initial models are registered
                    raise TorchServeError(
                        f"TorchServe did not register model {name!r} from {self.models[name]}\n{self.cause()}"
                    )
                elif self._worker_deaths(name) >= WORKER_DEATHS:
                    raise TorchServeError(
                        f"no READY worker for {name!r}: its worker died {WORKER_DEATHS} times loading "
                        f"{self.models[name]}\n{self.cause()}"
                    )
            if time.monotonic() > deadline:
                raise TorchServeError(
                    f"no READY worker for {sorted(pending)} after {self.startup_timeout:.0f} s\n{self.cause()}"
                )
            time.sleep(0.3)

    def _worker_deaths(self, name: str) -> int:
        """How often a worker of ``name`` has died in this run (its Python side's last words, in TorchServe's
        console under the worker's thread, W-PORT-NAME_VERSION)."""
        died = re.compile(rf"W-\d+-{re.escape(name)}_\S* .*Backend worker process died")
        return sum(1 for line in self._console().splitlines() if died.search(line))

    def _probe(self, name: str) -> str | None:
        """The model's state: READY, another worker status, None (no workers yet, or the management API is
        not up yet) or "missing" (the API is up and does not know the model)."""
        try:
            with urllib.request.urlopen(f"{self.management_url}/models/{name}", timeout=2) as resp:
                workers = json.load(resp)[0].get("workers", [])
        except urllib.error.HTTPError as err:
            return "missing" if err.code == 404 else None
        except (urllib.error.URLError, OSError, ValueError, IndexError):
            return None
        return (
            "READY" if any(w.get("status") == "READY" for w in workers) else (workers[0]["status"] if workers else None)
        )

    def worker_status(self, name: str) -> str | None:
        state = self._probe(name)
        return None if state == "missing" else state

    def stop(self, timeout: float = 30.0) -> None:
        """Stop TorchServe and its workers (our own process group) and wait until they are gone."""
        if self.process is None or self.process.poll() is not None:
            self._cleanup()
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        except ProcessLookupError:
            pass
        self._wait_group_gone(self.process.pid)
        self._cleanup()

    @staticmethod
    def _wait_group_gone(pgid: int, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _cleanup(self) -> None:
        """Remove the run's temporary files; keep the logs unless this is a throwaway run."""
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        logs_inside = self.log_dir.is_relative_to(self.workdir)
        if self._own_workdir and not (self.keeps_logs and logs_inside):
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> ManagedTorchServe:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
