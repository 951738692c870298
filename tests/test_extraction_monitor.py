"""The extraction monitor (PRADA per license, activeguard.guard.monitor) on the reference LeNet-5.

A JBDA-style stream (activeguard.experiments.extraction_attacks.jbda: 300 seeds, 3 rounds of Jacobian
augmentation) is flagged within a stated number of queries; 20 benign streams of natural MNIST digits
(disjoint, 250 each) are not. Through the guard: the policies, the journal's alert and usage entries,
and a benign license served beside a throttled one. The memory bound holds with many licenses, and
no float rows make the monitor raise.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from activeguard.experiments import extraction_attacks as attacks
from activeguard.experiments.served import ServedModel
from activeguard.guard import monitor
from activeguard.guard.monitor import ExtractionMonitor, MonitorSettings
from activeguard.models.architectures import save_model
from activeguard.models.sources import load
from activeguard.watermark.journal import journal_files, read_entries
from activeguard.watermark.traffic import SUSPEND

JBDA_FLAGGED_WITHIN = 1400  # queries (measured: 1,216 with the evaluation's stream; docs/results.md)
CHUNK = 64  # rows per request, as the evaluation's clients send them


def classes(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1)


def first_flag(model, x: torch.Tensor, chunk: int = CHUNK, **kw) -> monitor.Flag | None:
    m = ExtractionMonitor(MonitorSettings(policy=monitor.ALERT, **kw), x[0].numel())
    labels = classes(model, x)
    for i in range(0, len(x), chunk):
        flag = m.observe("lic", x[i : i + chunk], labels[i : i + chunk])
        if flag is not None:
            return flag
    return None


@pytest.fixture(scope="module")
def streams(lenet, mnist):
    """bob's JBDA-style queries in the order he sends them, and 20 benign streams of natural digits."""
    half = len(mnist.x_test) // 2
    seeds = torch.cat([attacks.related_digits(150, 28, 1), mnist.x_test[:half][:150]])
    jbda = attacks.jbda_stream(lambda x: classes(lenet, x), seeds, rounds=3, epochs=1, seed=0)
    digits = torch.cat([mnist.x_train, mnist.x_test])
    order = torch.randperm(len(digits), generator=torch.Generator().manual_seed(0))
    benign = [digits[order[i * 250 : (i + 1) * 250]] for i in range(20)]
    return {"jbda": jbda, "benign": benign}


def test_a_jbda_stream_is_flagged_within_the_stated_queries(lenet, streams):
    flag = first_flag(lenet, streams["jbda"])
    assert flag is not None and flag.queries <= JBDA_FLAGGED_WITHIN, flag
    assert flag.statistic < monitor.DEFAULT_DELTA


def test_benign_streams_of_natural_digits_are_not_flagged(lenet, streams):
    flagged = [i for i, x in enumerate(streams["benign"]) if first_flag(lenet, x, chunk=8) is not None]
    assert flagged == []


def test_the_memory_bound_holds_with_many_licenses():
    s = MonitorSettings(policy=monitor.ALERT, max_licenses=8, max_per_class=5, min_queries=20, window=40)
    m = ExtractionMonitor(s, 784)
    rng = np.random.default_rng(0)
    for k in range(50):  # 50 licenses, 8 remembered: the least recently seen are forgotten
        for _ in range(3):
            m.observe(f"lic-{k}", rng.random((16, 784), np.float32), rng.integers(0, 3, 16))
    assert len(m) == 8 and m.statistic("lic-0") is None and m.statistic("lic-49") is not None
    assert m.nbytes <= s.bytes_bound(10)
    per_class = [k.count for state in m._licenses.values() for k in state.sets.values()]
    assert max(per_class) <= s.max_per_class


def test_a_long_input_is_sketched_to_the_bound():
    m = ExtractionMonitor(MonitorSettings(policy=monitor.ALERT, sketch_dim=64), 3 * 224 * 224)
    m.observe("lic", torch.rand(3, 3, 224, 224), torch.tensor([1, 1, 2]))
    assert all(k.rows.shape[1] == 64 for k in m._licenses["lic"].sets.values())


finite = st.floats(allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 6), st.just(12)), elements=finite), st.integers(0, 3))
def test_arbitrary_finite_rows_never_raise(rows, c):
    # NaN and inf never reach the monitor: the body parser refuses them (malformed_input)
    m = ExtractionMonitor(MonitorSettings(policy=monitor.THROTTLE, min_queries=3, window=8), 12)
    for _ in range(6):
        flag = m.observe("lic", rows, np.full(len(rows), c))
        assert flag is None or 0.0 <= flag.statistic <= 1.0
    assert m.refusal("lic") in (None, monitor.THROTTLE)


def test_bad_settings_are_refused():
    for bad in (dict(policy="block"), dict(delta=1.5), dict(min_queries=2), dict(min_queries=50, window=20)):
        with pytest.raises(ValueError):
            MonitorSettings(**bad).validated()


@pytest.fixture(scope="module")
def loaded(lenet, tmp_path_factory):
    path = tmp_path_factory.mktemp("monitor") / "lenet.pt"
    save_model(lenet, path)
    return load(path)


def entries(journal) -> list[dict]:
    return [e for f in journal_files(journal) for e in read_entries(f)[0]]


