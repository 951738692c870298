"""Bring your own model: one network the project has never seen, in every source format.

``OWNER_MODEL`` is the owner's model file; its class exists only there (nothing registers it),
so whatever works here works for any PyTorch classifier. The helpers are shared with
``tests/test_byom_cli.py``.
"""

from __future__ import annotations

import functools
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from activeguard.credentials.control import ControlConfig
from activeguard.credentials.fingerprints import authenticate, encode, generate_fingerprints
from activeguard.models import inputs, sources
from activeguard.models.architectures import model_id, train
from activeguard.models.data import load_data
from activeguard.watermark import digits as wm

OWNER_MODEL = '''
import torch
from torch import nn


class DigitsCNN(nn.Module):
    """An owner's 8x8 classifier: three conv layers with BatchNorm, named the owner's way."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Linear(16 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)).flatten(1))
'''
CONV_LAYERS = ["stem.0.weight", "block.0.weight", "block.4.weight", "head.weight"]  # every weight of 2+ dims
DEFAULT_LAYER = "block.4.weight"  # 16x16x3x3: the conv weight with the most parameters
SPEC = inputs.InputSpec((1, 8, 8))
FORMATS = ("torchscript", "export", "eager")
NO_OVERRIDES = inputs.SpecOverrides()
USERS = [0, 14, 29]  # K=10 classes x T=3 confidences: first, middle and last user


@dataclass(frozen=True)
class OwnerFiles:
    """One trained network saved as TorchScript, an exported program and a state dict + model file."""

    network: torch.nn.Module
    paths: dict[str, Path]

    @property
    def model_id(self) -> str:
        return model_id(self.network)

    def options(self, fmt: str, overrides: inputs.SpecOverrides = NO_OVERRIDES) -> sources.SourceOptions:
        if fmt != "eager":
            return sources.SourceOptions(overrides=overrides)
        shape = overrides.shape or SPEC.shape  # a state dict does not say its input
        return sources.SourceOptions(self.paths["model_file"], None, replace(overrides, shape=shape))

    def path(self, fmt: str) -> Path:
        return self.paths["state_dict" if fmt == "eager" else fmt]

    def load(self, fmt: str, overrides: inputs.SpecOverrides = NO_OVERRIDES) -> sources.LoadedModel:
        return sources.load(self.path(fmt), self.options(fmt, overrides))

    def cli_args(self, fmt: str, *extra: str, flag: str | None = "--model") -> list[str]:
        """The model flags a command needs for this format (the eager convention names its code and shape);
        ``flag=None`` for a positional MODEL (``inspect``)."""
        args = ([flag] if flag else []) + [str(self.path(fmt))]
        if fmt == "eager":
            args += ["--model-file", str(self.paths["model_file"]), "--input-shape", "1,8,8"]
        return args + list(extra)


def owner_class(model_file: Path, name: str = "DigitsCNN") -> type[torch.nn.Module]:
    return sources.load_model_class(model_file, name)


@functools.cache
def trained_state() -> dict[str, torch.Tensor]:
    """DigitsCNN trained for about a second on the 8x8 digits (~95% test accuracy), once per session:
    fingerprints and watermarks need a real decision surface, not a random one."""
    with tempfile.TemporaryDirectory() as tmp:
        model_file = Path(tmp) / "owner_model.py"
        model_file.write_text(OWNER_MODEL)
        torch.manual_seed(0)
        network = owner_class(model_file)()
    split = load_data("digits", 0)
    train(network, split.x_train, split.y_train, epochs=8, seed=0)
    return {k: v.detach().clone() for k, v in network.state_dict().items()}


def save_owner(directory: Path, state: dict[str, torch.Tensor] | None = None, stem: str = "owner") -> OwnerFiles:
    """Write a DigitsCNN with ``state`` (default: the trained one) in every format."""
    directory.mkdir(parents=True, exist_ok=True)
    model_file = directory / f"{stem}_model.py"
    model_file.write_text(OWNER_MODEL)
    network = owner_class(model_file)()
    network.load_state_dict(state if state is not None else trained_state())
    return OwnerFiles(network.eval(), sources.save_all_formats(network, SPEC, directory, stem, OWNER_MODEL))


