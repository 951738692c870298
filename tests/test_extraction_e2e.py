"""Licensed users extract the model through a real TorchServe; the extraction audit names them.

The reference LeNet-5 is packaged with the answer watermark on and served by TorchServe. Over plain
HTTP with their own license headers:

* alice steals it with the Adversarial Robustness Toolbox's KnockoffNets (a peer implementation,
  label-only) on natural digits of another dataset (scikit-learn's, upscaled) plus 500 MNIST digits;
* bob with a JBDA-style attack (Jacobian-based augmentation of 300 seeds, 4 rounds);
* carol uses the model as a benign client would.

Each surrogate (the attacker's own architecture) must reach 90% of the owner's test accuracy, and
``activeguard audit extraction`` must name its user and no one else; an independent model is
attributed to no one. The watermark key is fixed so the run is reproducible.
"""

from __future__ import annotations

import json
import math
import os
import stat

import numpy as np
import pytest
import torch

from activeguard.cli.app import main
from activeguard.experiments import extraction_attacks as attacks
from activeguard.models.architectures import train
from activeguard.runtime.private_files import write_private
from activeguard.watermark.answers import KEY_FORMAT
from tests.serving_fixtures import header_value, json_body, post

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

ROWS_PER_REQUEST = 64


@pytest.fixture(scope="module")
def marked(deployment, tmp_path_factory):
    """The reference model with the answer watermark on, in its own TorchServe."""
    from handlers.packaging import package
    from handlers.server import ManagedTorchServe

    root = tmp_path_factory.mktemp("extraction")
    key = root / "answer.agkey"
    write_private(key, json.dumps({"format": KEY_FORMAT, "secret": "5a" * 32}).encode())
    profile = deployment.profile(
        answer_watermark_margin=math.log(3), answer_key_file=str(key), answer_journal_dir=str(root / "journal")
    )
    store = root / "store"
    package(deployment.model_path, profile, "marked", store)
    with ManagedTorchServe(store, {"marked": "marked.mar"}, batch_size=8, max_batch_delay_ms=5) as ts:
        yield {"ts": ts, "key": key, "journal": root / "journal", "root": root}


def client(ts, license_text: str):
    """A licensed client of the marked model: rows in, probabilities out, over HTTP."""
    headers = {"X-ActiveGuard-License": header_value(license_text)}

    def probabilities(x: np.ndarray | torch.Tensor) -> np.ndarray:
        rows = torch.as_tensor(np.asarray(x, dtype=np.float32))
        answers = []
        for start in range(0, len(rows), ROWS_PER_REQUEST):
            status, body = post(
                f"{ts.url}/predictions/marked", json_body(rows[start : start + ROWS_PER_REQUEST]), headers
            )
            assert status == 200, body
            answers.extend(body["outputs"])
        return np.asarray(answers, dtype=np.float32)

    return probabilities


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).float().mean())


def knockoff_with_art(victim, pool: np.ndarray, epochs: int) -> torch.nn.Module:
    from art.attacks.extraction import KnockoffNets
    from art.estimators.classification import BlackBoxClassifier, PyTorchClassifier

    torch.manual_seed(0)
    thief = attacks.AttackerCnn()
    thieved = PyTorchClassifier(
        thief,
        loss=torch.nn.CrossEntropyLoss(),
        optimizer=torch.optim.Adam(thief.parameters(), lr=1e-3),
        input_shape=(1, 28, 28),
        nb_classes=10,
        clip_values=(0.0, 1.0),
    )
    black_box = BlackBoxClassifier(victim, input_shape=(1, 28, 28), nb_classes=10, clip_values=(0.0, 1.0))
    attack = KnockoffNets(
        black_box, batch_size_fit=64, batch_size_query=256, nb_epochs=epochs, nb_stolen=len(pool), verbose=False
    )
    return attack.extract(pool, thieved_classifier=thieved).model.eval()


@pytest.fixture(scope="module")
def stolen(marked, deployment, mnist):
    """alice's and bob's surrogates, carol's benign traffic, an independent model: saved as TorchScript."""
    ts = marked["ts"]
    alice = client(ts, deployment.license(0, user="alice"))
    bob = client(ts, deployment.license(1, user="bob"))
    carol = client(ts, deployment.license(0, user="carol"))
    pool = torch.cat([attacks.related_digits(4000, seed=3), mnist.x_test[:500]]).numpy()
    models = {"alice": knockoff_with_art(alice, pool, epochs=10)}
    seeds = torch.cat([attacks.related_digits(150, seed=4), mnist.x_test[:150]])
    models["bob"], _ = attacks.jbda(lambda x: torch.as_tensor(bob(x)).argmax(1), seeds, rounds=4, epochs=10, seed=1)
    carol(mnist.x_test[500:700])
    torch.manual_seed(7)
    models["independent"] = train(attacks.AttackerCnn(), mnist.x_train, mnist.y_train, epochs=5, seed=7).eval()
    paths = {}
    for name, model in models.items():
        paths[name] = marked["root"] / f"{name}.pt"
        torch.jit.save(torch.jit.script(model), str(paths[name]))
    return {"models": models, "paths": paths}


def audit(marked, suspect, capsys) -> tuple[int, dict]:
    args = ["audit", "extraction", "--suspect", str(suspect), "--records", str(marked["journal"])]
    code = main([*args, "--key", str(marked["key"]), "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_each_surrogate_reaches_90_percent_of_the_owners_accuracy(stolen, lenet, mnist):
    x, y = mnist.x_test[500:], mnist.y_test[500:]
    owner = accuracy(lenet, x, y)
    for name in ("alice", "bob"):
        relative = accuracy(stolen["models"][name], x, y) / owner
        assert relative >= 0.9, (name, relative)


@pytest.mark.parametrize("user", ["alice", "bob"])
def test_the_audit_names_the_extractor_and_no_one_else(stolen, marked, capsys, user):
    code, report = audit(marked, stolen["paths"][user], capsys)
    named = [e for e in report["licenses"] if e["named"]]
    assert code == 0 and [e["user"] for e in named] == [user], report
    assert named[0]["bound"] <= 1e-6 and report["rejected_records"] == 0
    others = [e for e in report["licenses"] if e["user"] != user]
    assert others and all(e["bound"] > 1e-6 for e in others)


def test_an_independent_model_is_attributed_to_no_one(stolen, marked, capsys):
    code, report = audit(marked, stolen["paths"]["independent"], capsys)
    assert code == 1 and report["named"] == [] and len(report["licenses"]) == 3, report


def test_the_journal_is_private_and_answers_repeat(stolen, marked, deployment, mnist):
    files = list(marked["journal"].iterdir())
    assert files and all(stat.S_IMODE(os.stat(f).st_mode) == 0o600 for f in files)
    alice = client(marked["ts"], deployment.license(0, user="alice"))
    x = mnist.x_test[:128]
    first, again = alice(x), alice(x)
    assert np.array_equal(first, again)  # the same input, the same answer: asking twice reveals nothing
    with torch.no_grad():
        own = torch.softmax(stolen["models"]["independent"](x), 1)  # any model: rows are probability vectors
    assert np.allclose(first.sum(1), 1, atol=1e-4) and own.shape == first.shape
