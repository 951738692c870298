"""The core commands on a model the project has never seen (issue 13's "must show", core half).

``inspect``, ``fingerprint`` and ``watermark embed|verify`` run through ``activeguard.cli.app.main``
on DigitsCNN (``tests/test_sources.py``) saved as TorchScript, as an exported program and as a state
dict + model file, and every bad input ends in one clear line and exit code 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from activeguard.credentials.control import ControlConfig, decide
from activeguard.credentials.fingerprints import authenticate
from activeguard.models import sources
from activeguard.models.inputs import overrides_from_text
from tests.test_cli import PASS_ENV, run_cli
from tests.test_sources import (
    CONV_LAYERS,
    DEFAULT_LAYER,
    FORMATS,
    OWNER_MODEL,
    SPEC,
    USERS,
    OwnerFiles,
    loaded,  # noqa: F401  (module fixtures)
    owner,  # noqa: F401
    owner_class,
    save_owner,
)

# 1,437 rows of 8x8 digits are few steps per epoch: a stronger lambda than the paper's 0.01 lands all
# 13 digits in either block conv within 20 epochs (about 2 s) for every key drawn in trials.
EMBED = ["--data", "digits", "--epochs", "20", "--lam", "0.05"]


def read_fingerprints(out: Path, manifest: dict) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.load(out / e["file"])) for e in manifest["fingerprints"]])


def test_inspect_reports_one_model_id_for_every_format(owner, capsys):  # noqa: F811
    reports = {}
    for fmt in FORMATS:
        code, stdout, _ = run_cli(["inspect", *owner.cli_args(fmt, flag=None), "--json"], capsys)
        assert code == 0
        reports[fmt] = json.loads(stdout)
    assert {r["model_id"] for r in reports.values()} == {owner.model_id}
    assert {fmt: r["source"] for fmt, r in reports.items()} == {f: f for f in FORMATS}
    for report in reports.values():
        assert report["num_classes"] == 10 and report["input"] == SPEC.to_dict()
        assert report["parameters"] == sum(p.numel() for p in owner.network.parameters())
        assert [layer["name"] for layer in report["watermark_layers"]] == CONV_LAYERS
        assert report["default_watermark_layer"] == DEFAULT_LAYER
    assert [reports[f]["can_embed_watermark"] for f in FORMATS] == [True, False, True]
    code, text, _ = run_cli(["inspect", *owner.cli_args("eager", "--input-range", "0,255", flag=None)], capsys)
    assert code == 0 and owner.model_id in text and "10 classes" in text and "values in [0, 255]" in text
    assert f"* {DEFAULT_LAYER}" in text and "class DigitsCNN" in text


@pytest.mark.parametrize("fmt", FORMATS)
def test_fingerprint_command_users_authenticate_on_every_format(fmt, owner, loaded, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "fps"
    users = ",".join(map(str, USERS))
    code, stdout, _ = run_cli(
        ["fingerprint", *owner.cli_args(fmt), "--users", users, "--out", str(out), "--json"], capsys
    )
    manifest = json.loads(stdout)
    assert code == 0 and all(e["ok"] for e in manifest["fingerprints"])
    assert manifest["model_id"] == owner.model_id and manifest["source"]["format"] == fmt
    assert manifest["input"] == SPEC.to_dict() and manifest["seeds"] == "noise"
    inputs = read_fingerprints(out, manifest)
    for model in loaded.values():  # the control layer, as each format is served
        admitted, who = authenticate(model.model, inputs, ControlConfig())
        assert admitted.all() and who.tolist() == USERS


def test_fingerprint_help_says_no_data_is_needed(capsys):
    with pytest.raises(SystemExit):
        run_cli(["fingerprint", "--help"], capsys)
    assert "fingerprints need no data" in " ".join(capsys.readouterr().out.split())


def test_fingerprints_stay_in_a_0_255_client_range_with_normalization(owner, tmp_path, capsys):  # noqa: F811
    """Clients send 0..255 pixels, the network wants them / 255: fingerprints are client pixels."""
    flags = ["--input-range", "0,255", "--normalize", "0/255"]
    out = tmp_path / "fps"
    code, stdout, _ = run_cli(
        ["fingerprint", *owner.cli_args("eager", *flags), "--users", "0,14,29", "--encoding", "uint8"]
        + ["--out", str(out), "--json"],
        capsys,
    )
    manifest = json.loads(stdout)
    assert code == 0 and manifest["input"]["range"] == [0.0, 255.0]
    assert manifest["input"]["normalize"] == {"mean": [0.0], "std": [255.0]}
    rows = read_fingerprints(out, manifest)
    assert rows.min() >= 0 and rows.max() <= 255 and rows.max() > 1  # the client's range, not [0, 1]
    assert torch.equal(rows, rows.round())  # uint8: whole pixel values, as a client sends them
    for fmt in FORMATS:
        model = owner.load(fmt, overrides_from_text(None, "0,255", "0/255"))
        decision = decide(torch.softmax(model.model(rows), dim=1), ControlConfig())
        assert decision.authorized.all() and decision.user.tolist() == USERS


def verify(capsys, model_args: list[str], key: Path) -> tuple[int, dict]:
    code, stdout, _ = run_cli(["watermark", "verify", *model_args, "--key", str(key), "--json"], capsys, PASS_ENV)
    return code, json.loads(stdout)


def test_watermark_embeds_in_the_eager_model_and_verifies_on_every_format(owner, tmp_path, capsys):  # noqa: F811
    marked, key = tmp_path / "marked.state.pt", tmp_path / "owner.agkey"
    embed = ["watermark", "embed", *owner.cli_args("eager"), *EMBED, "--out", str(marked), "--key-out", str(key)]
    code, stdout, _ = run_cli([*embed, "--json"], capsys, PASS_ENV)
    report = json.loads(stdout)
    assert code == 0 and report["verified"] and report["digits"] == 13 and report["layer"] == DEFAULT_LAYER
    assert report["source"]["format"] == "eager" and report["source"]["model_file"] == str(owner.paths["model_file"])
    assert not {"filter", "positions", "a", "b"} & set(report) and "positions" not in stdout  # no key material
    state = torch.load(marked, weights_only=True)  # written back as a plain state dict
    result = save_owner(tmp_path / "formats", state, stem="marked")
    assert result.model_id == report["model_id"] != owner.model_id
    for fmt in FORMATS:
        code, verdict = verify(capsys, result.cli_args(fmt), key)
        assert code == 0 and verdict["verified"] and verdict["model_id"] == report["model_id"], fmt
    code, verdict = verify(capsys, owner.cli_args("export"), key)
    assert code == 1 and not verdict["verified"]  # the unmarked original is not ours


def test_watermark_embeds_in_torchscript_any_layer_and_keeps_the_format(owner, tmp_path, capsys):  # noqa: F811
    marked, key = tmp_path / "marked.ts", tmp_path / "owner.agkey"
    code, stdout, _ = run_cli(
        ["watermark", "embed", *owner.cli_args("torchscript"), "--layer", "block.0.weight", *EMBED]
        + ["--out", str(marked), "--key-out", str(key)],
        capsys,
        PASS_ENV,
    )
    assert code == 0 and "in block.0.weight: extracted 13/13" in stdout
    assert sources.detect(marked).name == "torchscript"
    code, verdict = verify(capsys, ["--model", str(marked)], key)
    assert code == 0 and verdict["source"]["format"] == "torchscript"


@pytest.fixture(scope="module")
def bad_dir(owner, tmp_path_factory) -> Path:  # noqa: F811
    """Files that must be refused: a pickled model, models that are not classifiers, bad data."""
    d = tmp_path_factory.mktemp("bad")
    pickled = owner_class(owner.paths["model_file"])()  # the class as its module now stands in sys.modules
    torch.save(pickled, d / "pickled.pt")  # torch.save(model): unpickling it would run code
    (d / "others.py").write_text(
        OWNER_MODEL
        + """

