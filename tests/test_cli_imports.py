"""The command line builds its parsers without torch, grpc, scikit-learn or matplotlib (a structural check:
how fast it answers is measured by benchmarks/bench_cli.py, never asserted here), and what the parsers show
of modules that do load them (constants, the audit methods' flags) stays equal to its source."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from activeguard.cli import audit as audit_cli
from activeguard.cli import support

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "grpc", "sklearn", "matplotlib", "numpy")
PLUGIN_COMMANDS = {"serve", "package", "protect", "gateway", "license", "license-server", "demo", "audit"}


def loaded_after(code: str) -> dict:
    """Run ``code`` in a fresh interpreter (this checkout first on the path); report which heavy modules
    it loaded and what it left in ``result``."""
    probe = f"""
import json, sys
result = None
{code}
print(json.dumps({{"heavy": sorted(m for m in {HEAVY!r} if m in sys.modules), "result": result}}))
"""
    proc = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_building_every_parser_loads_none_of_the_heavy_packages():
    report = loaded_after(
        """
from activeguard.cli.app import build_parser
from license_server.cli import build_parser as license_server_parser
parser = build_parser()
license_server_parser()
commands = parser._subparsers._group_actions[0].choices
result = {name: str(p.description or "") for name, p in commands.items()}
"""
    )
    assert report["heavy"] == [], f"building the parser imported {report['heavy']}"
    commands = report["result"]
    missing = PLUGIN_COMMANDS - set(commands)
    assert not missing, f"plugins not registered: {missing}"  # else the check above would prove little


def test_license_header_needs_no_torch(tmp_path):
    import torch
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from activeguard.credentials import licenses
    from activeguard.credentials.control import ControlConfig
    from activeguard.credentials.header import decode_license_header

    key, config = Ed25519PrivateKey.generate(), ControlConfig()
    payload = licenses.make_payload(
        model_id="0" * 64,
        user="alice",
        user_index=3,
        fo=config.fo_of_user(3),
        epsilon=config.epsilon,
        fingerprint=torch.rand(1, 1, 28, 28),
        key=key,
        validity_seconds=60,
    )
    signed = licenses.sign_license(payload, key)
    path = licenses.write_license(signed, tmp_path / "alice.aglicense")
    report = loaded_after(
        f"""
import contextlib, io
from activeguard.cli.app import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    code = main(["license", "header", {str(path)!r}])
result = [code, out.getvalue()]
"""
    )
    assert report["heavy"] == [], f"license header imported {report['heavy']}"
    code, printed = report["result"]
    assert code == 0 and decode_license_header(printed.strip()) == signed.to_text()
    # the torch-free reading of a license is the same license, its fingerprint included
    read = licenses.read_license(path).parsed()
    assert torch.equal(read.fingerprint_tensor(), payload.fingerprint_tensor())


@pytest.mark.parametrize("name", sorted(support.MIRRORS))
def test_mirrored_constants_equal_their_source(name):
    module, _, attribute = support.MIRRORS[name].partition(":")
    value = importlib.import_module(module)
    for part in attribute.split("."):
        value = getattr(value, part)
    assert getattr(support, name) == value, f"activeguard.cli.support.{name} differs from {support.MIRRORS[name]}"


def test_the_audit_flags_are_the_methods_own():
    from activeguard.audit import base

    assert list(audit_cli.METHOD_FLAGS) == base.names()
    for name in base.names():
        live = audit_cli.method_flags(base.get(name))
        assert audit_cli.METHOD_FLAGS[name] == live, (
            f"activeguard.cli.audit.METHOD_FLAGS[{name!r}] is out of date; it should read:\n{live!r}"
        )
