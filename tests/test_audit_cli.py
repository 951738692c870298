"""`activeguard audit …` end to end on files: fingerprint the owner, judge a copy and a stranger."""

from __future__ import annotations

import json

import pytest
import torch

from activeguard.audit import files
from activeguard.models import attacks
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


@pytest.mark.parametrize(
    "kind, extra", [("ipguard", ["--data", "mnist"]), ("tafa", ["--solver", "gradient", "--data", "mnist"])]
)
def test_fingerprint_with_its_null_then_verdicts(checkpoints, capsys, kind, extra):
    """`audit fingerprint` trains 8 references from --data (cached for the session) and stores their scores;
    the owner and its pruned copy are judged copies (exit 0), an unrelated model not a copy (exit 1)."""
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
            "100",
            "--json",
            *extra,
        ],
        capsys,
    )
    assert code == 0, err
    made = json.loads(out)
    assert (
        made["points"] >= 90 and made["kind"] == kind and files.load(fp, kind=kind).meta["input_shape"] == [1, 28, 28]
    )
    calibration = made["calibration"]
    assert calibration["null"]["size"] == 8 and len(made["references"]) == 8
    assert calibration["statistic"] in files.load(fp).calibration.nulls and calibration["selections"] >= 1

    verdicts = {}
    for name in ("owner", "pruned", "stranger"):
        code, out, err = run_cli(
            ["audit", kind, "--fingerprint", str(fp), "--suspect", str(d / f"{name}.pt"), "--json"], capsys
        )
        verdict = json.loads(out)
        assert code == {"copy": 0, "not a copy": 1, "inconclusive": 3}[verdict["verdict"]], err  # exit follows verdict
        assert verdict["calibrated"] and verdict["null"]["size"] == 8 and 0 <= verdict["chance_bound"] <= 1
        verdicts[name] = verdict
    assert verdicts["owner"]["verdict"] == "copy" and verdicts["owner"]["chance_bound"] <= 1e-3
    assert verdicts["pruned"]["verdict"] == "copy"
    # an independent regressor is never accused; with 6 references it scores above all of them by chance 1 time
    # in 7, and then the verdict is inconclusive (the bound cannot reach alpha), not "not a copy"
    assert verdicts["stranger"]["verdict"] in ("not a copy", "inconclusive"), (
        verdicts["stranger"] and verdicts["stranger"]["chance_bound"] > 1e-3
    )
    # a stricter alpha is honoured, and an alpha outside (0, 1) is a usage error
    code, out, _ = run_cli(
        ["audit", kind, "--fingerprint", str(fp), "--suspect", str(d / "pruned.pt"), "--alpha", "1e-300", "--json"],
        capsys,
    )
    assert code == 3 and json.loads(out)["verdict"] == "inconclusive"
    code, _, err = run_cli(
        ["audit", kind, "--fingerprint", str(fp), "--suspect", str(d / "owner.pt"), "--alpha", "1.5"], capsys
    )
    assert code == 2 and "--alpha" in err


def test_an_uncalibrated_fingerprint_never_accuses(checkpoints, capsys, tmp_path):
    """Without references a fingerprint still scores, but even the owner itself is only 'inconclusive' (exit 3)."""
    d = checkpoints
    fp = tmp_path / "bare.ipguard"
    args = ["audit", "fingerprint", "ipguard", "--model", str(d / "owner.pt"), "--out", str(fp), "--points", "30"]
    code, out, err = run_cli([*args, "--train-references", "0"], capsys)
    assert code == 0 and "uncalibrated" in out, err
    code, out, _ = run_cli(
        ["audit", "ipguard", "--fingerprint", str(fp), "--suspect", str(d / "owner.pt"), "--json"], capsys
    )
    verdict = json.loads(out)
    assert code == 3 and verdict["verdict"] == "inconclusive" and verdict["score"] == pytest.approx(1.0)
    assert "uncalibrated" in verdict["reason"] and not verdict["calibrated"]


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
    """`audit all`: each fingerprint judged against its own null at alpha over the methods, plus the watermark
    for a local suspect of the owner's architecture (aligned with --owner), reported not applicable, with
    the reason, for one of another architecture; a copy when any method says so."""
    from activeguard.watermark import digits as wm
    from tests.test_cli import PASS_ENV

    d = checkpoints
    fps = [d / "owner.ipguard", d / "owner.tafa"]  # made with their nulls by the test above, else here
    for fp, extra in zip(fps, ([], ["--solver", "gradient", "--data", "mnist"])):
        if not fp.exists():
            kind = fp.suffix[1:]
            args = ["audit", "fingerprint", kind, "--model", str(d / "owner.pt"), "--out", str(fp), "--points", "100"]
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
        assert code == {"copy": 0, "not a copy": 1, "inconclusive": 3}[verdicts[name]["verdict"]], err
    pruned, stranger = verdicts["pruned"], verdicts["stranger"]
    assert [r["method"] for r in pruned["methods"]] == ["ipguard", "tafa"]
    assert pruned["verdict"] == "copy" and pruned["alpha_per_method"] == pytest.approx(5e-4)
    assert pruned["calibrated_methods"] == ["ipguard", "tafa"]
    assert stranger["verdict"] == "not a copy" and not any(r["verified"] for r in stranger["methods"])
    for row in pruned["methods"] + stranger["methods"]:
        assert {"score", "statistic", "null", "chance_bound", "verdict", "reason", "explanation"} <= set(row)
    # the watermark joins for a local suspect, aligned to the owner's model
    keyed = ["--key", str(tmp_path / "owner.agkey"), "--owner", str(d / "owner.pt")]
    code, out, err = run_cli(
        ["audit", "all", *common, *keyed, "--suspect", str(d / "pruned.pt"), "--json"], capsys, PASS_ENV
    )
    found = json.loads(out)
    mark = found["methods"][-1]
    assert code == 0 and found["verdict"] == "copy" and mark["method"] == "watermark" and mark["aligned_to_owner"]
    assert mark["verdict"] == "not a copy" and mark["threshold"] == 1e-6 and mark["digits"] == 13
    # a suspect of another architecture: the watermark is not applicable (the reason named), the rest still runs
    code, out, err = run_cli(
        ["audit", "all", *common, *keyed, "--suspect", str(d / "stranger.pt"), "--json"], capsys, PASS_ENV
    )
    found = json.loads(out)
    mark = found["methods"][-1]
    assert code == 1 and found["verdict"] == "not a copy", err
    assert "skipped" in mark and "conv2.weight" in mark["skipped"] and len(found["methods"]) == 3
    code, out, err = run_cli(["audit", "all", *common, *keyed, "--suspect", str(d / "stranger.pt")], capsys, PASS_ENV)
    assert "watermark: not applicable" in out
    code, out, err = run_cli(["audit", "all", "--suspect", str(d / "owner.pt")], capsys)
    assert code == 2 and "--fingerprint" in err


