"""The managed TorchServe reports start-up failures clearly and leaves no process behind."""

from __future__ import annotations

import os
import socket

import pytest

from handlers.packaging import package
from handlers.server import ManagedTorchServe, Ports, TorchServeError

pytestmark = pytest.mark.slow


def test_port_taken_is_reported_before_starting(deployment, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = Ports(port, *list(Ports.pick().__dict__.values())[1:])
        with pytest.raises(TorchServeError, match=f"port {port} .* already taken"):
            ManagedTorchServe(deployment.store, {"x": "x.mar"}, ports=ports).start()


def test_missing_java_is_reported(deployment, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(TorchServeError, match="Java is not installed"):
        ManagedTorchServe(deployment.store, {"x": "x.mar"}).start()


def test_worker_crash_loop_is_reported_with_log_lines(deployment, tmp_path):
    broken = tmp_path / "broken_handler.py"
    broken.write_text("raise RuntimeError('handler import exploded on purpose')\n")
    store = tmp_path / "store"
    package(deployment.model_path, deployment.profile(), "broken", store, handler=broken)
    ts = ManagedTorchServe(store, {"broken": "broken.mar"}, startup_timeout=25)
    with pytest.raises(TorchServeError, match="no READY worker") as info:
        ts.start()
    assert "exploded on purpose" in str(info.value)
    with pytest.raises(ProcessLookupError):
        os.killpg(ts.process.pid, 0)  # the whole process group is gone
