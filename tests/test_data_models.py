from pathlib import Path

import pytest
import torch

from activeguard.models import data
from activeguard.models.architectures import (
    accuracy,
    build_model,
    load_model,
    model_id,
    save_model,
    train_generator,
    train_regressor,
)


def test_mnist_is_the_real_balanced_digits(mnist):
    assert mnist.x_train.shape == (4000, 1, 28, 28) and mnist.x_test.shape == (1000, 1, 28, 28)
    assert 0.0 <= float(mnist.x_train.min()) and float(mnist.x_train.max()) <= 1.0
    assert torch.bincount(mnist.y_test).tolist() == [100] * 10  # stratified: 500 per class overall


def test_splits_are_deterministic_by_seed(mnist):
    again = data.load_mnist(seed=0)
    other = data.load_mnist(seed=1)
    assert torch.equal(again.x_test, mnist.x_test)
    assert not torch.equal(other.x_test, mnist.x_test)


def test_fashion_mnist_from_debian_package_or_warned_fallback(tmp_path):
    if data.fashion_mnist_available():
        split = data.load_fashion_mnist(limit=600)
        assert split.x_train.shape == (600, 1, 28, 28) and split.num_classes == 10
    with pytest.warns(RuntimeWarning, match="8x8 digits"):
        fallback = data.load_fashion_mnist(root=Path(tmp_path))
    assert fallback.input_shape == (1, 8, 8)


def test_diabetes_regression_split():
    split = data.load_diabetes(seed=0)
    assert split.task == "regression" and split.input_shape == (10,)
    assert len(split.x_train) + len(split.x_test) == 442
    with pytest.raises(ValueError, match="no classes"):
        _ = split.num_classes


def test_unknown_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        data.load_dataset("cifar")


def test_lenet_reaches_paper_grade_accuracy(lenet, mnist):
    assert lenet.conv2.weight.shape == (16, 6, 5, 5)  # the paper's 150 watermark positions
    assert accuracy(lenet, mnist.x_test, mnist.y_test) >= 0.95


def test_model_id_is_content_hash(lenet, tmp_path):
    path = tmp_path / "m.pt"
    mid = save_model(lenet, path)
    assert mid == model_id(lenet) == model_id(load_model(path))
    changed = load_model(path)
    with torch.no_grad():
        changed.fc3.bias[0] += 1e-6
    assert model_id(changed) != mid
    # key order in the state dict does not matter
    state = lenet.state_dict()
    assert model_id(dict(reversed(list(state.items())))) == mid


def test_loading_never_unpickles_objects(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"format": "activeguard-model/1", "payload": Path("/etc/passwd")}, evil)
    with pytest.raises(ValueError, match="not a readable ActiveGuard checkpoint"):
        load_model(evil)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a zip")
    with pytest.raises(ValueError):
        load_model(garbage)
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.pt")


def test_unknown_architecture():
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("resnet")


def test_regressor_and_generator_learn():
    split = data.load_diabetes(seed=0)
    model = train_regressor(split, epochs=60, seed=0)
    with torch.no_grad():
        mse = torch.mean((model(split.x_test) - split.y_test) ** 2).item()
    assert mse < 0.8  # standardized target: variance 1, a useless model scores ~1
    images = data.load_fashion_mnist(limit=2000).x_train
    gen = train_generator(images, epochs=3, seed=0)
    flat = images.flatten(1)
    with torch.no_grad():
        sample = gen(torch.randn(8, gen.config["latent_dim"]))
    assert sample.shape == (8, flat.shape[1]) and torch.isfinite(sample).all()
