"""`activeguard serve NAME=FILE.mar` with a real TorchServe: each archive is served under the NAME given,
so two archives whose manifests share a model name answer side by side; a start that fails says why."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from activeguard.guard.profile import Profile
from activeguard.models.architectures import LeNet5, save_model
from handlers.packaging import package
from tests.serving_fixtures import json_body, post

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
FREE_PORTS = [f"--{api}-port=0" for api in ("http", "grpc", "management", "metrics", "grpc-management")]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "activeguard.cli.app", *args]


def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """x.mar and y.mar: the same model, both with the manifest name "same"; x answers unlicensed clients
    with random outputs, y refuses them (403), so an answer tells which archive served it."""
    root = tmp_path_factory.mktemp("serve-names")
    torch.manual_seed(0)
    model_id = save_model(LeNet5(), root / "model.pt")
    store = root / "store"
    store.mkdir()
    for policy, name in (("random", "x.mar"), ("reject", "y.mar")):
        profile = Profile(model_id=model_id, input_shape=(1, 28, 28), policy=policy)
        built = package(root / "model.pt", profile, "same", root / policy)
        shutil.copyfile(built, store / name)
    for name in ("x.mar", "y.mar"):
        with zipfile.ZipFile(store / name) as archive:
            assert json.loads(archive.read("MAR-INF/MANIFEST.json"))["model"]["modelName"] == "same"
    return store


def test_archives_with_the_same_manifest_name_are_served_side_by_side(store, tmp_path):
    serve = subprocess.Popen(
        cli("serve", "a=x.mar", "b=y.mar", "--store", str(store), "--log-dir", str(tmp_path / "logs"), "--json")
        + FREE_PORTS,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment(),
    )
    try:
        line = serve.stdout.readline()  # one line of JSON once both have a READY worker
        assert line, f"serve exited {serve.wait()}: {serve.stderr.read()}"
        info = json.loads(line)
        assert info["models"] == ["a", "b"]
        x = json_body(torch.zeros(2, 1, 28, 28))
        status, body = post(f"{info['inference']}/predictions/a", x)
        assert status == 200 and len(body["outputs"]) == 2  # x.mar: random answers for the unlicensed
        status, body = post(f"{info['inference']}/predictions/b", x)
        assert status == 403 and body["reason"] == "no_credentials"  # y.mar: refusals
        status, _ = post(f"{info['inference']}/predictions/same", x)
        assert status == 404  # the manifests' name is served by neither
    finally:
        serve.send_signal(signal.SIGTERM)
        _, err = serve.communicate(timeout=60)
    assert serve.returncode == 0, err


def test_a_failed_start_prints_what_torchserve_said(store, tmp_path):
    """An archive whose handler cannot be loaded: its worker dies while loading, again and again; serve
    stops waiting, prints TorchServe's own error lines and exits 1."""
    with zipfile.ZipFile(store / "x.mar") as good, zipfile.ZipFile(tmp_path / "broken.mar", "w") as broken:
        for entry in good.namelist():
            data = good.read(entry)
            if entry == "MAR-INF/MANIFEST.json":
                manifest = json.loads(data)
                manifest["model"]["handler"] = "no_such_handler.py"
                data = json.dumps(manifest).encode()
            broken.writestr(entry, data)
    proc = subprocess.run(
        cli("serve", "broken=broken.mar", "--store", str(tmp_path), "--log-dir", str(tmp_path / "logs")) + FREE_PORTS,
        capture_output=True,
        text=True,
        env=environment(),
        timeout=150,
    )
    assert proc.returncode == 1, proc.stderr
    assert "activeguard serve: failed: no READY worker for 'broken'" in proc.stderr
    assert "TorchServe said:" in proc.stderr and "Backend worker process died" in proc.stderr
    assert "ModuleNotFoundError: No module named 'no_such_handler'" in proc.stderr
    assert f"full logs in {tmp_path / 'logs'}" in proc.stderr


def test_an_archive_that_is_not_a_zip_is_refused_before_starting(tmp_path):
    (tmp_path / "corrupt.mar").write_bytes(b"\x00" * 64)
    proc = subprocess.run(
        cli("serve", "c=corrupt.mar", "--store", str(tmp_path)) + FREE_PORTS,
        capture_output=True,
        text=True,
        env=environment(),
        timeout=60,
    )
    assert proc.returncode == 2
    assert "corrupt.mar is not a TorchServe archive (not a zip file)" in proc.stderr
