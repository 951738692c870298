import dataclasses

import pytest
import torch

from activeguard.audit import conferrable, files, ipguard


class _Fixed(torch.nn.Module):
    def __init__(self, probs):
        super().__init__()
        self.logits = torch.log(torch.tensor(probs))

    def forward(self, x):
        return self.logits.expand(len(x), -1)


def test_conferrability_score_by_hand():
    x = torch.zeros(1, 3)
    s = [_Fixed([0.1, 0.8, 0.1]), _Fixed([0.1, 0.6, 0.3])]  # mean 0.1, 0.7, 0.2
    r = [_Fixed([0.8, 0.1, 0.1])]
    sigma = conferrability = conferrable.conferrability(s, r, x)[0]
    assert torch.allclose(conferrability, torch.tensor([0.1 * 0.2, 0.7 * 0.9, 0.2 * 0.9]), atol=1e-6)
    assert int(sigma.argmax()) == 1


@pytest.fixture(scope="module")
def cem(lenet, mnist):
    surrogates, references = conferrable.train_ensemble(
        lenet, mnist.x_train[:500], mnist.y_train[:500], n_surrogates=1, n_references=1, epochs=1
    )
    x0 = mnist.x_test[:40]
    fp = conferrable.generate(lenet, surrogates, references, x0, n=20, steps=30, eps=0.25)
    return fp, x0


def test_cem_fingerprint(lenet, cem):
    fp, x0 = cem
    assert 0 < len(fp.points) <= 20
    assert fp.points.min() >= 0 and fp.points.max() <= 1
    # every kept example stays in the L∞ ball around some benign input
    dist = (fp.points[:, None] - x0[None]).flatten(2).abs().max(2).values.min(1).values
    assert (dist <= 0.25 + 1e-5).all()
    assert conferrable.caeacc(fp, lenet) == 1.0
    verdict, score = conferrable.verify(fp, lenet)
    assert verdict and score == 1.0
    assert ((fp.conferrability >= 0) & (fp.conferrability <= 1)).all()


def test_cem_bad_input(lenet, cem):
    with pytest.raises(ValueError, match="empty"):
        conferrable.CemFingerprint(torch.empty(0, 1, 28, 28), torch.empty(0, dtype=torch.long), torch.empty(0), 0.85, 0)
    with pytest.raises(ValueError, match="surrogate"):
        conferrable.generate(lenet, [], [lenet], torch.zeros(2, 1, 28, 28))


def test_ensemble_has_the_owners_architecture_in_every_source(lenet, mnist):
    """As in the paper, surrogates and references are the source's architecture with fresh weights, a
    TorchScript owner's too (before, it fell back to generic members, so the same weights gave another
    fingerprint, and another verdict, as TorchScript than as a state dict)."""
    x, y = mnist.x_train[:200], mnist.y_train[:200]
    surrogates, references = conferrable.train_ensemble(lenet, x, y, n_surrogates=1, n_references=1, epochs=1)
    for member in (*surrogates, *references):
        assert type(member) is type(lenet)
        assert not torch.equal(member.conv2.weight, lenet.conv2.weight)
    assert not torch.equal(surrogates[0].conv1.weight, references[0].conv1.weight)  # no shared initialization
    scripted = torch.jit.trace(lenet.eval(), x[:2])
    surrogates, _ = conferrable.train_ensemble(scripted, x, y, n_surrogates=1, n_references=1, epochs=1)
    assert isinstance(surrogates[0], torch.jit.ScriptModule)
    assert {n for n, _ in surrogates[0].named_parameters()} == {n for n, _ in lenet.named_parameters()}
    assert not torch.equal(surrogates[0].conv2.weight, scripted.conv2.weight)


def test_weak_fingerprint_warns(lenet, cem):
    fp, _ = cem
    weak = conferrable.CemFingerprint(fp.points, fp.labels, fp.conferrability, 0.85, passed=0)
    text = conferrable.METHOD.explain(conferrable.METHOD.score(weak, lenet))
    assert "warning: only 0 of" in text and "conferrability 0.85" in text
    strong = conferrable.CemFingerprint(fp.points, fp.labels, fp.conferrability, 0.85, passed=len(fp.points))
    assert "warning" not in conferrable.METHOD.explain(conferrable.METHOD.score(strong, lenet))


@pytest.mark.parametrize("field", ["labels", "conferrability", "points"])
def test_an_edited_label_fingerprint_file_names_its_bad_field(cem, tmp_path, field):
    """CEM's and IPGuard's files are refused on loading when a field a verdict reads disagrees with the
    points (or is no tensor), naming it, rather than failing inside the scoring."""
    fp, _ = cem
    ip = ipguard.Fingerprint(fp.points, fp.labels, 3.0, "TL")
    for fingerprint in (fp, ip):
        if not hasattr(fingerprint, field):
            continue
        original = getattr(fingerprint, field)
        wrong_dtype = {"points": original.long(), "labels": original.float()}.get(field)
        for bad in (original[:3], "edited", *([] if wrong_dtype is None else [wrong_dtype])):
            edited = dataclasses.replace(fingerprint)
            setattr(edited, field, bad)  # as an editor of the file would, past the constructor's check
            path = files.save(edited, tmp_path / "edited.agfp")
            with pytest.raises(files.FingerprintFileError, match=field):
                files.load(path)
        files.load(files.save(fingerprint, tmp_path / "intact.agfp"))
