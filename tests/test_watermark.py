"""Digit watermark (ActiveGuard §2.5): analogs of the paper's Tables 2-4, plus the key file."""

from __future__ import annotations

import copy
import json
import os
import random
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from activeguard.models import attacks
from activeguard.models.architectures import LeNet5, MLPClassifier, accuracy, train_lenet5
from activeguard.models.attacks import fine_tune, prune_layer
from activeguard.watermark import digits as wm

# Measured: with λ = 0.01 and Adam lr 1e-3 the farthest position (digit 9 on a weight that
# started negative) needs ~14 epochs to round correctly, so 15 fine-tuning epochs are used.
EMBED_EPOCHS = 15
PASS = "correct horse battery staple"


@pytest.fixture(scope="module")
def split(mnist):
    return mnist


@pytest.fixture(scope="module")
def base(lenet):
    return lenet


@pytest.fixture(scope="module")
def wm1(split, base):
    key = wm.generate_key(base, wm.WM1, experiment_seed=0)  # reproducible figures; never for a real key
    marked = wm.embed(copy.deepcopy(base), key, split.x_train, split.y_train, epochs=EMBED_EPOCHS)
    return key, marked


@pytest.fixture(scope="module")
def wm2(split, base):
    key = wm.generate_key(base, wm.WM2, experiment_seed=1)
    marked = wm.embed(copy.deepcopy(base), key, split.x_train, split.y_train, epochs=EMBED_EPOCHS)
    return key, marked


@pytest.fixture()
def small_key() -> wm.WatermarkKey:
    return wm.WatermarkKey(layer="conv2.weight", filter=3, positions=(5, 17, 42), a=30.0, b=-2.0, digits=(3, 8, 0))


# --- Tables 2-4 analogs ------------------------------------------------------------------


@pytest.mark.slow
def test_fine_tune_embedding_keeps_accuracy_and_extracts(split, base, wm1):
    key, marked = wm1
    before = accuracy(base, split.x_test, split.y_test)
    after = accuracy(marked, split.x_test, split.y_test)
    print(f"\nTable 2 analog: accuracy {before:.4f} -> {after:.4f} with WM1 embedded")
    assert after >= before - 0.005
    assert wm.extract(marked, key) == list(wm.WM1)
    result = wm.verify(marked, key)
    assert result.success and result.matched == result.total == 13
    assert result.chance_probability == pytest.approx(1e-13)


@pytest.mark.slow
def test_unmarked_models_do_not_verify(split, base, wm1):
    key, _ = wm1
    other_seed = train_lenet5(split, epochs=5, seed=1)
    for name, model in (("base", base), ("other seed", other_seed)):
        result = wm.verify(model, key)
        print(f"\nunmarked {name}: {result.matched}/{result.total}, chance {result.chance_probability:.3g}")
        assert not result.success
        assert result.matched < result.total
        assert 0.0 < result.chance_probability <= 1.0