@pytest.mark.parametrize("policy", [monitor.THROTTLE, monitor.SUSPEND])
def test_the_guard_refuses_a_flagged_license_and_serves_a_benign_one(loaded, streams, tmp_path, policy):
    served = ServedModel(loaded, extraction_monitor=policy, answer_journal_dir=str(tmp_path / "journal"))
    bob, carol = served.session("bob"), served.session("carol")
    x = streams["jbda"][:JBDA_FLAGGED_WITHIN]
    outcomes = served.guard.handle(
        [served_request(x[i : i + CHUNK], bob) for i in range(0, len(x), CHUNK)]
        + [served_request(streams["benign"][0], carol)]
    )
    reasons = [o.reason for o in outcomes]
    refused = "extraction_throttled" if policy == monitor.THROTTLE else "extraction_suspended"
    assert reasons[0] == "session_authorized" and reasons[-2] == refused and reasons[-1] == "session_authorized"
    assert outcomes[-2].status == (429 if policy == monitor.THROTTLE else 403)
    journal = entries(tmp_path / "journal")
    alerts = [e for e in journal if e["kind"] == "alert"]
    assert [a["license_id"] for a in alerts] == ["license-bob"]
    assert (alerts[0]["policy"] == SUSPEND) == (policy == monitor.SUSPEND)
    usage = {e["license_id"]: e for e in journal if e["kind"] == "usage"}
    assert usage["license-bob"]["refused"][refused] > 0  # written with the alert, in the same batch
    assert usage["license-bob"]["served"] + sum(usage["license-bob"]["refused"].values()) == len(x)


def test_a_throttle_ends_after_its_cool_down(loaded, streams, tmp_path):
    served = ServedModel(loaded, extraction_monitor=monitor.THROTTLE, answer_journal_dir=str(tmp_path / "j"))
    now = [0.0]
    served.guard.monitor._clock = lambda: now[0]
    bob = served.session("bob")
    x = streams["jbda"][:JBDA_FLAGGED_WITHIN]
    served.guard.handle([served_request(x[i : i + CHUNK], bob) for i in range(0, len(x), CHUNK)])
    assert served.guard.handle([served_request(x[:1], bob)])[0].reason == "extraction_throttled"
    now[0] += monitor.DEFAULT_COOLDOWN_S + 1
    assert served.guard.handle([served_request(x[:1], bob)])[0].reason == "session_authorized"


def test_usage_is_journalled_without_the_monitor(loaded, mnist, tmp_path):
    served = ServedModel(loaded, answer_journal_dir=str(tmp_path / "j"))
    served.guard.usage.interval_s = 0
    served.answer(mnist.x_test[:100], served.session("carol"))
    usage = [e for e in entries(tmp_path / "j") if e["kind"] == "usage"]
    assert sum(e["served"] for e in usage) == 100 and {e["license_id"] for e in usage} == {"license-carol"}


def test_the_profile_and_the_package_flags(tmp_path, lenet):
    from activeguard.cli.app import main
    from activeguard.guard.profile import PROFILE_FILE, Profile
    from handlers.archives import MarArchive

    save_model(lenet, tmp_path / "m.pt")
    args = ["package", "--model", str(tmp_path / "m.pt"), "--name", "m", "--store", str(tmp_path / "store")]
    flags = ["--extraction-monitor", "suspend", "--extraction-delta", "0.9", "--answer-journal", str(tmp_path / "j")]
    assert main([*args, *flags, "--json"]) == 0
    profile = Profile.from_json(MarArchive.read(tmp_path / "store" / "m.mar").entries[PROFILE_FILE].decode())
    assert (profile.extraction_monitor, profile.extraction_delta) == ("suspend", 0.9)
    assert profile.answer_journal_dir == str(tmp_path / "j") and profile.answer_watermark_margin == 0
    with pytest.raises(ValueError):  # alerts need a journal
        dataclasses.replace(profile, answer_journal_dir=None).validated()


def served_request(x: torch.Tensor, session: str):
    import json

    from activeguard.guard.outcomes import Request

    return Request(json.dumps({"inputs": x.tolist()}).encode(), session=session)


class Metrics:
    """TorchServe's metric cache as the handler calls it (its signatures: a generic metric needs a unit)."""

    def __init__(self):
        self.calls: list[tuple[str, float, tuple]] = []

    def add_counter(self, name, value, idx=None, dimensions=()):
        self.calls.append((name, value, tuple((d.name, d.value) for d in dimensions)))

    def add_metric(self, name, value, unit, idx=None, dimensions=(), metric_type=None):
        self.calls.append((name, value, tuple((d.name, d.value) for d in dimensions)))


def test_license_metrics_name_the_first_licenses_and_count_rows():
    from activeguard.guard.outcomes import Outcome, Verdict
    from handlers.metrics import LicenseLabels, record_licenses

    labels = LicenseLabels(named=2)
    verdicts = [Verdict(200, "authorized", license_id=f"lic-{k}", rows=3) for k in range(4)]
    verdicts.append(Verdict(429, "extraction_throttled", license_id="lic-0", rows=5))
    answers = [Outcome(v.status, v.reason, {}) for v in verdicts]
    flag = monitor.Flag("lic-1", 0.9, 300, monitor.ALERT)
    metrics = Metrics()
    record_licenses(metrics, verdicts, answers, [flag], lambda license_id: 0.97, labels)
    served = {c[2]: c[1] for c in metrics.calls if c[0] == "ActiveGuardRowsServed"}
    assert served == {(("License", "lic-0"),): 3, (("License", "lic-1"),): 3, (("License", "other"),): 6}
    refused = [c for c in metrics.calls if c[0] == "ActiveGuardRowsRefused"]
    assert refused == [("ActiveGuardRowsRefused", 5, (("License", "lic-0"), ("Reason", "extraction_throttled")))]
    assert ("ActiveGuardExtractionAlerts", 1, (("License", "lic-1"),)) in metrics.calls
    assert ("ActiveGuardExtractionStatistic", 0.97, (("License", "lic-0"),)) in metrics.calls
