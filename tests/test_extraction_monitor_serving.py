"""The extraction monitor inside a real TorchServe: policies act on a JBDA-style stream, a benign
licensed client keeps being served, and the per-license metrics reach the Prometheus scrape.

One TorchServe serves the reference LeNet-5 twice, packaged with ``--extraction-monitor throttle``
and ``suspend``. bob sends a JBDA-style stream (activeguard.experiments.extraction_attacks) and carol
natural MNIST digits, interleaved, each with their own license header.
"""

from __future__ import annotations

import re
import urllib.request

import pytest
import torch

from activeguard.credentials import licenses
from activeguard.experiments import extraction_attacks as attacks
from activeguard.watermark.journal import journal_files, read_entries
from tests.serving_fixtures import header_value, json_body, post

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

BOB_ROWS, CAROL_ROWS = 64, 16  # rows per request
STREAM = 1400  # bob's queries: the monitor flags his stream within this many (tests/test_extraction_monitor.py)


@pytest.fixture(scope="module")
def monitored(deployment, tmp_path_factory):
    from handlers.packaging import package
    from handlers.server import ManagedTorchServe

    root = tmp_path_factory.mktemp("monitored")
    for policy in ("throttle", "suspend"):
        profile = deployment.profile(extraction_monitor=policy, answer_journal_dir=str(root / policy))
        package(deployment.model_path, profile, policy, root / "store")
    models = {"throttle": "throttle.mar", "suspend": "suspend.mar"}
    with ManagedTorchServe(root / "store", models, batch_size=8, max_batch_delay_ms=5) as ts:
        yield ts, root


def license_id(text: str) -> str:
    return licenses.SignedLicense.from_text(text).parsed().license_id


def scrape(ts) -> list[tuple[str, dict[str, str], float]]:
    text = urllib.request.urlopen(ts.metrics_url, timeout=10).read().decode()
    found = []
    for line in text.splitlines():
        m = re.match(r"(ActiveGuard\w+)\{(.*)\} ([0-9.eE+-]+)$", line)
        if m:
            found.append((m.group(1), dict(re.findall(r'(\w+)="([^"]*)"', m.group(2))), float(m.group(3))))
    return found


def test_policies_act_on_extraction_and_a_benign_license_is_served(monitored, deployment, lenet, mnist):
    ts, root = monitored
    half = len(mnist.x_test) // 2
    seeds = torch.cat([attacks.related_digits(150, 28, 1), mnist.x_test[:half][:150]])

    def owner(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return lenet(x).argmax(1)

    stream = attacks.jbda_stream(owner, seeds, rounds=3, epochs=1, seed=0)[:STREAM]
    bob_text, carol_text = deployment.license(1, user="bob"), deployment.license(0, user="carol")
    bob, carol = ({"X-ActiveGuard-License": header_value(t)} for t in (bob_text, carol_text))
    expected = {"throttle": (429, "extraction_throttled"), "suspend": (403, "extraction_suspended")}
    for model, refusal in expected.items():
        bob_answers, carol_statuses = [], []
        for k, start in enumerate(range(0, len(stream), BOB_ROWS)):
            status, body = post(f"{ts.url}/predictions/{model}", json_body(stream[start : start + BOB_ROWS]), bob)
            bob_answers.append((status, body.get("reason")))
            natural = mnist.x_test[half + k * CAROL_ROWS : half + (k + 1) * CAROL_ROWS]
            status, body = post(f"{ts.url}/predictions/{model}", json_body(natural), carol)
            carol_statuses.append(status)
        assert bob_answers[0] == (200, None) and bob_answers[-1] == refusal, (model, bob_answers)
        assert set(carol_statuses) == {200}, model
        alerts = [e for f in journal_files(root / model) for e in read_entries(f)[0] if e.get("kind") == "alert"]
        assert [a["license_id"] for a in alerts] == [license_id(bob_text)]
        assert alerts[0]["policy"] == ("suspend" if model == "suspend" else "notify")

    metrics = scrape(ts)
    served = {(labels["ModelName"], labels["License"]): v for n, labels, v in metrics if n == "ActiveGuardRowsServed"}
    carol_rows = CAROL_ROWS * len(range(0, STREAM, BOB_ROWS))
    assert served[("throttle", license_id(carol_text))] == carol_rows
    assert 0 < served[("throttle", license_id(bob_text))] < STREAM
    alerts = {
        (labels["ModelName"], labels["License"]): v for n, labels, v in metrics if n == "ActiveGuardExtractionAlerts"
    }
    assert alerts == {("throttle", license_id(bob_text)): 1.0, ("suspend", license_id(bob_text)): 1.0}
    refused = [(labels["License"], labels["Reason"]) for n, labels, v in metrics if n == "ActiveGuardRowsRefused"]
    assert (license_id(bob_text), "extraction_throttled") in refused
    statistic = {labels["License"]: v for n, labels, v in metrics if n == "ActiveGuardExtractionStatistic"}
    assert 0 < statistic[license_id(bob_text)] < 1 and statistic[license_id(carol_text)] > 0.95
