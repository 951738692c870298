"""URL audits of a pirate's own API: a copy of the owner's LeNet-5 (pruned 30%) in a real TorchServe behind a
handler that is not ActiveGuard's (tests/suspect_files/pirate_handler.py), audited over HTTP with
--request-template and --response-path and over TorchServe's gRPC API (grpc://). Each verdict must be the one
the pirate's model file gets when audited locally, with the same scores; wrong settings end in one line, exit 2.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from activeguard.cli.app import main
from activeguard.models import attacks
from activeguard.models.architectures import save_model
from handlers.server import ManagedTorchServe
from tests.protect_fixtures import archive

HANDLER = Path(__file__).with_name("suspect_files") / "pirate_handler.py"
PIRATE_TEMPLATE = '{"instances": {{rows}}}'


def cli(args: list[str]) -> tuple[int, str, str]:
    """``activeguard ARGS`` in this process (module fixtures cannot take capsys): exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


@dataclass
class Pirate:
    root: Path
    ts: ManagedTorchServe

    @property
    def http(self) -> str:
        return f"{self.ts.url}/predictions/pirate"

    @property
    def grpc(self) -> str:
        return f"grpc://{self.ts.grpc_target}/pirate"


@pytest.fixture(scope="module")
def pirate(lenet, tmp_path_factory):
    """The owner's checkpoint, and the pirate's TorchServe serving its pruned copy as TorchScript."""
    root = tmp_path_factory.mktemp("pirate")
    save_model(lenet, root / "owner.pt")
    stolen = attacks.global_prune(lenet, 0.3).eval()
    torch.jit.save(torch.jit.trace(stolen, torch.zeros(1, 1, 28, 28)), str(root / "pirate.pt"))
    archive(root / "store", "pirate", root / "pirate.pt", str(HANDLER))
    with ManagedTorchServe(root / "store", {"pirate": "pirate.mar"}) as ts:
        yield Pirate(root, ts)


@pytest.fixture(scope="module")
def fingerprint(pirate) -> Path:
    """The owner's IPGuard fingerprint with its null (8 references, cached in .activeguard-cache after a first run)."""
    fp = pirate.root / "owner.ipguard"
    code, _, err = cli(
        ["audit", "fingerprint", "ipguard", "--model", str(pirate.root / "owner.pt")]
        + ["--data", "mnist", "--out", str(fp), "--points", "100"]
    )
    assert code == 0, err
    return fp


def audit(fingerprint: Path, suspect: str, *flags: str) -> tuple[int, dict | None, str]:
    code, out, err = cli(
        ["audit", "ipguard", "--fingerprint", str(fingerprint), "--suspect", suspect, "--json", *flags]
    )
    return code, (json.loads(out) if out else None), err


@pytest.fixture(scope="module")
def local(pirate, fingerprint) -> dict:
    """The verdict on the pirate's model file itself: what every URL audit must reproduce."""
    code, verdict, err = audit(fingerprint, str(pirate.root / "pirate.pt"))
    assert code == 0 and verdict["verdict"] == "copy", err
    assert set(verdict["statistics"]) == {"matching", "owner_probability"}
    return verdict


def same_scores(remote: dict, local: dict, statistics: set[str]) -> None:
    assert remote["verdict"] == "copy" and remote["matched"] == local["matched"]
    assert set(remote["statistics"]) == statistics
    for name in statistics:  # the same points and the same answers, up to float32 noise of another batch size
        assert remote["statistics"][name] == pytest.approx(local["statistics"][name], abs=1e-5), name


def test_http_with_template_and_response_path(pirate, fingerprint, local):
    flags = ["--request-template", PIRATE_TEMPLATE, "--response-path", "predictions[*].probs", "--batch-size", "32"]
    code, verdict, err = audit(fingerprint, pirate.http, *flags)
    assert code == 0, err
    same_scores(verdict, local, {"matching", "owner_probability"})
    assert verdict["statistic"] == local["statistic"] and verdict["score"] == pytest.approx(local["score"], abs=1e-5)


def test_http_labels_only(pirate, fingerprint, local):
    """A path to labels alone: IPGuard judges the matching rate against its own null."""
    code, verdict, err = audit(
        fingerprint, pirate.http, "--request-template", PIRATE_TEMPLATE, "--response-path", "predictions[*].label"
    )
    assert code == 0, err
    same_scores(verdict, local, {"matching"})
    assert verdict["statistic"] == "matching"


def test_grpc_one_row_per_request(pirate, fingerprint, local, tmp_path):
    """TorchServe's gRPC API, one Predictions call per row, the template read from a file."""
    template = tmp_path / "template.json"
    template.write_text('{"instances": [{{row}}]}\n')
    code, verdict, err = audit(
        fingerprint, pirate.grpc, "--request-template", f"@{template}", "--response-path", "predictions[0].probs"
    )
    assert code == 0, err
    same_scores(verdict, local, {"matching", "owner_probability"})


@pytest.mark.parametrize(
    "suspect, flags, message",
    [
        (
            "http",
            ["--request-template", PIRATE_TEMPLATE, "--response-path", "predictions[*].scores"],
            r'response path predictions\[\*\]\.scores: predictions\[0\] has no key "scores": it is an object with '
            "keys label, probs",
        ),
        ("http", ["--request-template", '{"instances": []}'], "the request template has no placeholder"),
        ("grpc-nosuch", [], r"TorchServe there has no model 'nosuch' \([A-Z_]+: .*nosuch.*\)$"),
    ],
    ids=["wrong-response-path", "template-without-placeholder", "grpc-unknown-model"],
)
def test_errors_are_one_line(pirate, fingerprint, suspect, flags, message):
    url = {"http": pirate.http, "grpc-nosuch": f"grpc://{pirate.ts.grpc_target}/nosuch"}[suspect]
    code, out, err = audit(fingerprint, url, *flags)
    assert code == 2 and out is None
    assert err.startswith("activeguard audit: error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
