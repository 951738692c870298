"""Revocation freshness across a license-server restart: the gateway's real sync against a real
license server that goes away long enough for gRPC's reconnect backoff to grow, then comes back."""

from __future__ import annotations

import time

import pytest

from activeguard.credentials.revocations import verify_revocations
from gateway.service import GatewayConfig, Metrics, ModelRoute, RevocationSync
from handlers.server import free_port
from license_server.client import LicenseClient
from license_server.config import ServerConfig
from license_server.process import in_process
from tests.processes import TOKEN

pytestmark = pytest.mark.slow
POLL_S = 1.0
OUTAGE_S = 8.0  # with gRPC's default backoff the client would then wait several seconds more


def test_a_revocation_reaches_the_gateway_within_poll_plus_one_second_after_a_restart(deployment, tmp_path):
    port = free_port()
    ls_config = ServerConfig(data_dir=tmp_path / "ls", port=port, metrics_port=None, max_workers=4)
    with in_process(ls_config, TOKEN), LicenseClient(f"127.0.0.1:{port}", TOKEN, timeout=120) as admin:
        mid = admin.register_model(
            model_path=str(deployment.model_path), name="mnist", fo_scheme="paper"
        ).profile.model_id
        license_id = admin.issue(mid, "alice", 3600).license_id
    gw_config = GatewayConfig(
        models=[ModelRoute("mnist", mid, ["127.0.0.1:1"])],
        signing_key=tmp_path / "gw.key",
        license_server=f"127.0.0.1:{port}",
        revocation_file=tmp_path / "revoked.txt",
        poll_interval_s=POLL_S,
    )
    metrics = Metrics()
    sync = RevocationSync(gw_config, metrics)
    sync.start()
    try:
        time.sleep(OUTAGE_S)  # the license server is down: every poll fails and the backoff grows
        assert metrics.registry.get_sample_value("activeguard_gateway_revocation_sync_errors_total") >= 3
        assert sync.staleness() >= OUTAGE_S - POLL_S
        # the admin waits for the connection; the sync (like the gateway) keeps its own fail-fast polls
        with (
            in_process(ls_config, TOKEN),
            LicenseClient(f"127.0.0.1:{port}", TOKEN, timeout=30, wait_for_ready=True) as admin,
        ):
            keys = admin.verification_keys()
            admin.revoke(license_id, "test")
            revoked_at = time.monotonic()
            while license_id not in sync.revoked:
                assert time.monotonic() - revoked_at < 10, "the revocation never reached the gateway"
                time.sleep(0.02)
            delay = time.monotonic() - revoked_at
    finally:
        sync.stop()
    print(
        f"\nrevocation reached the gateway {delay:.2f} s after the restarted license server recorded it "
        f"(poll interval {POLL_S:g} s)"
    )
    assert delay <= POLL_S + 1.0
    # and the handler's file has it, in the license server's signed list
    assert license_id in verify_revocations((tmp_path / "revoked.txt").read_text(), keys).revoked
    assert sync.staleness() < POLL_S + 1.0
