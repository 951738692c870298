"""Command-line parsing and the small commands around serving: negative numbers as option values, the
request limits of `package`, what `serve` refuses before TorchServe starts, and `gateway init`."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch

from activeguard.cli.app import build_parser, main
from activeguard.cli.support import MAX_BODY_BYTES, MAX_ROWS, UsageError, join_negative_values
from activeguard.models.architectures import LeNet5, save_model
from handlers.cli import served_models


@pytest.fixture(scope="module")
def parser():
    return build_parser()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[Path, str]:
    """An untrained LeNet-5 checkpoint and its model id (nothing here needs a trained one)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    return path, save_model(LeNet5(), path)


@pytest.mark.parametrize("value", ["-3,3", "-1.5,2"])
def test_a_negative_input_range_is_a_value_not_an_option(parser, value):
    for argv in (
        ["inspect", "m.pt", "--input-range", value],
        ["audit", "fingerprint", "ipguard", "--model", "m.pt", "--out", "o.agfp", "--input-range", value],
        ["audit", "fingerprint", "tafa", "--model", "m.pt", "--out", "o.agfp", "--input-range", value, "--json"],
        ["audit", "ipguard", "--fingerprint", "o.agfp", "--suspect", "s.pt", "--input-range", value],
    ):
        assert parser.parse_args(argv).input_range == value, argv


def test_only_number_values_of_one_value_options_are_joined(parser):
    args = ["--input-range", "-1,1", "--json", "--normalize", "-0.5/0.25", "--", "--input-range", "-2,2"]
    inspect = parser._subparsers._group_actions[0].choices["inspect"]
    joined = join_negative_values(inspect, args)
    assert joined == ["--input-range=-1,1", "--json", "--normalize=-0.5/0.25", "--", "--input-range", "-2,2"]
    assert join_negative_values(inspect, ["--json", "-h"]) == ["--json", "-h"]  # no number: untouched


def test_inspect_reads_a_negative_range_end_to_end(model, capsys):
    path, _ = model
    assert main(["inspect", str(path), "--input-range", "-1.5,2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["input"]["range"] == [-1.5, 2.0]


def test_package_limits_reach_the_profile(model, tmp_path, capsys):
    path, model_id = model
    store = tmp_path / "store"
    base = ["package", "--model", str(path), "--name", "small", "--store", str(store), "--json"]
    assert main([*base, "--max-rows", "8", "--max-body-bytes", "65536"]) == 0
    with zipfile.ZipFile(store / "small.mar") as archive:
        profile = json.loads(archive.read("activeguard-profile.json"))
    assert (profile["model_id"], profile["max_rows"], profile["max_body_bytes"]) == (model_id, 8, 65536)
    with pytest.raises(SystemExit) as info:
        main([*base, "--max-rows", "0"])
    assert info.value.code == 2
    help_text = build_parser()._subparsers._group_actions[0].choices["package"].format_help()
    assert f"default {MAX_ROWS}" in help_text and str(MAX_BODY_BYTES) in help_text


def test_serve_refuses_a_name_given_twice_naming_both(tmp_path):
    for name in ("x.mar", "y.mar"):
        with zipfile.ZipFile(tmp_path / name, "w") as archive:
            archive.writestr("MAR-INF/MANIFEST.json", "{}")
    assert served_models(["a=x.mar", "b=y.mar", "y"], tmp_path) == {"a": "x.mar", "b": "y.mar", "y": "y.mar"}
    with pytest.raises(UsageError) as info:
        served_models(["a=x.mar", "a=y.mar"], tmp_path)
    assert "'a' is given twice" in str(info.value) and "a=x.mar" in str(info.value) and "a=y.mar" in str(info.value)
    (tmp_path / "bad.mar").write_bytes(b"not a zip")
    for specs, message in (
        (["bad=bad.mar"], "not a TorchServe archive"),
        (["gone=gone.mar"], "does not exist"),
        (["a/b=x.mar"], "a model NAME is"),
        (["a=x.mar,y.mar"], "without ','"),
    ):
        with pytest.raises(UsageError, match=message):
            served_models(specs, tmp_path)


def test_serve_refusals_are_usage_errors_before_any_start(tmp_path, capsys):
    assert main(["serve", "a=x.mar", "a=y.mar", "--store", str(tmp_path)]) == 2
    assert "'a' is given twice" in capsys.readouterr().err


def test_gateway_init_writes_a_config_the_gateway_reads(model, tmp_path, capsys):
    from gateway.service import GatewayConfig

    path, model_id = model
    out = tmp_path / "gateway.json"
    assert main(["gateway", "init", "--name", "mnist", "--model", str(path), "--out", str(out)]) == 0
    config = GatewayConfig.from_json(out)
    (route,) = config.models
    assert (route.name, route.model_id) == ("mnist", model_id)
    assert route.upstreams == ["127.0.0.1:7070"] and route.http_upstreams == ["http://127.0.0.1:8080"]
    assert config.metrics_port == 9471 and config.license_server == "127.0.0.1:50061"
    assert (config.signing_key, config.revocation_file) == (Path("gateway.key"), Path("revoked.txt"))
    assert config.session_ttl_s == 900 and config.max_payload_bytes == 32 * 1024 * 1024  # the defaults, written out
    capsys.readouterr()

    # an existing file is kept unless --force
    before = out.read_text()
    again = ["gateway", "init", "--name", "other", "--model-id", "a" * 64, "--out", str(out)]
    assert main(again) == 2
    assert "--force" in capsys.readouterr().err and out.read_text() == before
    assert main([*again, "--force", "--http-upstream", "none", "--metrics-port", "0", "--upstream", "h:1"]) == 0
    config = GatewayConfig.from_json(out)
    assert (config.models[0].model_id, config.models[0].http_upstreams, config.metrics_port) == ("a" * 64, [], 0)
    assert config.models[0].upstreams == ["h:1"]
    assert main(["gateway", "init", "--name", "m", "--model-id", "not-an-id", "--out", str(out), "--force"]) == 2


def test_gateway_init_reads_the_model_id_of_a_packaged_archive(model, tmp_path):
    from gateway.service import GatewayConfig

    path, model_id = model
    store = tmp_path / "store"
    assert main(["package", "--model", str(path), "--name", "m", "--store", str(store), "--json"]) == 0
    out = tmp_path / "gateway.json"
    assert main(["gateway", "init", "--name", "m", "--model", str(store / "m.mar"), "--out", str(out)]) == 0
    assert GatewayConfig.from_json(out).models[0].model_id == model_id


def test_gateway_without_a_config_says_how_to_get_one(capsys):
    assert main(["gateway"]) == 2
    assert "gateway init" in capsys.readouterr().err