@pytest.mark.slow
def test_watermark_survives_fine_tuning(split, wm1):
    key, marked = wm1
    attacked = fine_tune(marked, split.x_train, split.y_train, epochs=15, seed=1)
    print(f"\nTable 3 analog: accuracy after 15 SGD epochs {accuracy(attacked, split.x_test, split.y_test):.4f}")
    result = wm.verify(attacked, key)
    assert result.success and result.matched >= 9  # graded: 9+ of 13 digits is p <= 1e-6
    # fine-tuned, then its watermarked filters permuted and rescaled: aligned to the owner it still verifies
    pirate = attacks.rescale_channels(attacks.permute_channels(attacked, "conv2", "fc1", seed=5), "conv2", "fc1")
    probes = torch.rand(256, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    aligned = wm.verify(pirate, key, reference=marked, probes=probes)
    assert aligned.success and aligned.matched == result.matched, (aligned.matched, result.matched)


@pytest.mark.slow
def test_two_secret_keys_differ_and_both_verify(split, base):
    keys = [wm.generate_key(base, wm.WM1) for _ in range(2)]
    assert keys[0].positions != keys[1].positions
    for key in keys:
        marked = wm.embed(copy.deepcopy(base), key, split.x_train, split.y_train, epochs=EMBED_EPOCHS)
        assert wm.verify(marked, key).success


@pytest.mark.slow
def test_wm2_survives_pruning_80_percent(split, wm2):
    key, marked = wm2
    assert wm.verify(marked, key).success
    pruned = prune_layer(marked, key.layer, 0.8)
    assert float((pruned.conv2.weight == 0).float().mean()) == pytest.approx(0.8, abs=1e-3)
    print(f"\nTable 4 analog: accuracy at 80% pruning {accuracy(pruned, split.x_test, split.y_test):.4f}")
    assert wm.verify(pruned, key).success


# --- key generation, extraction rules ---------------------------------------------------


def test_generate_key_draws_a_large_filter_and_maps_the_weight_range():
    torch.manual_seed(0)
    model = LeNet5()
    weight = model.conv2.weight.detach()
    key = wm.generate_key(model, wm.WM2, experiment_seed=7)
    upper_half = sorted(weight.flatten(1).norm(dim=1).argsort(descending=True)[:8].tolist())
    assert wm.candidate_filters(weight) == upper_half and key.filter in upper_half
    lo, hi = float(weight.abs().median()), float(weight.abs().max())
    assert key.a * lo + key.b == pytest.approx(0.0, abs=1e-9)
    assert key.a * hi + key.b == pytest.approx(9.0)
    assert len(set(key.positions)) == 13 and all(0 <= p < 150 for p in key.positions)
    pairs = list(zip(key.digits, weight[key.filter].reshape(-1)[list(key.positions)].tolist()))
    assert all(v1 < v2 for d1, v1 in pairs for d2, v2 in pairs if d1 < d2)  # larger digits on larger weights


def test_key_comes_from_os_entropy_unless_an_experiment_seed_is_given():
    torch.manual_seed(0)
    model = LeNet5()
    keys = []
    for _ in range(20):
        random.seed(0), np.random.seed(0), torch.manual_seed(0)  # no seed an attacker can guess fixes the key
        keys.append(wm.generate_key(model, wm.WM1))
    assert len({k.positions for k in keys}) == 20
    assert len({k.filter for k in keys}) > 1  # the filter is secret too (8 candidates here)
    again = wm.generate_key(model, wm.WM1, experiment_seed=3)
    assert again == wm.generate_key(model, wm.WM1, experiment_seed=3)
    assert again.positions != wm.generate_key(model, wm.WM1, experiment_seed=4).positions


def test_extract_reads_mapped_weights_without_clamping(small_key):
    model = LeNet5()
    with torch.no_grad():
        flat = model.conv2.weight[small_key.filter].view(-1)
        for pos, digit in zip(small_key.positions, (3, 8, 0)):
            flat[pos] = (digit + 0.3 - small_key.b) / small_key.a
    assert wm.verify(model, small_key, threshold=0.01).success  # 3 digits can only ever say p = 1e-3
    assert not wm.verify(model, small_key).success  # not enough evidence at the default 1e-6
    with torch.no_grad():
        flat[small_key.positions[1]] = 0.0  # pruned: map(0) = b = -2
    result = wm.verify(model, small_key, threshold=0.01)
    assert result.extracted == [3, -2, 0]
    assert (result.success, result.matched, result.total) == (False, 2, 3)
    assert result.chance_probability == pytest.approx(0.028)  # P(Bin(3, 0.1) >= 2)


def test_regularizer_is_eq4(small_key):
    model = LeNet5()
    v = model.conv2.weight[small_key.filter].reshape(-1)[list(small_key.positions)]
    expected = 0.01 * torch.mean((torch.tensor([3.0, 8.0, 0.0]) - (30.0 * v - 2.0)) ** 2)
    value = wm.regularizer(small_key)(model)
    assert value.item() == pytest.approx(expected.item())
    value.backward()
    assert model.conv2.weight.grad.count_nonzero() == 3


def test_architecture_mismatch_raises(small_key):
    with pytest.raises(ValueError, match="no parameter 'conv2.weight'"):
        wm.verify(MLPClassifier(), small_key)

    class Narrow(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv2 = nn.Conv2d(2, 2, 3)

    with pytest.raises(ValueError, match="does not fit the key"):
        wm.verify(Narrow(), small_key)


def test_invalid_inputs_raise_value_error():
    model = LeNet5()
    with pytest.raises(ValueError, match="0..9"):
        wm.generate_key(model, [1, 10])
    with pytest.raises(ValueError, match="0..9"):
        wm.generate_key(model, [-1])
    with pytest.raises(ValueError, match="int"):
        wm.generate_key(model, [1.5])
    with pytest.raises(ValueError, match="string"):
        wm.generate_key(model, "123")
    with pytest.raises(ValueError, match="empty"):
        wm.generate_key(model, [])
    with pytest.raises(ValueError, match="only 150 positions"):
        wm.generate_key(model, [1] * 151)
    assert wm.generate_key(model, [1], layer="fc1.weight", experiment_seed=0).layer == "fc1.weight"  # a matrix can
    with pytest.raises(ValueError, match="two or more dimensions"):
        wm.generate_key(model, [1], layer="fc1.bias")
    with pytest.raises(ValueError, match="no parameter"):
        wm.generate_key(model, [1], layer="conv9.weight")
    with pytest.raises(ValueError, match="distinct"):
        wm.WatermarkKey("conv2.weight", 0, (1, 1), 1.0, 0.0, (2, 3))


def test_repr_hides_secret(small_key):
    text = repr(small_key)
    assert "positions" not in text and "42" not in text and "digits" not in text


# --- encrypted key file ------------------------------------------------------------------


def test_key_file_round_trip_and_mode(tmp_path: Path, small_key):
    path = tmp_path / "owner.key"
    path.write_text("old")
    path.chmod(0o644)
    wm.save_key(small_key, path, PASS)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    raw = path.read_text()
    assert "conv2" not in raw and "positions" not in raw
    assert wm.load_key(path, PASS) == small_key
    document = json.loads(raw)
    assert document["kdf"] == {"name": "scrypt", "n": 2**15, "r": 8, "p": 1}
    wm.save_key(small_key, tmp_path / "again.key", PASS)
    assert json.loads((tmp_path / "again.key").read_text())["salt"] != document["salt"]


def test_key_file_wrong_passphrase(tmp_path: Path, small_key):
    path = tmp_path / "owner.key"
    wm.save_key(small_key, path, PASS)
    with pytest.raises(wm.WatermarkKeyError, match="wrong passphrase or tampered key file"):
        wm.load_key(path, PASS + "!")


def test_key_file_empty_passphrase(tmp_path: Path, small_key):
    with pytest.raises(ValueError, match="passphrase"):
        wm.save_key(small_key, tmp_path / "k", "")
    wm.save_key(small_key, tmp_path / "k", PASS)
    with pytest.raises(ValueError, match="passphrase"):
        wm.load_key(tmp_path / "k", "")


def _rewrite(path: Path, **changes) -> None:
    document = json.loads(path.read_text())
    document.update(changes)
    path.write_text(json.dumps(document))


def test_key_file_tampering_and_corruption(tmp_path: Path, small_key):
    path = tmp_path / "owner.key"
    wm.save_key(small_key, path, PASS)
    good = path.read_text()
    document = json.loads(good)

    import base64

    flipped = bytearray(base64.b64decode(document["ciphertext"]))
    flipped[3] ^= 0x01
    _rewrite(path, ciphertext=base64.b64encode(bytes(flipped)).decode())
    with pytest.raises(wm.WatermarkKeyError, match="wrong passphrase or tampered"):
        wm.load_key(path, PASS)

    path.write_text(good)
    _rewrite(path, kdf={"name": "scrypt", "n": 2**14, "r": 8, "p": 1})  # downgraded cost
    with pytest.raises(wm.WatermarkKeyError, match="wrong passphrase or tampered"):
        wm.load_key(path, PASS)

    path.write_text(good)
    _rewrite(path, kdf={"name": "scrypt", "n": 2**30, "r": 8, "p": 1})
    with pytest.raises(wm.WatermarkKeyError, match="out of range"):
        wm.load_key(path, PASS)

    path.write_text(good)
    _rewrite(path, nonce="not base64!")
    with pytest.raises(wm.WatermarkKeyError, match="base64"):
        wm.load_key(path, PASS)

    path.write_text(good[: len(good) // 2])
    with pytest.raises(wm.WatermarkKeyError, match="not JSON"):
        wm.load_key(path, PASS)

    path.write_bytes(os.urandom(200))
    with pytest.raises(wm.WatermarkKeyError):
        wm.load_key(path, PASS)

    path.write_text('{"format": "something-else"}')
    with pytest.raises(wm.WatermarkKeyError, match="not a watermark key file"):
        wm.load_key(path, PASS)

    path.write_text("")
    with pytest.raises(wm.WatermarkKeyError, match="not JSON"):
        wm.load_key(path, PASS)


def test_function_preserving_edits_keep_every_answer_and_move_the_mark(split, wm1):
    """Filter permutation and positive rescaling (LeNet-5: conv1 → conv2 → fc1) change no output
    but move the watermarked weights: a mark read at fixed positions does not survive them
    (issue: 1/13 and 0/13 digits), which is why the audit must align before it extracts."""
    key, marked = wm1
    x = split.x_test[:64]
    edited = {
        "permute conv2": attacks.permute_channels(marked, "conv2", "fc1", seed=1),
        "permute conv1": attacks.permute_channels(marked, "conv1", "conv2", seed=2),
        "rescale conv2": attacks.rescale_channels(marked, "conv2", "fc1", seed=3),
        "both": attacks.rescale_channels(attacks.permute_channels(marked, "conv2", "fc1", seed=1), "conv2", "fc1"),
    }
    with torch.no_grad():
        want = marked(x)
        for name, model in edited.items():
            assert torch.allclose(model(x), want, atol=1e-4, rtol=1e-4), name
            assert not torch.equal(model.conv2.weight, marked.conv2.weight) or "conv1" in name, name
    assert wm.verify(marked, key).success
    for name in ("permute conv2", "rescale conv2", "both"):
        assert wm.verify(edited[name], key).matched < len(key.digits) // 2, name
    with pytest.raises(ValueError, match="not a multiple"):
        attacks.permute_channels(marked, "conv2", "fc3")


def test_aligned_to_the_owner_the_mark_survives_permutation_and_rescaling(split, base, wm1):
    """Issue 15: with the original model at hand, the suspect's filters (conv2's outputs) and their
    input channels (conv1's outputs) are matched by activations on noise probes, so permuting,
    rescaling and both together keep every digit; an independent model still matches only by chance."""
    key, marked = wm1
    probes = torch.rand(256, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    both = attacks.permute_channels(marked, "conv2", "fc1", seed=1)
    both = attacks.rescale_channels(both, "conv2", "fc1", seed=3)
    both = attacks.permute_channels(both, "conv1", "conv2", seed=2)
    both = attacks.rescale_channels(both, "conv1", "conv2", seed=4)
    edited = {
        "permute conv2": attacks.permute_channels(marked, "conv2", "fc1", seed=1),
        "permute conv1 (conv2's inputs)": attacks.permute_channels(marked, "conv1", "conv2", seed=2),
        "rescale conv2": attacks.rescale_channels(marked, "conv2", "fc1", seed=3),
        "rescale conv1 (conv2's inputs)": attacks.rescale_channels(marked, "conv1", "conv2", seed=4),
        "all four": both,
    }
    for name, model in edited.items():
        plain = wm.verify(model, key)
        aligned = wm.verify(model, key, reference=marked, probes=probes)
        assert aligned.aligned and aligned.matched == 13 and aligned.success, (name, aligned.matched)
        assert aligned.alignment_similarity > 0.999, name
        if "conv1" not in name or name == "all four":
            assert plain.matched < 13, name  # the fixed-position reading is what broke
    assert wm.verify(marked, key, reference=marked, probes=probes).matched == 13
    independent = train_lenet5(split, epochs=3, seed=7)
    result = wm.verify(independent, key, reference=marked, probes=probes)
    assert not result.success and result.matched <= 5 and result.chance_probability > 1e-3
    with pytest.raises(ValueError, match="probe"):
        wm.verify(both, key, reference=marked)
