"""`activeguard audit …` end to end on files: fingerprint the owner, judge a copy and a stranger."""

from __future__ import annotations

import json

import pytest
import torch

from activeguard.audit import files
from activeguard.experiments import attacks
from activeguard.models.architectures import MLPClassifier, save_model, train
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

    junk = tmp_path / "junk.ipguard"
    junk.write_bytes(bytes(range(256)) * 2)  # a pickle opcode the weights-only loader refuses
    code, _, err = run_cli(["audit", "ipguard", "--fingerprint", str(junk), "--suspect", str(d / "owner.pt")], capsys)
    assert code == 2 and "not an ActiveGuard fingerprint file" in err
    assert "weights_only` set to `False`" not in err and len(err.splitlines()) == 1  # no advice to load unsafely
    truncated = tmp_path / "truncated.ipguard"
    truncated.write_bytes(fp.read_bytes()[:300])
    code, _, err = run_cli(
        ["audit", "ipguard", "--fingerprint", str(truncated), "--suspect", str(d / "owner.pt")], capsys
    )
    assert code == 2 and "not an ActiveGuard fingerprint file" in err and len(err.splitlines()) == 1

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


def test_audit_all_combines_every_method_into_one_verdict(checkpoints, capsys, tmp_path):
    """`audit all`: each fingerprint's method with its own threshold, plus the watermark for a local
    suspect (aligned to the owner with --owner); the suspect is a copy when any method says so."""
    from activeguard.watermark import digits as wm
    from tests.test_cli import PASS_ENV

    d = checkpoints
    fps = []
    for kind, extra in (("ipguard", []), ("tafa", ["--solver", "gradient"])):
        fps.append(tmp_path / f"owner.{kind}")
        args = ["audit", "fingerprint", kind, "--model", str(d / "owner.pt"), "--out", str(fps[-1]), "--points", "20"]
        assert run_cli([*args, *extra], capsys)[0] == 0
    key = wm.generate_key(_lenet(d / "owner.pt"), wm.WM1)  # the owner was never marked: the mark reads as absent
    wm.save_key(key, tmp_path / "owner.agkey", PASS_ENV["ACTIVEGUARD_WM_PASSPHRASE"])
    common = [arg for fp in fps for arg in ("--fingerprint", str(fp))]
    verdicts = {}
    for name in ("pruned", "stranger"):
        code, out, err = run_cli(
            ["audit", "all", *common, "--suspect", str(d / f"{name}.pt"), "--json"], capsys, PASS_ENV
        )
        verdicts[name] = json.loads(out)
        assert code == (0 if verdicts[name]["verified"] else 1), err
    pruned, stranger = verdicts["pruned"], verdicts["stranger"]
    assert [r["method"] for r in pruned["methods"]] == ["ipguard", "tafa"]
    assert pruned["verified"] and any(r["verified"] for r in pruned["methods"])
    assert not stranger["verified"] and not any(r["verified"] for r in stranger["methods"])
    for row in pruned["methods"] + stranger["methods"]:
        assert {"score", "threshold", "explanation", "score_name"} <= set(row)
    # the watermark joins for a local suspect, aligned to the owner's model
    keyed = ["--key", str(tmp_path / "owner.agkey"), "--owner", str(d / "owner.pt")]
    code, out, err = run_cli(
        ["audit", "all", *common, *keyed, "--suspect", str(d / "pruned.pt"), "--json"], capsys, PASS_ENV
    )
    found = json.loads(out)
    mark = found["methods"][-1]
    assert code == 0 and found["verified"] and mark["method"] == "watermark" and mark["aligned_to_owner"]
    assert not mark["verified"] and mark["threshold"] == 1e-6 and mark["digits"] == 13
    code, out, err = run_cli(
        [
            "audit",
            "all",
            "--key",
            str(tmp_path / "owner.agkey"),
            "--owner",
            str(d / "owner.pt"),
            "--suspect",
            str(d / "stranger.pt"),
            "--json",
        ],
        capsys,
        PASS_ENV,
    )
    assert code == 2 and "conv" in err  # the MLP stranger has no conv layer for the key: a clear usage error
    code, out, err = run_cli(["audit", "all", "--suspect", str(d / "owner.pt")], capsys)
    assert code == 2 and "--fingerprint" in err


def _lenet(path):
    from activeguard.models import sources

    return sources.load(path).model


def test_tafa_fingerprints_a_torchscript_regressor_given_its_task(tmp_path, capsys):
    """TAFA is task-agnostic: a TorchScript regressor (its file cannot say what it does) is fingerprinted with
    --task regression, and its suspects are loaded as regressors, not probed as classifiers."""

    def regressor(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
        return train(net, torch.rand(512, 6), torch.rand(512, 1), loss="mse", epochs=5, seed=seed)

    owner, stranger = regressor(1), regressor(2)
    for name, model in (("owner", owner), ("pruned", attacks.global_prune(owner, 0.2)), ("stranger", stranger)):
        torch.jit.script(model).save(str(tmp_path / f"{name}.ts"))
    fp = tmp_path / "owner.agfp"
    base = ["audit", "fingerprint", "tafa", "--model", str(tmp_path / "owner.ts"), "--input-shape", "6"]
    code, _, err = run_cli([*base, "--out", str(fp)], capsys)
    assert code == 2 and "is not a classifier" in err  # without --task it is taken for a classifier
    code, _, err = run_cli([*base, "--task", "regression", "--out", str(fp), "--json"], capsys)
    assert code == 0, err
    verdicts = {}
    for name in ("owner", "pruned", "stranger"):
        code, out, err = run_cli(
            ["audit", "tafa", "--fingerprint", str(fp), "--suspect", str(tmp_path / f"{name}.ts"), "--json"], capsys
        )
        assert code in (0, 1), err
        verdicts[name] = json.loads(out)
    assert verdicts["owner"]["verified"] and verdicts["owner"]["score"] == pytest.approx(1.0)
    assert verdicts["pruned"]["verified"]
    assert not verdicts["stranger"]["verified"]
