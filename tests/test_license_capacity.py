"""The license server over the ranked FO space: batched on-demand issuance, pre-generation that
resumes after a kill without duplicates, and metrics that show both (real server processes, SQLite)."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from activeguard.credentials import licenses as lic
from activeguard.credentials.fingerprints import authenticate
from license_server.checkpoints import fingerprint_from_bytes
from license_server.client import LicenseClient, to_signed
from license_server.config import ServerConfig
from license_server.pregeneration import pregenerate
from license_server.store import Store
from tests.processes import TOKEN, ServerProcess

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def lenet_path(lenet, tmp_path_factory) -> Path:
    from activeguard.models.architectures import save_model

    path = tmp_path_factory.mktemp("capacity-model") / "lenet.pt"
    save_model(lenet, path)
    return path


def _metric(server: ServerProcess, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def _pool(store: Store, mid: str) -> list[tuple[int, int]]:
    return sorted(store.pregenerated_slots(mid))


def test_concurrent_on_demand_requests_share_one_search_and_get_distinct_working_licenses(
    servers, tmp_path, lenet_path, lenet
):
    server = servers(tmp_path / "ls", register_pool=0)
    with server.client() as c:
        reg = c.register_model(model_path=str(lenet_path))  # no pool: every license is generated on demand
    assert reg.pregeneration_target == 0
    mid, profile = reg.profile.model_id, reg.profile
    assert profile.fo_scheme == "ranked" and reg.capacity >= 10_000 and reg.pregenerated == 0
    clients = [LicenseClient(server.target, TOKEN, timeout=120) for _ in range(4)]
    try:
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            issued = list(pool.map(lambda i: clients[i % 4].issue(mid, f"od-{i}", 3600), range(12)))
    finally:
        for cl in clients:
            cl.close()
    assert len({m.fo.user_index for m in issued}) == 12
    keys = {server.key_id: lic.load_signing_key(tmp_path / "ls" / "signing_key.pem").public_key()}
    config = Store(f"sqlite:///{(tmp_path / 'ls' / 'licenses.db').resolve()}").get_model(mid).control
    for m in issued:
        payload = lic.verify_license(to_signed(m), keys, model_id=mid)
        fo = config.fo_of_user(payload.user_index)
        assert (m.fo.runner_up_class, m.fo.runner_up_confidence) == (fo.runner_up, fo.runner_up_confidence)
        admitted, who = authenticate(lenet, payload.fingerprint_tensor(), config)
        assert bool(admitted[0]) and int(who[0]) == payload.user_index
    # requests joined a running optimization instead of queueing one each
    joins = _metric(server, "activeguard_on_demand_batch_size_count")
    rows = _metric(server, "activeguard_on_demand_batch_size_sum")
    assert joins < 12 or rows > joins, (joins, rows)
    assert _metric(server, 'activeguard_fingerprints_generated_total{path="on_demand"}') >= 12


def test_pregeneration_resumes_after_a_kill_without_duplicates_and_feeds_issuance(servers, tmp_path, lenet_path, lenet):
    data = tmp_path / "ls"
    server = servers(data)
    with server.client() as c:
        mid = c.register_model(model_path=str(lenet_path), pregenerate=True, pregenerate_count=20).profile.model_id
    # a fingerprint that fails its re-check is not pooled: the filler then tries other slots until the
    # pool holds the target (it used to stop one short)
    deadline = time.monotonic() + 120
    while _metric(server, "activeguard_pregenerated_fingerprints") < 20 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _metric(server, "activeguard_pregenerated_fingerprints") == 20
    assert _metric(server, "activeguard_pregeneration_target") == 20
    url = f"sqlite:///{(data / 'licenses.db').resolve()}"
    store = Store(url)
    try:
        # the offline filler, killed once it has committed a batch, then run again to the goal
        cli = [sys.executable, "-m", "license_server", "pregenerate", "--data-dir", str(data)]
        proc = subprocess.Popen(
            [*cli, "--model-id", mid, "--count", "400", "--batch", "20", "--json"], cwd=ROOT, env=dict(os.environ)
        )
        try:
            deadline = time.monotonic() + 240
            while store.count_pregenerated(mid) < 40 and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.2)
        finally:
            proc.kill()
            proc.wait()
        killed_at = store.count_pregenerated(mid)
        assert 40 <= killed_at < 400, killed_at
        report = pregenerate(ServerConfig(data_dir=data), mid, killed_at + 30, batch=20, progress=False)
        assert report.pool == killed_at + 30 and report.generated == 30
        slots = _pool(store, mid)
        assert len(slots) == len(set(slots)) == killed_at + 30
        config = store.get_model(mid).control
        per_class = config.per_class
        xs = torch.cat([fingerprint_from_bytes(store.pregenerated_for(mid, s), (1, 28, 28)) for s in slots])
        admitted, who = authenticate(lenet, xs, config)
        assert admitted.all() and who.tolist() == [t * per_class + j for t, j in slots]
    finally:
        store.close()
    # the running server sees the offline pool when it next loads the model (a restart here)
    server.stop()
    again = servers(data)
    with again.client() as c:
        issued = [c.issue(mid, f"pool-{i}", 3600) for i in range(5)]
    assert {(m.fo.user_index // per_class, m.fo.user_index % per_class) for m in issued} <= set(slots)
    assert _metric(again, 'activeguard_license_issue_seconds_count{path="pregenerated"}') == 5


def test_registration_starts_a_pool_so_the_first_license_comes_from_it(servers, tmp_path, lenet_path):
    """Every registration starts a small pool in the background (a small first batch), and says so; an
    issue that comes at once waits for that batch instead of starting a search of its own."""
    server = servers(tmp_path / "ls")
    with server.client() as c:
        reg = c.register_model(model_path=str(lenet_path))
        assert reg.pregeneration_target == 100 and reg.pregenerated < 100
        c.issue(reg.profile.model_id, "first", 3600)
    assert _metric(server, 'activeguard_license_issue_seconds_count{path="pregenerated"}') == 1
    assert _metric(server, 'activeguard_license_issue_seconds_count{path="generated"}') == 0
