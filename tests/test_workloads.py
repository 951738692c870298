"""The second workload: a BatchNorm ResNet on the full Fashion-MNIST, cached in all four model sources,
and ``evaluate core --workload`` producing the paper-shaped report on it (a tiny run size here)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from activeguard.cli.app import main
from activeguard.models import inputs, sources, workloads
from activeguard.models.architectures import ResidualBlock, ResNet
from activeguard.models.data import FASHION_MNIST_DIR, fashion_mnist_available

needs_fashion = pytest.mark.skipif(
    not fashion_mnist_available(),
    reason=f"Fashion-MNIST is not installed under {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)",
)

# A tinier run than --quick, so the whole file stays near a minute on a busy 2-core machine. The owner
# still needs ~30 steps: a BatchNorm net trained for a handful answers nearly constant scores in eval
# mode, and no fingerprint can reach its (class, confidence) on such a model.
TINY = workloads.WorkloadSize(
    train_rows=2000,
    test_rows=300,
    train_epochs=2,
    embed_epochs=1,
    fingerprints_per_user=1,
    attack_epochs=1,
    zoo_epochs=1,
    zoo_rows=256,
    same_arch_models=1,
)


def test_resnet_has_batchnorm_residual_blocks_and_eight_conv_layers():
    network = workloads.get("fashion-resnet").owner_arch.build(10, (1, 28, 28), seed=0)
    assert isinstance(network, ResNet)
    convs = [m for m in network.modules() if isinstance(m, nn.Conv2d)]
    blocks = [m for m in network.modules() if isinstance(m, ResidualBlock)]
    assert len(convs) >= 8 and len(blocks) >= 3
    assert sum(isinstance(m, nn.BatchNorm2d) for m in network.modules()) >= len(convs)
    assert network(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    # the skip connection is real: with the residual branch silenced a block passes relu(shortcut(x))
    block = blocks[0].eval()
    x = torch.randn(2, block.conv1.in_channels, 14, 14)
    with torch.no_grad():
        block.bn2.weight.zero_()
        block.bn2.bias.zero_()
        assert torch.allclose(block(x), torch.relu(block.shortcut(x)))


def test_unknown_workload_is_a_one_line_usage_error(capsys):
    assert main(["evaluate", "core", "--workload", "imagenet-vit"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "imagenet-vit" in err and "mnist-lenet5" in err and "fashion-resnet" in err


def test_missing_data_is_a_one_line_usage_error(capsys, monkeypatch):
    absent = dataclasses.replace(workloads.get("fashion-resnet"), requires=lambda: "Fashion-MNIST is not installed")
    monkeypatch.setitem(workloads.WORKLOADS, "fashion-resnet", absent)
    for suite in ("core", "audit"):
        assert main(["evaluate", suite, "--workload", "fashion-resnet", "--quick"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Fashion-MNIST is not installed" in err


def test_evaluate_audit_runs_on_the_named_workload(tmp_path, monkeypatch, capsys):
    """The audit suite hands --workload to the evaluation (stubbed here: the real run takes minutes)."""
    from activeguard.experiments import audit_evaluation as evaluate

    calls = []

    def fake_run(out, **kwargs):
        calls.append(kwargs)
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "audit.md").write_text("# Audit evaluation\n")
        return {}

    monkeypatch.setattr(evaluate, "run_audit_evaluation", fake_run)
    here = dataclasses.replace(workloads.get("fashion-resnet"), requires=lambda: None)  # no data read here
    monkeypatch.setitem(workloads.WORKLOADS, "fashion-resnet", here)
    assert main(["evaluate", "audit", "--workload", "fashion-resnet", "--quick", "--out", str(tmp_path)]) == 0
    assert calls and calls[0]["workload"] == "fashion-resnet" and calls[0]["quick"]
    assert "# Audit evaluation" in capsys.readouterr().out


def test_mnist_workload_keeps_the_paper_run_sizes():
    """The LeNet-5 numbers must not move: same epochs, fingerprints and zoo as before workloads existed."""
    mnist = workloads.get("mnist-lenet5")
    assert (mnist.quick.train_epochs, mnist.quick.embed_epochs, mnist.quick.fingerprints_per_user) == (15, 15, 5)
    assert (mnist.full.fingerprints_per_user, mnist.full.attack_epochs, mnist.full.same_arch_models) == (20, 10, 5)
    assert mnist.owner_arch.recipe == workloads.Recipe()  # Adam 1e-3, batch 64, constant: train_lenet5's


@pytest.fixture(scope="module")
def core_run(tmp_path_factory):
    """``activeguard evaluate core --workload fashion-resnet --quick``, with --quick shrunk to TINY."""
    root = tmp_path_factory.mktemp("fashion-resnet")
    out, cache = root / "report", root / "cache"
    tiny = dataclasses.replace(workloads.get("fashion-resnet"), quick=TINY)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(workloads.CACHE_ENV, str(cache))
        mp.setitem(workloads.WORKLOADS, "fashion-resnet", tiny)
        with contextlib.redirect_stdout(io.StringIO()):
            code = main(["evaluate", "core", "--workload", "fashion-resnet", "--quick", "--out", str(out), "--json"])
    assert code == 0
    return out, cache, tiny


@needs_fashion
def test_core_report_on_the_resnet(core_run):
    out, _, _ = core_run
    report = json.loads((out / "report.json").read_text())
    assert report["workload"] == "fashion-resnet" and "fashion-mnist" in report["dataset"]
    assert report["data_rows"] == {"train": TINY.train_rows, "test": TINY.test_rows}
    steps = report["steps"]
    assert steps["train"]["architecture"] == "ResNet" and steps["train"]["conv_layers"] >= 8
    assert steps["train"]["test_accuracy"] > 0.4  # 32 steps on 2,000 rows: well above chance (0.1)
    assert steps["embed"]["layer"] == "stages.4.conv2.weight"  # the conv with the most parameters
    fp = steps["fingerprints"]
    assert len(fp["per_user"]) == 30 and fp["fingerprints"] == 30 and fp["generation_seconds"] > 0
    assert fp["minimum"] >= 0.9 and fp["wrong_identity"] == 0
    control = steps["control"]
    assert control["authorized_accuracy"] > 0.3 and abs(control["unauthorized_accuracy"] - 0.1) <= 0.1
    assert len(steps["attacks"]["pruning_wm1"]) == len(steps["attacks"]["pruning_wm2"]) == 9
    md = (out / "report.md").read_text()
    assert md.startswith("# ActiveGuard core report")
    for text in ("Workload: fashion-resnet", "time to generate 30 users' fingerprints", "Table 4 analog"):
        assert text in md
    assert (out / "pruning.png").stat().st_size > 1000


@needs_fashion
def test_owner_is_cached_in_all_four_sources_with_one_model_id(core_run):
    out, cache, tiny = core_run
    report_id = json.loads((out / "report.json").read_text())["steps"]["train"]["model_id"]
    start = time.perf_counter()
    owner = tiny.owner(0, TINY, cache_dir=cache)
    assert owner.cached and time.perf_counter() - start < 20  # loaded, not retrained
    assert owner.model_id == report_id and owner.paths["checkpoint"].parent.parent == cache / "workloads"
    spec = inputs.SpecOverrides(shape=(1, 28, 28))
    options = {
        "checkpoint": sources.SourceOptions(),
        "torchscript": sources.SourceOptions(),
        "export": sources.SourceOptions(),
        "state_dict": sources.SourceOptions(model_file=owner.paths["model_file"], overrides=spec),
    }
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    expected = owner.network.eval()(x)
    for name, opts in options.items():
        loaded = sources.load(owner.paths[name], opts)
        assert loaded.source.name == ("eager" if name == "state_dict" else name)
        assert loaded.model_id == report_id, name
        with torch.no_grad():
            assert torch.allclose(loaded.model(x), expected, atol=1e-4), name


@needs_fashion
def test_audit_zoo_is_built_from_the_workload(core_run):
    """Positives (fine-tuned, pruned, distilled) and negatives (other seeds, other architectures, forests)
    come from the workload's architectures, with no switch on its name."""
    from activeguard.experiments.suspects import classifier_zoo

    _, cache, tiny = core_run
    split = tiny.data(0, TINY)
    owner = tiny.owner(0, TINY, cache_dir=cache, split=split).network
    zoo = classifier_zoo(owner, split, quick=True, seed=0, cache_dir=None, workload=tiny)
    kinds = {z.kind: z.positive for z in zoo}
    for kind in ("FTLL", "FTAL", "RTLL", "RTAL", "WP", "surrogate"):
        assert kinds.get(kind) is True, kind
    for kind in ("same-arch", "other-arch", "random-forest"):
        assert kinds.get(kind) is False, kind
    by_name = {z.name: z.model for z in zoo}
    assert isinstance(by_name["surrogate ResNet"], ResNet) and isinstance(by_name["ResNet seed 1"], ResNet)
    assert {"LeNet-5", "MLP (256, 128)"} <= set(by_name)
