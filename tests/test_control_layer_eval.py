"""A control layer that cannot be told apart: a two-sample classifier on what a client sees.

The bundled LeNet-5 on real MNIST test digits, and a stranger's 1-D TorchScript classifier through
``activeguard evaluate control-layer --model ... --json``. The paper's policy (a uniformly random
probability vector per request) is measured beside ours, which shows the classifier can tell policies
apart when they differ.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from activeguard.cli.app import main
from activeguard.experiments.control_layer import measure
from activeguard.models import inputs, sources

pytestmark = pytest.mark.timeout(600)


def test_random_answers_look_like_licensed_ones_on_the_bundled_model(lenet, mnist, tmp_path):
    path = tmp_path / "lenet.pt"
    spec = inputs.InputSpec(shape=(1, 28, 28))
    torch.jit.save(torch.jit.script(lenet.eval()), str(path))
    loaded = sources.load(path, sources.SourceOptions(overrides=inputs.SpecOverrides(shape=spec.shape)))
    result = measure(loaded, mnist.x_test[:300], y=mnist.y_test[:300])
    assert result["two_sample_auc"] <= 0.6, result
    assert result["paper_random_policy_auc"] >= 0.9, result  # a visible control layer is caught
    assert result["accuracy"]["licensed"] > 0.9 and result["accuracy"]["unlicensed"] < 0.3, result
    licensed, unlicensed = result["mean_features"]["licensed"], result["mean_features"]["unlicensed"]
    assert unlicensed["repeat_agreement"] == 1.0  # the same request, the same answer
    assert abs(licensed["top_probability"] - unlicensed["top_probability"]) < 0.02


class Signal(nn.Module):
    """A stranger's 1-D conv classifier over 3 channels × 64 steps, 5 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 5)
        self.head = nn.Linear(8 * 60, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).flatten(1))


def test_evaluate_control_layer_json_on_a_model_of_another_shape(tmp_path, capsys):
    torch.manual_seed(0)
    path = tmp_path / "signal.pt"
    torch.jit.save(torch.jit.script(Signal().eval()), str(path))
    args = ["evaluate", "control-layer", "--quick", "--json", "--model", str(path), "--input-shape", "3,64"]
    assert main([*args, "--out", str(tmp_path / "report")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["queries"] == 200 and result["two_sample_auc"] <= 0.6, result
    assert result["paper_random_policy_auc"] > result["two_sample_auc"]
    assert (tmp_path / "report" / "control_layer.md").read_text().count("two-sample") == 1
