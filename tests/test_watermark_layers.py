"""The weight watermark in any layer weight of two or more dimensions (Conv1d, Linear, Conv3d), read back
after a function-preserving permutation and rescaling once aligned to the owner; `inspect` lists exactly
what `watermark embed` accepts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from activeguard.models import attacks, sources
from activeguard.models.architectures import train
from activeguard.models.fresh import clone
from activeguard.models.inputs import SpecOverrides
from activeguard.watermark import digits as wm


class SensorNet(nn.Module):
    """Conv1d over 28 readings × 28 steps, then two Linear layers (plain ReLU: permutations preserve it)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(28, 16, 5, padding=2)
        self.c2 = nn.Conv1d(16, 24, 5, padding=2)
        self.fc = nn.Linear(24, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        h = torch.relu(self.c2(torch.relu(self.c1(x.reshape(len(x), 28, 28)))))
        return self.head(torch.relu(self.fc(h.mean(-1))))


@pytest.fixture(scope="module")
def sensor(mnist):
    torch.manual_seed(0)
    return train(SensorNet(), mnist.x_train, mnist.y_train, epochs=3, seed=0)


@pytest.mark.parametrize("layer, consumer", [("c2.weight", "fc"), ("fc.weight", "head")])
def test_a_watermark_in_a_conv1d_or_linear_weight_survives_permutation_and_rescaling(sensor, mnist, layer, consumer):
    key = wm.generate_key(sensor, wm.WM1, layer=layer, experiment_seed=4)
    marked = wm.embed(clone(sensor), key, mnist.x_train, mnist.y_train, epochs=15)
    assert wm.verify(marked, key).matched == 13
    producer = layer.split(".")[0]
    edited = attacks.rescale_channels(attacks.permute_channels(marked, producer, consumer, seed=1), producer, consumer)
    x = mnist.x_test[:64]
    assert torch.allclose(edited(x), marked(x), atol=1e-4)  # the same function
    assert not wm.verify(edited, key).success  # at fixed positions the mark is gone
    probes = torch.rand(256, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    aligned = wm.verify(edited, key, reference=marked, probes=probes)
    assert aligned.success and aligned.matched == 13
    stranger = train(SensorNet(), mnist.x_train, mnist.y_train, epochs=1, seed=9)
    assert not wm.verify(stranger, key, reference=marked, probes=probes).success


def test_inspect_lists_what_watermark_embed_accepts(sensor, tmp_path):
    torch.save(sensor.state_dict(), tmp_path / "sensor.pt")
    (tmp_path / "net.py").write_text(
        "from tests.test_watermark_layers import SensorNet\n\n\nclass Net(SensorNet):\n    pass\n"
    )
    loaded = sources.load(
        tmp_path / "sensor.pt",
        sources.SourceOptions(tmp_path / "net.py", overrides=SpecOverrides(shape=(1, 28, 28))),
    )
    info = loaded.describe()
    names = [layer["name"] for layer in info["watermark_layers"]]
    assert names == ["c1.weight", "c2.weight", "fc.weight", "head.weight"]
    assert info["default_watermark_layer"] == "c1.weight" and info["can_embed_watermark"]  # 16x28x5: the largest kernel
    for name in names:  # every listed layer takes a key
        assert wm.generate_key(loaded.model, [1, 2, 3], layer=name, experiment_seed=0).layer == name
    volume = nn.Sequential(nn.Conv3d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 2 * 2 * 2, 3))
    assert [w.name for w in sources.watermark_layers(volume)] == ["0.weight", "3.weight"]
    assert sources.default_watermark_layer(volume) == "0.weight"  # a kernel before a larger matrix
    key = wm.generate_key(volume, [5, 5], layer="0.weight", experiment_seed=0)
    assert len(wm.extract(volume, key)) == 2