class Scores(DigitsCNN):
    def forward(self, x):
        return super().forward(x).sum(1)


class Pair(DigitsCNN):
    def forward(self, x):
        out = super().forward(x)
        return out, out
"""
    )
    torch.save(owner.network.state_dict(), d / "state.pt")
    np.savez(d / "no_x.npz", y=np.zeros(4, dtype=np.int64))
    np.savez(d / "pixels.npz", x=np.full((100, 1, 8, 8), 200, np.float32), y=np.arange(100) % 10)
    return d


def bad_case(owner: OwnerFiles, d: Path, case: str) -> list[str]:  # noqa: F811
    """The command line of one bad-input case (built here so the parametrization reads as a table)."""
    others = ["--model-file", str(d / "others.py"), "--input-shape", "1,8,8", "--model-class"]
    ts = str(owner.paths["torchscript"])
    out = ["--out", str(d / "out"), "--key-out", str(d / "key")]
    return {
        "pickled": ["inspect", str(d / "pickled.pt")],
        "missing-class": ["inspect", str(d / "state.pt"), *others, "Missing"],
        "shape": ["fingerprint", *owner.cli_args("torchscript", "--input-shape", "3,8,8"), "--out", str(d / "o")],
        "scalar-output": ["fingerprint", "--model", str(d / "state.pt"), *others, "Scores", "--out", str(d / "o")],
        "tuple-output": [
            "watermark",
            "verify",
            "--model",
            str(d / "state.pt"),
            *others,
            "Pair",
            "--key",
            str(d / "key"),
        ],
        "npz-without-x": ["fingerprint", "--model", ts, "--data", str(d / "no_x.npz"), "--out", str(d / "o")],
        "data-out-of-range": ["watermark", "embed", "--model", ts, "--data", str(d / "pixels.npz"), *out],
        "export-embed": ["watermark", "embed", "--model", str(owner.paths["export"]), "--data", "digits", *out],
        "missing-layer": ["watermark", "embed", "--model", ts, "--layer", "conv2.weight", "--data", "digits", *out],
    }[case]


@pytest.mark.parametrize(
    "case, message",
    [
        ("pickled", "is a pickled Python object"),
        ("missing-class", "has no nn.Module class 'Missing' (classes there: DigitsCNN, Pair, Scores)"),
        ("shape", "cannot take inputs of shape (3, 8, 8)"),
        ("scalar-output", "is not a classifier: it answers shape (2,)"),
        ("tuple-output", "returns tuple, not a tensor"),
        ("npz-without-x", "has no array 'x'"),
        ("data-out-of-range", "outside the model's input range [0, 1]"),
        ("export-embed", "embed the watermark in the eager or TorchScript model and export it after"),
        ("missing-layer", "no parameter 'conv2.weight'; layer weights: stem.0.weight, block.0.weight"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(case, message, owner, bad_dir, capsys):  # noqa: F811
    code, stdout, err = run_cli(bad_case(owner, bad_dir, case), capsys, PASS_ENV)
    assert code == 2 and not stdout
    assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err
    assert not (bad_dir / "out").exists() and not (bad_dir / "key").exists()