@pytest.fixture(scope="module")
def owner(tmp_path_factory) -> OwnerFiles:
    return save_owner(tmp_path_factory.mktemp("owner"))


@pytest.fixture(scope="module")
def loaded(owner) -> dict[str, sources.LoadedModel]:
    return {fmt: owner.load(fmt) for fmt in FORMATS}


def test_every_format_is_the_same_model_to_a_client(owner, loaded):
    rows = SPEC.random_rows(5, torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = owner.network(rows)
        for fmt, model in loaded.items():
            assert model.source.name == fmt
            assert model.model_id == owner.model_id
            assert model.num_classes == 10 and model.spec.shape == (1, 8, 8)
            assert [c.name for c in model.watermark_layers()] == CONV_LAYERS
            assert sources.default_watermark_layer(model.network) == DEFAULT_LAYER
            torch.testing.assert_close(model.model(rows), expected, rtol=1e-4, atol=1e-4)
    assert [loaded[f].source.trainable for f in FORMATS] == [True, False, True]


def test_fingerprints_from_one_format_authenticate_on_all(loaded):
    fps = generate_fingerprints(loaded["export"].model, ControlConfig(), USERS, input_shape=SPEC.shape, seed=1)
    assert fps.success.all()
    for model in loaded.values():
        admitted, who = authenticate(model.model, fps.inputs, ControlConfig())
        assert admitted.all() and who.tolist() == USERS


def test_a_watermark_key_names_the_owners_layer_and_reads_the_same_on_every_format(loaded):
    """Keys are drawn on the ClientView but address the owner's parameter names, whatever wraps them."""
    keys = {fmt: wm.generate_key(model.model, wm.WM1, experiment_seed=3) for fmt, model in loaded.items()}
    assert {key.layer for key in keys.values()} == {DEFAULT_LAYER}
    assert len(set(keys.values())) == 1  # same weights, same seed: the same key on every format
    key = keys["eager"]
    assert len({tuple(wm.extract(model.model, key)) for model in loaded.values()}) == 1
    stem_key = wm.generate_key(loaded["export"].model, [3, 1, 4], layer="stem.0.weight", experiment_seed=3)
    assert stem_key.layer == "stem.0.weight" and max(stem_key.positions) < 9  # a stem filter has 1x3x3 weights
    with pytest.raises(ValueError, match="layer weights: stem.0.weight, block.0.weight, block.4.weight, head.weight"):
        wm.generate_key(loaded["torchscript"].model, wm.WM1, layer="conv2.weight")


def test_uint8_encoding_is_256_levels_over_the_client_range():
    x = torch.tensor([0.0, 0.3, 0.5, 1.0])
    assert torch.equal(encode(x, "uint8"), torch.round(x * 255) / 255)  # the [0, 1] encoding is unchanged
    wide = encode(torch.tensor([0.0, 12.4, 127.5001, 254.6, 255.0]), "uint8", (0.0, 255.0))
    assert wide.tolist() == [0.0, 12.0, 128.0, 255.0, 255.0]  # pixel values as a uint8 client sends them
    signed = encode(torch.linspace(-1, 1, 1000), "uint8", (-1.0, 1.0))
    assert len(torch.unique(signed)) == 256 and signed.min() == -1 and signed.max() == 1


def test_fingerprints_are_searched_and_returned_in_the_client_range(owner):
    """A model served on 0..255 pixels, normalized to the network's [0, 1] (mean 0, std 255)."""
    overrides = inputs.SpecOverrides(bounds=(0.0, 255.0), mean=(0.0,), std=(255.0,))
    model = owner.load("torchscript", overrides)
    fps = generate_fingerprints(
        model.model, ControlConfig(), USERS, input_shape=SPEC.shape, bounds=model.spec.bounds, seed=1
    )
    assert fps.success.all() and fps.bounds == (0.0, 255.0)
    assert fps.inputs.min() >= 0 and fps.inputs.max() <= 255 and fps.inputs.max() > 1
    admitted, who = authenticate(owner.network, fps.inputs / 255.0, ControlConfig())  # what the network saw
    assert admitted.all() and who.tolist() == USERS
    with pytest.raises(ValueError, match=r"must lie in \[0, 255\]"):
        generate_fingerprints(model.model, ControlConfig(), [0], torch.full((1, 1, 8, 8), 300.0), bounds=(0, 255))
