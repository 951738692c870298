"""`activeguard audit …` end to end on files: fingerprint the owner, judge a copy and a stranger."""

from __future__ import annotations

import json

import pytest
import torch

from activeguard import attacks
from activeguard.audit import files
from activeguard.models import MLPClassifier, save_model
from tests.test_cli import run_cli


@pytest.fixture(scope="module")
def checkpoints(lenet, tmp_path_factory):
    """The owner, a 30%-pruned copy of it, and an unrelated (untrained) MLP, as checkpoint files."""
    d = tmp_path_factory.mktemp("audit-cli")
    save_model(lenet, d / "owner.pt")
    save_model(attacks.global_prune(lenet, 0.3), d / "pruned.pt")
    torch.manual_seed(5)
    save_model(MLPClassifier(), d / "stranger.pt")
    return d


@pytest.mark.parametrize("kind, extra", [("ipguard", []), ("tafa", ["--solver", "gradient"])])
def test_fingerprint_then_verdicts(checkpoints, capsys, kind, extra):
    d = checkpoints
    fp = d / f"owner.{kind}"
    code, out, err = run_cli(
        [
            "audit",
            "fingerprint",
            kind,
            "--model",
            str(d / "owner.pt"),
            "--out",
            str(fp),
            "--points",
            "30",
            "--json",
            *extra,
        ],
        capsys,
    )
    assert code == 0, err
    made = json.loads(out)
    assert (
        made["points"] == 30 and made["kind"] == kind and files.load(fp, kind=kind).meta["input_shape"] == [1, 28, 28]
    )

    verdicts = {}
    for name in ("owner", "pruned", "stranger"):
        code, out, err = run_cli(
            ["audit", kind, "--fingerprint", str(fp), "--suspect", str(d / f"{name}.pt"), "--json"], capsys
        )
        assert code in (0, 1), err
        verdict = json.loads(out)
        assert code == (0 if verdict["verified"] else 1)  # exit code follows the verdict
        assert verdict["threshold"] == pytest.approx({"ipguard": 0.55, "tafa": 0.5}[kind])
        verdicts[name] = verdict
    assert verdicts["owner"]["verified"] and verdicts["owner"]["score"] == pytest.approx(1.0)
    assert verdicts["pruned"]["verified"]
    assert not verdicts["stranger"]["verified"]
    assert verdicts["stranger"]["score"] < verdicts["pruned"]["score"]

    # the threshold can be overridden, and out-of-range values are a usage error
    code, out, _ = run_cli(
        ["audit", kind, "--fingerprint", str(fp), "--suspect", str(d / "stranger.pt"), "--threshold", "0", "--json"],
        capsys,
    )
    assert code == 0 and json.loads(out)["verified"]
    code, _, err = run_cli(
        ["audit", kind, "--fingerprint", str(fp), "--suspect", str(d / "owner.pt"), "--threshold", "1.5"], capsys
    )
    assert code == 2 and "--threshold" in err


def test_bad_inputs_name_the_problem(checkpoints, capsys, tmp_path):
    d = checkpoints
    fp = tmp_path / "owner.ipguard"
    assert (
        run_cli(
            ["audit", "fingerprint", "ipguard", "--model", str(d / "owner.pt"), "--out", str(fp), "--points", "5"],
            capsys,
        )[0]
        == 0
    )

    empty = tmp_path / "empty.ipguard"
    empty.write_bytes(b"")
    code, _, err = run_cli(["audit", "ipguard", "--fingerprint", str(empty), "--suspect", str(d / "owner.pt")], capsys)
    assert code == 2 and "empty" in err

    code, _, err = run_cli(["audit", "cem", "--fingerprint", str(fp), "--suspect", str(d / "owner.pt")], capsys)
    assert code == 2 and "ipguard fingerprint, not cem" in err  # the wrong kind says which command to use

    other_shape = tmp_path / "wide.pt"
    save_model(MLPClassifier(in_features=100), other_shape)
    code, _, err = run_cli(["audit", "ipguard", "--fingerprint", str(fp), "--suspect", str(other_shape)], capsys)
    assert code == 2 and "shape" in err

    code, _, err = run_cli(
        [
            "audit",
            "ipguard",
            "--fingerprint",
            str(fp),
            "--suspect",
            "http://127.0.0.1:9/predictions/x",
            "--timeout",
            "2",
        ],
        capsys,
    )
    assert code == 2 and "127.0.0.1:9" in err  # nothing listens on the discard port: a named connection error