def test_audit_all_takes_the_suspects_input_spec(checkpoints, lenet, capsys, tmp_path):
    """A state-dict suspect that does not say what its input is: `audit all` takes --input-shape (and its
    model file) for the black-box methods and the watermark alike."""
    from activeguard.watermark import digits as wm
    from tests.test_cli import PASS_ENV

    d = checkpoints
    torch.save(lenet.state_dict(), tmp_path / "weights.pt")
    (tmp_path / "net.py").write_text(
        "from activeguard.models.architectures import LeNet5\n\n\nclass Net(LeNet5):\n    pass\n"
    )
    key = wm.generate_key(lenet, wm.WM1, experiment_seed=1)
    wm.save_key(key, tmp_path / "owner.agkey", PASS_ENV["ACTIVEGUARD_WM_PASSPHRASE"])
    fp = d / "owner.ipguard"
    if not fp.exists():
        args = ["audit", "fingerprint", "ipguard", "--model", str(d / "owner.pt"), "--out", str(fp), "--points", "100"]
        assert run_cli(args, capsys)[0] == 0
    suspect = ["--suspect", str(tmp_path / "weights.pt"), "--suspect-model-file", str(tmp_path / "net.py")]
    keyed = ["--key", str(tmp_path / "owner.agkey")]
    code, _, err = run_cli(["audit", "all", "--fingerprint", str(fp), *keyed, *suspect, "--json"], capsys, PASS_ENV)
    assert code == 2 and "--input-shape" in err  # the watermark's load needs to know the input
    code, out, err = run_cli(
        ["audit", "all", "--fingerprint", str(fp), *keyed, *suspect, "--input-shape", "1,28,28", "--json"],
        capsys,
        PASS_ENV,
    )
    found = json.loads(out)
    assert code == 0 and found["verdict"] == "copy", err
    assert [r["method"] for r in found["methods"]] == ["ipguard", "watermark"]


def _lenet(path):
    from activeguard.models import sources

    return sources.load(path).model


def test_tafa_fingerprints_a_torchscript_regressor_given_its_task(tmp_path, capsys):
    """TAFA is task-agnostic: a TorchScript regressor (its file cannot say what it does) is fingerprinted with
    --task regression, calibrated on reference regressors the owner supplies (--reference, any source), and
    its suspects are loaded as regressors, not probed as classifiers."""
    x = torch.rand(512, 6, generator=torch.Generator().manual_seed(0))  # not the global RNG: test order must not matter
    y = (x @ torch.linspace(-1, 1, 6)).reshape(-1, 1) + 0.1 * torch.sin(8 * x[:, :1])

    def regressor(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
        return train(net, x, y, loss="mse", epochs=5, seed=seed)

    owner, stranger = regressor(1), regressor(2)
    suspects = {"owner": owner, "pruned": attacks.global_prune(owner, 0.2), "stranger": stranger}
    suspects.update({f"reference{a}": regressor(10 + a) for a in range(6)})
    for name, model in suspects.items():
        torch.jit.script(model).save(str(tmp_path / f"{name}.ts"))
    fp = tmp_path / "owner.agfp"
    base = ["audit", "fingerprint", "tafa", "--model", str(tmp_path / "owner.ts"), "--input-shape", "6"]
    code, _, err = run_cli([*base, "--out", str(fp)], capsys)
    assert code == 2 and "is not a classifier" in err  # without --task it is taken for a classifier
    references = [arg for a in range(6) for arg in ("--reference", str(tmp_path / f"reference{a}.ts"))]
    code, out, err = run_cli([*base, "--task", "regression", "--out", str(fp), *references, "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["calibration"]["null"]["size"] == 6
    verdicts = {}
    for name in ("owner", "pruned", "stranger"):
        code, out, err = run_cli(
            ["audit", "tafa", "--fingerprint", str(fp), "--suspect", str(tmp_path / f"{name}.ts"), "--json"], capsys
        )
        assert code in (0, 1, 3), err
        verdicts[name] = json.loads(out)
    assert verdicts["owner"]["verdict"] == "copy"
    assert verdicts["pruned"]["verdict"] == "copy"
    # an independent regressor is never accused; with 6 references it scores above all of them by chance 1 time
    # in 7, and then the verdict is inconclusive (the bound cannot reach alpha), not "not a copy"
    assert verdicts["stranger"]["verdict"] in ("not a copy", "inconclusive"), verdicts["stranger"]
