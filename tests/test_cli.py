"""The admin CLI end to end: real files, real exit codes, and the demo's report."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from activeguard.cli.app import main
from activeguard.models.architectures import save_model

PASS_ENV = {"ACTIVEGUARD_WM_PASSPHRASE": "correct horse battery staple"}


@pytest.fixture()
def model_file(lenet, tmp_path) -> Path:
    path = tmp_path / "model.pt"
    save_model(lenet, path)
    return path


def run_cli(args, capsys, env=None):
    old = dict(os.environ)
    os.environ.update(env or {})
    try:
        code = main(args)
    finally:
        os.environ.clear()
        os.environ.update(old)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_fingerprint_command_writes_verified_files(model_file, tmp_path, capsys, lenet):
    import numpy as np
    import torch

    from activeguard.credentials.control import ControlConfig
    from activeguard.credentials.fingerprints import authenticate

    out = tmp_path / "fps"
    code, stdout, _ = run_cli(
        ["fingerprint", "--model", str(model_file), "--users", "0,14-15", "--out", str(out), "--json"], capsys
    )
    assert code == 0
    manifest = json.loads(stdout)
    assert [e["user"] for e in manifest["fingerprints"]] == [0, 14, 15]
    inputs = torch.stack([torch.from_numpy(np.load(out / e["file"])) for e in manifest["fingerprints"]])
    admitted, who = authenticate(lenet, inputs, ControlConfig())
    assert admitted.all() and who.tolist() == [0, 14, 15]


def test_watermark_embed_and_verify_with_exit_codes(model_file, tmp_path, capsys):
    marked, key = tmp_path / "marked.pt", tmp_path / "owner.agkey"
    code, stdout, _ = run_cli(
        ["watermark", "embed", "--model", str(model_file), "--out", str(marked), "--key-out", str(key), "--json"],
        capsys,
        PASS_ENV,
    )
    result = json.loads(stdout)
    assert code == 0 and result["verified"] and result["digits"] == 13
    assert "correct horse" not in stdout
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    code, stdout, _ = run_cli(
        ["watermark", "verify", "--model", str(marked), "--key", str(key), "--json"], capsys, PASS_ENV
    )
    assert code == 0 and json.loads(stdout)["verified"]
    code, stdout, _ = run_cli(
        ["watermark", "verify", "--model", str(model_file), "--key", str(key), "--json"], capsys, PASS_ENV
    )
    assert code == 1 and not json.loads(stdout)["verified"]  # the unmarked original is not ours
    code, _, err = run_cli(
        ["watermark", "verify", "--model", str(marked), "--key", str(key)],
        capsys,
        {"ACTIVEGUARD_WM_PASSPHRASE": "wrong"},
    )
    assert code == 2 and "wrong passphrase" in err
    # a pirate permutes and rescales the watermarked filters (the outputs stay); with --owner the
    # suspect is aligned to the original first and verifies again, through `audit watermark` too
    from activeguard.models import attacks, sources
    from activeguard.models.inputs import network_of

    model = network_of(sources.load(marked).model)
    pirate = attacks.rescale_channels(attacks.permute_channels(model, "conv2", "fc1", seed=1), "conv2", "fc1")
    pirated = tmp_path / "pirated.pt"
    save_model(pirate, pirated)
    base = ["--model", str(pirated), "--key", str(key), "--json"]
    code, stdout, _ = run_cli(["watermark", "verify", *base], capsys, PASS_ENV)
    assert code == 1 and json.loads(stdout)["digits_matched"] < 13
    for command in (["watermark", "verify"], ["audit", "watermark"]):
        code, stdout, _ = run_cli([*command, *base, "--owner", str(marked)], capsys, PASS_ENV)
        found = json.loads(stdout)
        assert code == 0 and found["verified"] and found["aligned_to_owner"] and found["digits_matched"] == 13
        assert found["threshold"] == 1e-6 and found["alignment_similarity"] > 0.999


def test_watermark_key_is_secret_unless_an_experiment_seed_is_given(model_file, tmp_path, capsys, monkeypatch):
    from activeguard.watermark import digits as wm

    monkeypatch.setattr(wm, "embed", lambda model, *args, **kwargs: model)  # only the key matters here

    def embed(name: str, *extra: str) -> tuple[wm.WatermarkKey, dict, str]:
        key_path = tmp_path / f"{name}.agkey"
        _, stdout, err = run_cli(
            [
                "watermark",
                "embed",
                "--model",
                str(model_file),
                "--out",
                str(tmp_path / f"{name}.pt"),
                "--key-out",
                str(key_path),
                "--json",
                *extra,
            ],
            capsys,
            PASS_ENV,
        )
        return wm.load_key(key_path, PASS_ENV["ACTIVEGUARD_WM_PASSPHRASE"]), json.loads(stdout), err

    first, report, err = embed("first")
    second, _, _ = embed("second")
    assert first.positions != second.positions and report["key_source"] == "os-entropy" and not err
    seeded, report, err = embed("seeded", "--experiment-seed", "5")
    assert seeded == embed("again", "--experiment-seed", "5")[0]
    assert report["key_source"] == "experiment-seed" and "guessable" in err
    with pytest.raises(SystemExit):
        main(["watermark", "embed", "--help"])
    help_text = capsys.readouterr().out
    assert "--experiment-seed" in help_text and "guessable" in help_text


@pytest.mark.parametrize(
    "args, message",
    [
        (["watermark", "embed", "--model", "MODEL", "--out", "x.pt", "--key-out", "k", "--digits", "12a"], "digits"),
        (["fingerprint", "--model", "MODEL", "--users", "1-x", "--out", "o"], "--users"),
        (["fingerprint", "--model", "MODEL", "--confidences", "0.05,0.3", "--out", "o"], "out of range"),
        (["fingerprint", "--model", "missing.pt", "--out", "o"], "does not exist"),
    ],
)
def test_usage_errors_exit_2_with_a_message(args, message, model_file, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [str(model_file) if a == "MODEL" else a for a in args]
    code, _, err = run_cli(args, capsys, PASS_ENV)
    assert code == 2 and message in err


def test_core_evaluation_runs_end_to_end_and_reports(tmp_path):
    out = tmp_path / "core"
    proc = subprocess.run(
        [
            str(Path(sys.executable).with_name("activeguard")),
            "evaluate",
            "core",
            "--quick",
            "--out",
            str(out),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, **PASS_ENV, "ACTIVEGUARD_CACHE": str(tmp_path / "cache")},  # not the repo's cache
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    steps = report["steps"]
    assert steps["train"]["test_accuracy"] >= 0.95
    assert steps["embed"]["wm1"]["verified"] and steps["embed"]["wm2"]["verified"]
    assert not steps["embed"]["unmarked_model"]["verified"]
    assert steps["fingerprints"]["minimum"] >= 0.95 and steps["fingerprints"]["wrong_identity"] == 0
    assert abs(steps["control"]["unauthorized_accuracy"] - 0.1) <= 0.05
    signed = steps["control"]["signed_capacity"]
    assert signed["scheme"] == "ranked" and signed["issuable"] >= 10_000
    assert 0 < signed["reached_by_noise_not_issued"] < signed["capacity"] // 10
    assert max(signed["max_false_acceptance_per_license"].values()) <= 2e-3
    assert len(steps["attacks"]["pruning_wm1"]) == 9
    assert (out / "report.md").read_text().startswith("# ActiveGuard core report")
    assert (out / "pruning.png").stat().st_size > 1000
    assert (out / "watermark.agkey").exists() and "correct horse" not in proc.stdout


def test_a_reader_that_leaves_early_ends_the_cli_quietly(model_file):
    """`activeguard … | head` closes the pipe before the CLI writes: no traceback, the shell's SIGPIPE exit
    status (before, Python printed a BrokenPipeError traceback, and another at exit)."""
    from activeguard.cli.app import EXIT_BROKEN_PIPE

    proc = subprocess.Popen(
        [sys.executable, "-m", "activeguard.cli.app", "inspect", str(model_file), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # the reader is gone before the CLI has imported anything
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=120) == EXIT_BROKEN_PIPE
    assert "Traceback" not in err and "BrokenPipe" not in err
